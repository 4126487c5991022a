"""A kernel launch as data: the kernel, its grid, arguments, constexprs and compile options.

The launchers build a `Launch` and run it; `erw_fast.kernels.aot` compiles the very same object for a GPU
architecture without a GPU, so what CI checks (registers, spills, shared memory) is what a launch compiles.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Launch:
    """One Triton kernel launch. `args` are the runtime arguments (tensors, ints, floats) by name."""

    name: str
    kernel: Any  # a triton JITFunction (or the interpreter's stand-in)
    grid: tuple[int, ...]
    args: dict[str, Any]
    constexprs: dict[str, Any]
    options: dict[str, int] = field(default_factory=dict)  # num_warps, num_stages

    def run(self) -> None:
        if _recorded is not None:
            _recorded.append(self)
            return
        self.kernel[self.grid](**self.args, **self.constexprs, **self.options)


_recorded: list[Launch] | None = None


@contextmanager
def recording() -> Iterator[list[Launch]]:
    """Inside, `Launch.run` appends to the yielded list instead of launching (see `aot`)."""
    global _recorded
    previous, _recorded = _recorded, []
    try:
        yield _recorded
    finally:
        _recorded = previous
