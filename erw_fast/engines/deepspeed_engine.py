"""The DeepSpeed engine: ZeRO stages 0–3 with the config generated from ours, an EMA sharded like the fp32
masters, and DeepSpeed's native checkpoints that resume on another world size.

Checkpoint layout (``run_dir/checkpoints``): DeepSpeed writes ``deepspeed/{name}/`` (its sharded model and
optimizer files); the trainer then writes ``{name}.pt`` atomically with our state (step, phase, data position,
RNG, the gathered EMA, where the DeepSpeed files are). The ``.pt`` is written last, so only complete checkpoints
are ever resumed from. On another world size a partitioned checkpoint is converted once with DeepSpeed's
universal-checkpoint tool (``deepspeed-universal/{name}/``) and loaded from there.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import socket
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from erw_fast.compile import compile_model, describe_compile
from erw_fast.config import Config, ConfigError
from erw_fast.engines.base import StepOutcome
from erw_fast.engines.deepspeed_files import NATIVE_DIR, UNIVERSAL_DIR, deepspeed_location, restricted_loads
from erw_fast.engines.ds_config import build_deepspeed_config, load_user_json
from erw_fast.engines.sharded_ema import ShardedEMA, _gathered
from erw_fast.runtime import DistEnv


def quiet_deprecated_collectives() -> None:
    """DeepSpeed's ZeRO collectives call torch.distributed functions torch now marks deprecated
    (all_gather_into_tensor, reduce_scatter_tensor, ...): a FutureWarning per rank and phase that the user cannot act
    on. Silences these messages only."""
    warnings.filterwarnings(
        "ignore", category=FutureWarning,
        message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor|_all_gather_base"
                r"|_reduce_scatter_base|all_gather_coalesced|all_reduce_coalesced"
                r"|distributed_c10d\._get_global_rank|reduce_op)` ",
    )


quiet_deprecated_collectives()  # at the import site of DeepSpeed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_deepspeed_comm(env: DistEnv) -> None:
    """DeepSpeed's communication layer over the process group the launcher made (or a one-rank group)."""
    import deepspeed

    if env.world_size == 1 and not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
    backend = "nccl" if env.device.type == "cuda" else "gloo"
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
    atexit.register(remove_shm_buffer, shm_buffer_path(env.rank))


def shm_buffer_path(rank: int) -> Path:
    """The shared-memory file of DeepSpeed's CPU all-reduce for this rank (its shm.cpp names it so)."""
    addr, port = os.environ.get("MASTER_ADDR", "(null)"), os.environ.get("MASTER_PORT", "(null)")
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def remove_shm_buffer(path: Path) -> None:
    """DeepSpeed's CPU communication backend maps a 66 MB ``/dev/shm`` file per rank and never unlinks it (1.2 GB
    over a day of test runs). Each rank removes its own at exit: the other ranks mapped it at start-up, and a
    mapping outlives the name."""
    with contextlib.suppress(OSError):
        path.unlink()


def needs_universal(info: dict[str, Any], world_size: int) -> bool:
    """A partitioned DeepSpeed checkpoint written on another world size must go through a universal checkpoint."""
    partitioned = info["zero_stage"] > 0 or info["precision"] == "bf16"
    return partitioned and info["world_size"] != world_size


