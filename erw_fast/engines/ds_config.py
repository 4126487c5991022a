"""The DeepSpeed JSON, generated from the run config and merged with a user-supplied one.

The trainer owns the batch arithmetic, precision, clipping and optimizer, so those keys are generated from our
config; a user JSON may add anything else (ZeRO bucket sizes, offload, communication settings, …). A user value
that disagrees with a generated one is an error naming both, never a silent override: a run must train what its
config says. HF-style ``"auto"`` values are replaced by ours.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from erw_fast.config import Config, ConfigError, flatten_dotted
from erw_fast.engines.base import adamw_implementation

DEFAULT_ZERO_STAGE = 1  # see README "Choosing the engine": ZeRO-1 is the cheapest sharding on one node

# Keys the trainer refuses from a user JSON, with the reason.
_REFUSED = {
    "scheduler": "the trainer keeps a constant learning rate (optim.lr), as REPA and ERW do",
    "amp": "use train.precision (bf16 | fp16 | fp32)",
}


def load_user_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"DeepSpeed config not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a JSON object")
    return data


def generated_config(config: Config, *, global_batch: int, micro_batch: int, accumulation: int,
                     device: torch.device, zero_stage: int) -> tuple[dict[str, Any], dict[str, str]]:
    """(DeepSpeed config, {dotted DeepSpeed key: the run-config key it comes from})."""
    o, precision = config.optim, config.train.precision
    ds: dict[str, Any] = {
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": float(o.grad_clip),
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "optimizer": {
            "type": "AdamW",
            # torch's AdamW on DeepSpeed's flat fp32 partitions: no JIT-built op, and torch's fused kernel on CUDA.
            "params": {"lr": o.lr, "betas": list(o.betas), "eps": o.eps, "weight_decay": o.weight_decay,
                       "torch_adam": True, **_implementation(o.implementation, device)},
        },
        "zero_optimization": {"stage": zero_stage},
        "steps_per_print": 2**31 - 1,  # the trainer logs; DeepSpeed's own step prints are noise
        "wall_clock_breakdown": False,
    }
    if precision == "bf16":
        # Without this DeepSpeed applies a bf16 step whose gradient norm is inf/NaN; the run must skip it.
        ds["bf16"]["check_grad_overflow"] = True
    if precision == "fp16":
        ds["fp16"].update({"loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000, "hysteresis": 2,
                           "min_loss_scale": 1})
    if device.type == "cuda":
        ds["zero_optimization"].update({"overlap_comm": True, "contiguous_gradients": True})
    derived = "derived: train.global_batch_size / world size / train.micro_batch_size"
    sources = {
        "train_batch_size": "train.global_batch_size",
        "train_micro_batch_size_per_gpu": "train.micro_batch_size (" + derived + ")",
        "gradient_accumulation_steps": "the accumulation (" + derived + ")",
        "gradient_clipping": "optim.grad_clip",
        "bf16.enabled": "train.precision", "fp16.enabled": "train.precision",
        "optimizer.type": "the trainer's optimizer (AdamW)",
        "optimizer.params.lr": "optim.lr", "optimizer.params.betas": "optim.betas",
        "optimizer.params.eps": "optim.eps", "optimizer.params.weight_decay": "optim.weight_decay",
        "zero_optimization.stage": "engine.zero_stage",
    }
    return ds, sources


def _implementation(choice: str, device: torch.device) -> dict[str, bool]:
    return {"fused": True} if adamw_implementation(choice, device) == "fused" else {"foreach": True}


def _same(ours: Any, theirs: Any) -> bool:
    if isinstance(ours, list | tuple) and isinstance(theirs, list | tuple):
        return len(ours) == len(theirs) and all(_same(a, b) for a, b in zip(ours, theirs, strict=True))
    if isinstance(ours, bool) or isinstance(theirs, bool):
        return ours is theirs
    if isinstance(ours, int | float) and isinstance(theirs, int | float):
        return float(ours) == float(theirs)
    return ours == theirs


def _merge_user(generated: dict[str, Any], user: dict[str, Any], path: str) -> dict[str, Any]:
    out = dict(generated)
    for key, value in user.items():
        dotted = f"{path}{key}"
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge_user(out[key], value, f"{dotted}.")
        elif value == "auto" or key not in out:
            out[key] = out.get(key, value) if value == "auto" else value
        else:
            out[key] = value  # equal, or a generated key without a run-config source: checked by the caller
    return out


def build_deepspeed_config(config: Config, *, global_batch: int, micro_batch: int, accumulation: int,
                           device: torch.device, user: dict[str, Any] | None = None,
                           user_source: str = "the DeepSpeed JSON") -> dict[str, Any]:
    """The DeepSpeed config for this run: generated, then merged with ``user``; conflicts raise ConfigError."""
    user = user or {}
    for key, why in _REFUSED.items():
        if key in user:
            raise ConfigError(f"{user_source}: {key!r} is not supported here: {why}")
    stage = config.engine.zero_stage
    user_stage = user.get("zero_optimization", {}).get("stage") if isinstance(user.get("zero_optimization"),
                                                                                 dict) else None
    if stage is None:
        stage = user_stage if isinstance(user_stage, int) else DEFAULT_ZERO_STAGE
    generated, sources = generated_config(config, global_batch=global_batch, micro_batch=micro_batch,
                                          accumulation=accumulation, device=device, zero_stage=stage)
    flat_ours, flat_theirs = flatten_dotted(generated), flatten_dotted(user)
    conflicts = [
        f"{key} = {json.dumps(theirs)} in {user_source}, but {json.dumps(flat_ours[key])} from {sources[key]}"
        for key, theirs in flat_theirs.items()
        if key in sources and theirs != "auto" and not _same(flat_ours[key], theirs)
    ]
    if conflicts:
        raise ConfigError("the DeepSpeed JSON disagrees with the run config (change one of them):\n  "
                          + "\n  ".join(conflicts))
    return _merge_user(generated, user, "")
