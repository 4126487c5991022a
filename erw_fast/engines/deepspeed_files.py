"""Reading the model weights of a DeepSpeed-engine checkpoint offline (one process, CPU, no GPUs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def read_deepspeed_weights(state_path: Path, state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The fp32 model weights of the checkpoint whose trainer state file is ``state_path``: DeepSpeed's sharded
    files (any ZeRO stage, any world size) merged by its own consolidation routine."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    info = state["engine"]
    native = Path(state_path).parent / info["dir"]
    if not (native / info["tag"]).is_dir():
        raise FileNotFoundError(f"{state_path} points at DeepSpeed files {native / info['tag']}, which are missing")
    weights = get_fp32_state_dict_from_zero_checkpoint(str(native), tag=info["tag"])
    # zero_to_fp32 leaves out frozen parameters (the fixed positional embedding): take them from the EMA, which
    # equals them exactly since they never change.
    return {k: weights[k] if k in weights else state["ema"][k] for k in state["ema"]}


def trainer_checkpoint_weights(state_path: Path, state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The model weights of a trainer checkpoint: in the state file (DDP / one process) or in DeepSpeed's files."""
    if state.get("engine", {}).get("kind") == "deepspeed":
        return read_deepspeed_weights(state_path, state)
    return state["model"]
