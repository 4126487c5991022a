"""Training engines: one process / DDP (torchrun) and DeepSpeed ZeRO 0–3, behind one small interface."""

from __future__ import annotations

from erw_fast.config import Config, ConfigError
from erw_fast.engines.base import Engine, StepOutcome
from erw_fast.engines.local import LocalEngine

__all__ = ["Engine", "LocalEngine", "StepOutcome", "select_engine"]


def select_engine(config: Config, *, deepspeed_flag: bool = False, deepspeed_launcher: bool = False) -> tuple[str, str]:
    """(engine kind, why) from engine.kind and how the process was launched."""
    kind, json_path = config.engine.kind, config.engine.deepspeed_config
    if kind == "ddp":
        if json_path or deepspeed_flag:
            raise ConfigError("engine.kind=ddp, but a DeepSpeed config/--deepspeed was given: drop one of them")
        return "ddp", "engine.kind=ddp"
    if kind == "deepspeed":
        return "deepspeed", "engine.kind=deepspeed"
    if json_path:
        return "deepspeed", f"a DeepSpeed config was given ({json_path})"
    if deepspeed_flag:
        return "deepspeed", "--deepspeed was given"
    if deepspeed_launcher:
        return "deepspeed", "launched by the deepspeed launcher"
    return "ddp", "launched by torchrun/python"
