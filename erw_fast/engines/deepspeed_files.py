"""DeepSpeed's checkpoint files: where a trainer checkpoint says they are (checked), reading them with a restricted
unpickler, and the model weights of a DeepSpeed-engine checkpoint offline (one process, CPU, no GPUs).

DeepSpeed loads its own files with ``torch.load(weights_only=False)``: a full unpickler, which runs whatever code a
crafted file names. Our state file says where those files are (``engine.dir`` / ``engine.tag``), so a crafted
state file could point the loader at pickles anywhere. Both are closed here:

- ``deepspeed_location`` accepts only the engine's own subdirectory and a checkpoint-name tag, resolved inside the
  checkpoint directory;
- ``restricted_loads`` makes every ``torch.load`` DeepSpeed does inside it ``weights_only=True`` with an explicit
  allow-list of the few DeepSpeed classes its files hold (found by writing real checkpoints: ZeRO 0–3, fp32 and
  bf16, 1 and 2 ranks, and the universal checkpoints converted from them).
"""

from __future__ import annotations

import contextlib
import pickle
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from erw_fast.checkpoint import CheckpointError

NATIVE_DIR = "deepspeed"  # DeepSpeed's own files, ``checkpoints/deepspeed/{name}/``
UNIVERSAL_DIR = "deepspeed-universal"  # converted for another world size, ``checkpoints/deepspeed-universal/{name}/``
# A checkpoint name as ``checkpoint.checkpoint_name`` writes it (``step_0001000``, ``phase1_0000500``): no
# separators, no leading dot, so it cannot leave the directory it is joined to.
_TAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*_\d+$")

_LOAD_LOCK = threading.Lock()  # restricted_loads swaps torch.load process-wide: one user at a time


def deepspeed_location(directory: Path, info: dict[str, Any], source: Path | str) -> tuple[Path, str]:
    """(DeepSpeed's directory, tag) of a trainer checkpoint in ``directory`` whose ``engine`` entry is ``info``;
    ``source`` names the state file in errors.

    Only ``dir == "deepspeed"`` and a checkpoint-name tag are accepted, and the result must resolve inside
    ``directory``; anything else raises CheckpointError naming the file and the key, before any read.
    """
    directory = Path(directory)
    sub, tag = info.get("dir"), info.get("tag")
    if sub != NATIVE_DIR:
        raise CheckpointError(f"{source}: engine.dir is {sub!r}, but DeepSpeed's files are always in the "
                              f"checkpoint's {NATIVE_DIR!r} subdirectory; refusing to read it (a crafted file?)")
    if not isinstance(tag, str) or not _TAG_RE.match(tag):
        raise CheckpointError(f"{source}: engine.tag is {tag!r}, not a checkpoint name such as 'step_0001000'; "
                              "refusing to read it (a crafted file?)")
    native = directory / NATIVE_DIR
    resolved, inside = (native / tag).resolve(), directory.resolve()
    if inside not in resolved.parents:
        raise CheckpointError(f"{source}: engine.dir/engine.tag lead to {resolved}, outside {inside} (a symbolic "
                              "link?); refusing to read it")
    return native, tag


def deepspeed_safe_globals() -> list[Any]:
    """The classes DeepSpeed 0.19's checkpoint files hold besides tensors and containers, found by writing real
    ones. All are plain records (no code runs when they are rebuilt): the loss scaler's settings, the ZeRO stage
    enum and the address of a parameter's fragment in a flat partition. DynamicLossScaler is what fp16 writes."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _refusal(path: Any, error: Exception) -> CheckpointError:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    what = next((line for line in lines if "GLOBAL" in line or "global" in line), lines[0] if lines else "")
    return CheckpointError(f"{path}: refused to load this DeepSpeed file with weights_only=True and the allow-list of "
                           f"DeepSpeed's checkpoint classes: {what}")


@contextlib.contextmanager
def restricted_loads() -> Iterator[None]:
    """Every ``torch.load`` inside (DeepSpeed's own calls pass ``weights_only=False``) runs with
    ``weights_only=True`` and only ``deepspeed_safe_globals()`` allowed; a file holding anything else raises
    CheckpointError naming it.

    torch.load is replaced process-wide for the duration (DeepSpeed's modules look it up at call time), so this
    wraps one-threaded work only: the offline readers, and a resume before the data loader starts."""
    allowed = deepspeed_safe_globals()
    real = torch.load

    def load(f: Any, map_location: Any = None, pickle_module: Any = None, *, weights_only: Any = None,
             mmap: Any = None, **kwargs: Any) -> Any:
        with torch.serialization.safe_globals(allowed):
            try:
                return real(f, map_location=map_location, weights_only=True, mmap=mmap, **kwargs)
            except pickle.UnpicklingError as error:
                raise _refusal(f, error) from error

    with _LOAD_LOCK:
        torch.load = load
        try:
            yield
        finally:
            torch.load = real


def read_deepspeed_weights(state_path: Path, state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The fp32 model weights of the checkpoint whose trainer state file is ``state_path``: DeepSpeed's sharded
    files (any ZeRO stage, any world size) merged by its own consolidation routine, read through the restricted
    loader."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    native, tag = deepspeed_location(Path(state_path).parent, state["engine"], state_path)
    if not (native / tag).is_dir():
        raise FileNotFoundError(f"{state_path} points at DeepSpeed files {native / tag}, which are missing")
    with restricted_loads():
        weights = get_fp32_state_dict_from_zero_checkpoint(str(native), tag=tag)
    # zero_to_fp32 leaves out frozen parameters (the fixed positional embedding): take them from the EMA, which
    # equals them exactly since they never change.
    return {k: weights[k] if k in weights else state["ema"][k] for k in state["ema"]}


def trainer_checkpoint_weights(state_path: Path, state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The model weights of a trainer checkpoint: in the state file (DDP / one process) or in DeepSpeed's files."""
    if state.get("engine", {}).get("kind") == "deepspeed":
        return read_deepspeed_weights(state_path, state)
    return state["model"]
