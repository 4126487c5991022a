"""Training engines: one process / DDP (torchrun) and DeepSpeed ZeRO 0–3, behind one small interface."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from torch import nn

from erw_fast.config import Config, ConfigError
from erw_fast.engines.base import Engine, StepOutcome
from erw_fast.engines.local import LocalEngine
from erw_fast.runtime import DistEnv

if TYPE_CHECKING:
    from erw_fast.step import BatchPlan

__all__ = ["Engine", "LocalEngine", "StepOutcome", "build_engine", "select_engine"]


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


def build_engine(kind: str, model: nn.Module, config: Config, env: DistEnv, plan: BatchPlan,
                 model_factory: Callable[[], nn.Module], resume_info: dict[str, Any] | None = None) -> Engine:
    """The engine of ``kind`` around ``model``. DeepSpeed writes the config it runs with (generated from ours,
    merged with the user's JSON) to ``<run_dir>/deepspeed_config.json`` on rank 0."""
    if kind != "deepspeed":
        return LocalEngine(model, config, env, plan.accumulation)
    from erw_fast.engines.deepspeed_engine import DeepSpeedEngine

    engine = DeepSpeedEngine(model, config, env, global_batch=plan.global_batch, micro_batch=plan.micro_batch,
                             accumulation=plan.accumulation, model_factory=model_factory, resume_info=resume_info)
    if env.is_main:
        path = config.run_dir / "deepspeed_config.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(engine.ds_config, indent=2) + "\n")
    return engine