class DeepSpeedEngine:
    kind = "deepspeed"

    def __init__(self, model: nn.Module, config: Config, env: DistEnv, *, global_batch: int, micro_batch: int,
                 accumulation: int, model_factory: Callable[[], nn.Module],
                 resume_info: dict[str, Any] | None = None) -> None:
        import deepspeed

        self.config = config
        self.env = env
        self.accumulation = accumulation
        self.model_factory = model_factory
        init_deepspeed_comm(env)
        user, source = None, "the DeepSpeed JSON"
        if config.engine.deepspeed_config:
            source = config.engine.deepspeed_config
            user = load_user_json(source)
        self.ds_config = build_deepspeed_config(config, global_batch=global_batch, micro_batch=micro_batch,
                                                accumulation=accumulation, device=env.device, user=user,
                                                user_source=source)
        stage = self.ds_config["zero_optimization"]["stage"]
        if resume_info is not None and resume_info["zero_stage"] != stage:
            # DeepSpeed 0.19's universal checkpoints do not load across stages (a ZeRO-2 one into ZeRO-3 fails).
            raise ConfigError(
                f"the checkpoint was written with ZeRO-{resume_info['zero_stage']} and this run is configured for "
                f"ZeRO-{stage}: resume with engine.zero_stage={resume_info['zero_stage']} (on any number of ranks), or "
                f"`erw-export` it and start a new run from the export with checkpoint.init_from_reference")
        self.universal = resume_info is not None and needs_universal(resume_info, env.world_size)
        if self.universal:
            self.ds_config["checkpoint"] = {**self.ds_config.get("checkpoint", {}), "load_universal": True}
        t = config.train
        if t.compile and t.compile_scope == "blocks":  # in place, before DeepSpeed wraps (or partitions) the model
            compile_model(model, "blocks", t.compile_mode, t.compile_backend)
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable, config=self.ds_config)
        self.module: nn.Module = self.engine.module
        self.forward_module: nn.Module = self.engine
        if t.compile and t.compile_scope == "model":
            options = {"mode": None if t.compile_mode == "default" else t.compile_mode}
            self.engine.compile(backend=t.compile_backend, compile_kwargs=options)
        self.zero_stage = int(self.engine.zero_optimization_stage())
        self.ema = ShardedEMA(self.module, config.optim.ema_decay)
        self._backwards = 0

    def describe(self) -> str:
        import deepspeed

        optimizer = self.engine.optimizer
        inner = getattr(optimizer, "optimizer", None)
        opt = type(optimizer).__name__ + (f" over {type(inner).__name__}" if inner is not None else "")
        ema = (f"EMA sharded ({self.ema.local_numel:,} of the trained elements on this rank)" if self.ema.partitioned
               else "EMA replicated")
        t = self.config.train
        return (f"DeepSpeed {deepspeed.__version__} ZeRO-{self.zero_stage} over {self.env.world_size} rank(s), "
                f"precision {t.precision}, optimizer {opt}, {ema}, "
                f"{describe_compile(t.compile, t.compile_scope, t.compile_mode, t.compile_backend)}")

    # ------------------------------------------------------------------------------------------ the step

    def micro_batch(self, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # DeepSpeed reduces at the accumulation boundary itself

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)  # scales by 1 / gradient_accumulation_steps itself
        self._backwards += 1
        if self._backwards < self.accumulation:
            self.engine.step()  # DeepSpeed counts micro-steps in step(); off the boundary it updates nothing

    def step(self, loss: torch.Tensor, region: Callable[[str], None] | None = None) -> StepOutcome:
        if self._backwards != self.accumulation:
            raise RuntimeError(f"step after {self._backwards} backward passes, expected {self.accumulation}")
        self._backwards = 0
        self.engine.step()
        applied = bool(self.engine.was_step_applied())
        norm = self.engine.get_global_grad_norm()
        grad_norm = torch.as_tensor(float("nan") if norm is None else float(norm))
        if region is not None:
            region("ema")
        if applied:
            self.ema.update()
        return StepOutcome(grad_norm, applied)

    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def close(self) -> None:
        """Release DeepSpeed's hooks and buffers (the ERW switch builds a new engine for the full model)."""
        if hasattr(self.engine, "destroy"):
            self.engine.destroy()

    # ------------------------------------------------------------------------------------------ whole states

    def full_model_state(self, everywhere: bool = True) -> dict[str, torch.Tensor]:
        """fp32 weights (the optimizer's masters for trained parameters) keyed like ``state_dict()``, on the CPU.
        Every rank takes part; ranks other than 0 get an empty dict unless ``everywhere``."""
        from deepspeed.utils import safe_get_full_fp32_param

        keep = everywhere or self.env.is_main
        out: dict[str, torch.Tensor] = {}
        for name, param in self.module.named_parameters():
            full = safe_get_full_fp32_param(param) if param.requires_grad else None
            if full is None:  # frozen, or not partitioned (ZeRO-0 in fp32)
                with _gathered([param]):
                    full = param.detach().float().clone()
            if keep:
                out[name] = full.cpu()
        if keep:
            out.update({n: b.detach().cpu().clone() for n, b in self.module.named_buffers()})
        return out

    def full_ema_state(self, everywhere: bool = True) -> dict[str, torch.Tensor]:
        return self.ema.state_dict(everywhere)

    def ema_module(self) -> nn.Module:
        """A plain model holding the gathered EMA (every rank takes part), for sampling monitors."""
        model = self.model_factory()
        model.load_state_dict(self.ema.state_dict(), strict=True)
        return model.eval().requires_grad_(False)

    # ------------------------------------------------------------------------------------------ checkpoints

    def checkpoint_state(self, directory: Path, name: str) -> dict[str, Any]:
        """Write DeepSpeed's native checkpoint (every rank) and return our part of the trainer state."""
        self.engine.save_checkpoint(str(directory / NATIVE_DIR), tag=name, save_latest=False)
        return {
            "engine": {"kind": self.kind, "dir": NATIVE_DIR, "tag": name, "zero_stage": self.zero_stage,
                       "world_size": self.env.world_size, "precision": self.config.train.precision},
            "ema": self.ema.state_dict(everywhere=False),  # only rank 0 writes the state file
        }

    def load_checkpoint_state(self, state: dict[str, Any], directory: Path) -> None:
        native, tag = deepspeed_location(directory, state["engine"], f"the checkpoint resumed from {directory}")
        # DeepSpeed reads its files with a full unpickler; restricted_loads makes those reads weights_only=True
        # with DeepSpeed's few checkpoint classes allowed, so a crafted file in the directory runs no code.
        with restricted_loads():
            load_dir = self._universal(native, tag, directory / UNIVERSAL_DIR) if self.universal else native
            path, _ = self.engine.load_checkpoint(str(load_dir), tag=tag, load_module_strict=True,
                                                  load_optimizer_states=True, load_lr_scheduler_states=False)
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint {tag!r} in {load_dir}")
        self.ema.load_state_dict(state["ema"])

    def _universal(self, native: Path, tag: str, root: Path) -> Path:
        """Convert ``native/tag`` to a universal checkpoint once (rank 0), atomically by rename."""
        target = root / tag
        if self.env.is_main and not target.is_dir():
            from deepspeed.checkpoint import ds_to_universal

            started = time.perf_counter()
            scratch = root / f".tmp-{tag}"
            shutil.rmtree(scratch, ignore_errors=True)
            argv = sys.argv
            sys.argv = ["ds_to_universal", "--input_folder", str(native / tag), "--output_folder", str(scratch),
                        "--num_extract_workers", "1", "--num_merge_workers", "1", "--inject_missing_state"]
            try:
                with contextlib.redirect_stdout(sys.stderr):
                    ds_to_universal.main(ds_to_universal.parse_arguments())
            finally:
                sys.argv = argv
            scratch.rename(target)
            print(f"converted {native / tag} to a universal checkpoint {target} in "
                  f"{time.perf_counter() - started:.1f}s (world size changed)", flush=True)
        dist.barrier()
        return root


def check_resumable(state: dict[str, Any], engine_kind: str, path: Path) -> None:
    """A checkpoint resumes under the engine that wrote it."""
    written = state.get("engine", {}).get("kind", "ddp")
    if written != engine_kind:
        hint = ("launch with `deepspeed train.py …` (or engine.kind=deepspeed)" if written == "deepspeed"
                else "launch with torchrun/python (or engine.kind=ddp)")
        raise ConfigError(f"{path} was written by the {written} engine, but this run uses the {engine_kind} engine: "
                          f"{hint}, or export it with `erw-export {path}` and start from the export")
