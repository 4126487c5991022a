"""torch.compile for SiT: the whole model, or each transformer block (regional compilation).

Regional compilation compiles the block once and reuses the graph for every block (parameters are graph inputs),
so compile time does not grow with depth and a shape change recompiles one small graph; the embedders, final
layer and loss stay eager. ``mode`` is torch.compile's: ``max-autotune`` searches matmul/attention configs,
``reduce-overhead`` adds CUDA graphs.
"""

from __future__ import annotations

from torch import nn

COMPILE_SCOPES = ("model", "blocks")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_model(model: nn.Module, scope: str = "blocks", mode: str = "default",
                  backend: str = "inductor") -> nn.Module:
    """Return the module to call: ``torch.compile(model)`` for scope "model"; for "blocks" the model itself,
    with every block in ``model.blocks`` compiled in place (state-dict keys unchanged)."""
    import torch

    if scope not in COMPILE_SCOPES:
        raise ValueError(f"unknown compile scope {scope!r}; choose one of {COMPILE_SCOPES}")
    if mode not in COMPILE_MODES:
        raise ValueError(f"unknown compile mode {mode!r}; choose one of {COMPILE_MODES}")
    options = {"backend": backend} if backend != "inductor" else {"mode": None if mode == "default" else mode}
    if scope == "model":
        return torch.compile(model, **options)
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList | nn.Sequential) or len(blocks) == 0:
        raise ValueError(f"{type(model).__name__} has no `blocks` to compile regionally; use scope 'model'")
    for block in blocks:
        block.compile(**options)
    return model


def describe_compile(enabled: bool, scope: str, mode: str, backend: str) -> str:
    if not enabled:
        return "eager"
    return f"torch.compile ({scope}, mode {mode}, backend {backend})"
