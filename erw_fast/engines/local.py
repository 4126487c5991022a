"""The engine for one process and for DDP (torchrun): torch AdamW, GradScaler for fp16, multi-tensor EMA."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from erw_fast.compile import compile_model, describe_compile
from erw_fast.config import Config
from erw_fast.ema import EMA, WeightEMA
from erw_fast.engines.base import StepOutcome, adamw_implementation
from erw_fast.engines.rank_sharded_ema import RankShardedEMA
from erw_fast.runtime import DistEnv


class LocalEngine:
    """Gradients are summed over micro-batches (DDP all-reduces once, on the last), then clipped; a step whose
    loss or gradient norm is not finite is skipped (weights, optimizer and EMA untouched)."""

    kind = "ddp"

    def __init__(self, model: nn.Module, config: Config, env: DistEnv, accumulation: int) -> None:
        self.config = config
        self.env = env
        self.accumulation = accumulation
        self.module = model
        self.trainable = [p for p in model.parameters() if p.requires_grad]  # listed once, not every step
        t = config.train
        compiled = compile_model(model, t.compile_scope, t.compile_mode, t.compile_backend) if t.compile else model
        self.forward_module = self._wrap(compiled)
        self.optimizer = self._optimizer()
        decay = config.optim.ema_decay
        sharded = env.world_size > 1 and config.engine.ddp_shard_ema
        self.ema: WeightEMA = RankShardedEMA(model, decay, env.rank, env.world_size) if sharded else EMA(model, decay)
        self._ema_shell: nn.Module | None = None
        self.scaler = torch.amp.GradScaler(env.device.type, enabled=config.train.precision == "fp16")
        # Skipping a non-finite step without a host sync needs the fused AdamW (found_inf) and no GradScaler.
        self.sync_free = bool(self.optimizer.defaults.get("fused")) and not self.scaler.is_enabled()

    def _wrap(self, model: nn.Module) -> nn.Module:
        if self.env.world_size == 1:
            return model
        e = self.config.engine
        ids = [self.env.device.index] if self.env.device.type == "cuda" else None
        unused = getattr(self.module, "unused_parameters", ())  # e.g. the projectors once the alignment stopped
        if unused:  # DDP would wait for their gradients forever
            prefix = "" if model is self.module else "_orig_mod."  # torch.compile(scope model) wraps the module
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, [prefix + n for n in unused])
        return DistributedDataParallel(model, device_ids=ids, bucket_cap_mb=e.ddp_bucket_mb,
                                       gradient_as_bucket_view=e.ddp_gradient_as_bucket_view,
                                       static_graph=e.ddp_static_graph)

    def _optimizer(self) -> torch.optim.Optimizer:
        o = self.config.optim
        impl = adamw_implementation(o.implementation, self.env.device)
        return torch.optim.AdamW(
            self.trainable, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay, eps=o.eps,
            fused=impl == "fused", foreach=impl == "foreach" or None,
        )

    def describe(self) -> str:
        t = self.config.train
        step = ("non-finite steps skipped on the device" if self.sync_free else "non-finite check on the host") \
            + ", " + describe_compile(t.compile, t.compile_scope, t.compile_mode, t.compile_backend)
        if self.env.world_size == 1:
            return f"single process ({step})"
        e = self.config.engine
        ema = (f"EMA sharded by rank ({self.ema.local_numel:,} elements here)" if self.ema.partitioned
               else "EMA replicated")
        return (f"DDP over {self.env.world_size} ranks (bucket {e.ddp_bucket_mb:g} MB, gradient_as_bucket_view "
                f"{e.ddp_gradient_as_bucket_view}, static_graph {e.ddp_static_graph}; {ema}; {step})")

    # ------------------------------------------------------------------------------------------ the step

    def micro_batch(self, last: bool) -> contextlib.AbstractContextManager:
        # DDP: all-reduce once, on the last micro-batch (no_sync must cover forward and backward).
        if last or not isinstance(self.forward_module, DistributedDataParallel):
            return contextlib.nullcontext()
        return self.forward_module.no_sync()

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss / self.accumulation).backward()

    def step(self, loss: torch.Tensor, region: Callable[[str], None] | None = None) -> StepOutcome:
        """``region("ema")`` marks where the EMA update begins (the benchmark's step regions)."""
        self.scaler.unscale_(self.optimizer)
        clip = self.config.optim.grad_clip
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, clip if clip > 0 else float("inf"))
        finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
        if self.sync_free:
            # The fused AdamW kernel reads found_inf on the device and skips the update (and the step count)
            # itself; the EMA lerp is weighted by the same flag. Nothing waits for the GPU.
            self.optimizer.found_inf = (~finite).to(torch.float32)
            self.optimizer.step()
            if region is not None:
                region("ema")
            self.ema.update(applied=finite)
            applied: bool | torch.Tensor = finite
        else:
            applied = bool(finite)  # a host sync: GradScaler and the foreach AdamW decide on the host
            if applied:
                self.scaler.step(self.optimizer)
            if region is not None:
                region("ema")
            if applied:
                self.ema.update()
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return StepOutcome(grad_norm.detach(), applied)

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def close(self) -> None:
        self.optimizer.state.clear()

    # ------------------------------------------------------------------------------------------ state

    def ema_module(self) -> nn.Module:
        if isinstance(self.ema, EMA):  # the whole EMA is a model already
            return self.ema.model
        if self._ema_shell is None:  # built on first use: only the (opt-in) monitors need a whole EMA model
            self._ema_shell = copy.deepcopy(self.module).eval().requires_grad_(False)
        self._ema_shell.load_state_dict(self.ema.state_dict(), strict=True)  # every rank takes part
        return self._ema_shell

    def full_model_state(self, everywhere: bool = True) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def full_ema_state(self, everywhere: bool = True) -> dict[str, torch.Tensor]:
        return self.ema.state_dict(everywhere)

    def checkpoint_state(self, directory: Any, name: str) -> dict[str, Any]:
        return {
            "engine": {"kind": self.kind},
            "model": self.module.state_dict(),
            "ema": self.full_ema_state(everywhere=False),  # only rank 0 writes the state file
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
        }

    def load_checkpoint_state(self, state: dict[str, Any], directory: Any) -> None:
        self.module.load_state_dict(state["model"], strict=True)
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
