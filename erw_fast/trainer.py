"""The training loop for ERW (warmup → full in one run), REPA and plain SiT.

One global step counter s runs over the whole run. In ERW mode, steps [0, W) are Phase 1 (the Phase-1 model,
alignment only, t = 0) and [W, S) Phase 2 (the full model, diffusion + λ(s)·alignment); at s = W the
Phase-1 weights are transferred automatically and the Phase-1 optimizer state is dropped.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch
import torch.distributed as dist
from torch import nn

from erw_fast.checkpoint import (
    CHECKPOINT_SUBDIR,
    capture_rng_state,
    checkpoint_name,
    export_reference_checkpoint,
    export_safetensors,
    import_reference_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    prune_engine_dirs,
    restore_rng_state,
    save_checkpoint,
)
from erw_fast.config import Config, ConfigError, dump_config, load_config
from erw_fast.data.device_prefetch import describe_device_prefetch
from erw_fast.engines import Engine, LocalEngine, select_engine
from erw_fast.metrics import MetricsWriter
from erw_fast.models import SiT, SiTPhase1, describe_attention_backend, transfer_phase1_weights
from erw_fast.models.sit import parse_model_name, sit_config
from erw_fast.monitor import TrainingMonitor
from erw_fast.objectives import (
    AlignmentObjective,
    ConstantLambda,
    ERWLambdaSchedule,
    Interpolant,
    diffusion_loss,
    erw_c0_preset,
    phase1_loss,
    resolve_alignment_backend,
)
from erw_fast.randomness import GlobalBatchRandomness, StepDraw
from erw_fast.runtime import DistEnv, autocast_context, init_runtime, set_tf32
from erw_fast.stop_signals import StopSignals

WARMUP, FULL = "warmup", "full"


class NonFiniteLossError(RuntimeError):
    pass


class StepBudgetReached(Exception):
    """train.max_steps_per_run steps ran in this invocation; a checkpoint was written."""


class StopRequested(Exception):
    """One of checkpoint.stop_signals arrived; the ranks stopped at the same step, a checkpoint was written."""

    def __init__(self, signal_name: str, step: int) -> None:
        super().__init__(f"{signal_name} received")
        self.step = step


@dataclass
class Phase:
    name: str  # warmup | full | repa | sit
    start: int
    end: int

    @property
    def aligns(self) -> bool:
        return self.name != "sit"


def plan_phases(config: Config) -> list[Phase]:
    total = config.train.total_steps
    if config.run.mode == "erw":
        return [Phase(WARMUP, 0, config.erw.warmup_steps), Phase(FULL, config.erw.warmup_steps, total)]
    return [Phase(config.run.mode, 0, total)]


@dataclass
class BatchPlan:
    """Global batch → per-device batch → micro-batches (gradient accumulation)."""

    global_batch: int
    local_batch: int
    micro_batch: int
    accumulation: int

    @classmethod
    def derive(cls, config: Config, world_size: int) -> BatchPlan:
        global_batch = config.train.global_batch_size
        if global_batch % world_size:
            raise ConfigError(
                f"train.global_batch_size ({global_batch}) is not divisible by the world size {world_size}"
            )
        local = global_batch // world_size
        micro = config.train.micro_batch_size or local
        if local % micro:
            raise ConfigError(f"train.micro_batch_size ({micro}) does not divide the per-device batch {local}")
        return cls(global_batch, local, micro, local // micro)


@dataclass
class PhaseStats:
    name: str
    steps: int = 0
    images: int = 0
    wall_s: float = 0.0
    final_loss: float | None = None
    skipped: int = 0


def model_kwargs(config: Config, z_dims: Sequence[int], attn_backend: str | None = None) -> dict[str, Any]:
    m = config.model
    overrides = {k: getattr(m, k) for k in ("depth", "hidden_size", "num_heads", "patch_size") if getattr(m, k)}
    return sit_config(
        m.name, input_size=m.input_size, in_channels=m.in_channels, num_classes=m.num_classes,
        class_dropout_prob=m.class_dropout_prob, projector_dim=m.projector_dim, qk_norm=m.qk_norm,
        use_rope=m.use_rope, attn_backend=attn_backend or m.attn_backend, mlp_ratio=m.mlp_ratio,
        z_dims=list(z_dims), **overrides,
    )


class Trainer:
    def __init__(self, config: Config, env: DistEnv | None = None, log_stream: TextIO | None = None,
                 engine: str | None = None, engine_reason: str | None = None) -> None:
        self.config = config
        # main() passes what the launcher tells it; otherwise engine.kind decides (auto → DDP / one process).
        kind, reason = select_engine(config)
        self.engine_kind, self.engine_reason = engine or kind, engine_reason or (reason if engine is None
                                                                                 else "chosen by the caller")
        self.env = env or init_runtime(config.run.device)
        self.device = self.env.device
        self.out = log_stream
        self.run_dir = config.run_dir
        self.batch = BatchPlan.derive(config, self.env.world_size)
        self.phases = plan_phases(config)
        self._stop_signals = StopSignals(config.checkpoint.stop_signals)
        self._saved_step: int | None = None  # the step of the last checkpoint written by this process
        self.interpolant = Interpolant(config.diffusion.path_type)
        align = config.alignment
        backend = resolve_alignment_backend(align.backend, torch.empty(0, device=self.device))
        self.alignment = AlignmentObjective(
            align.objective, align.temperature, align.negatives, align.symmetric, backend
        )
        self.lam = self._lambda_schedule()
        m = config.model
        self.randomness = GlobalBatchRandomness(
            seed=config.run.seed, global_batch=self.batch.global_batch,
            latent_shape=(m.in_channels, m.input_size, m.input_size), class_dropout_prob=m.class_dropout_prob,
            interpolant=self.interpolant, time_weighting=config.diffusion.time_weighting, device=self.device)
        self.stats: dict[str, PhaseStats] = {}
        self.nonfinite_in_a_row = 0
        # Device-side skip counters (no host sync in the step), read at logging steps and before checkpoints.
        self._streak = torch.zeros((), dtype=torch.int64, device=self.device)
        self._skips = torch.zeros((), dtype=torch.int64, device=self.device)
        self._last_totals: dict[str, torch.Tensor] = {}
        self.model: nn.Module | None = None
        self.attn_backend = config.model.attn_backend  # "measure" is resolved in run()

    # --------------------------------------------------------------------------------------- setup

    def log(self, message: str) -> None:
        if self.env.is_main:
            print(message, file=self.out or sys.stdout, flush=True)

    def _lambda_schedule(self):
        c = self.config
        if c.run.mode == "erw":
            c0 = c.erw.c0 if c.erw.c0 is not None else erw_c0_preset(c.model.name)
            return ERWLambdaSchedule(c0, c.erw.warmup_steps, c.train.total_steps, c.erw.half_life)
        return ConstantLambda(c.alignment.weight if c.run.mode == "repa" else 0.0)

    def _build_loader(self, start_step: int, **overrides: Any):
        from erw_fast.data.loaders import build_loader

        c = self.config
        kwargs: dict[str, Any] = dict(
            global_batch_size=self.batch.global_batch, seed=c.run.seed, rank=self.env.rank,
            world_size=self.env.world_size, num_workers=c.data.num_workers, loader_threads=c.data.loader_threads,
            start_step=start_step,
            device=self.device, flip=c.data.flip, on_error=c.data.on_error, image_size=c.data.image_size,
            num_classes=c.model.num_classes, images=c.run.mode != "sit" and not c.data.features,
            features=c.data.features, prefetch=c.data.prefetch, pin_memory=c.data.pin_memory, verify=c.data.verify,
            latent_scale=c.data.latent_scale, latent_size=c.model.input_size, latent_channels=c.model.in_channels,
            dali_threads=c.data.dali_threads, dali_decoder=c.data.dali_decoder, demo_num_samples=c.data.num_samples,
            device_prefetch=self.device.type == "cuda" if c.data.device_prefetch is None else c.data.device_prefetch,
        )
        kwargs.update(overrides)
        return build_loader(c.data.kind, c.data.path, **kwargs)

    def _held_out_batch(self, n: int) -> dict[str, torch.Tensor]:
        """The monitors' fixed batch: the data order's first n samples, read in this process and released."""
        with self._build_loader(0, rank=0, world_size=1, global_batch_size=n, num_workers=0, loader_threads=0,
                                device_prefetch=False) as loader:
            return next(loader)

    def _build_encoders(self) -> None:
        self.encoders: list[nn.Module] = []
        if self.config.run.mode == "sit":
            return
        from erw_fast.encoders import check_token_count, load_encoders

        enc = self.config.encoder
        if enc.resolution != self.config.data.image_size:
            raise ConfigError(
                f"encoder.resolution ({enc.resolution}) must equal the image size the data provides "
                f"(data.image_size = {self.config.data.image_size})"
            )
        # Randomly initialised encoders (pretrained: false) must be identical on every rank and after a
        # resume, so they are drawn from a fixed seed, outside the training RNG stream.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.run.seed + 7919)
            self.encoders = load_encoders(
                enc.names, resolution=enc.resolution, pretrained=enc.pretrained,
                weights_paths=enc.weights_paths or None, device=self.device,
                dtype=torch.bfloat16 if enc.dtype == "bf16" else torch.float32,
            )
        if enc.compile:
            from erw_fast.compile import compile_model

            t = self.config.train
            for encoder in self.encoders:
                compile_model(encoder.model, "blocks", t.compile_mode, t.compile_backend)
        sit_tokens = (self.config.model.input_size // (self.config.model.patch_size or
                                                        parse_model_name(self.config.model.name)[1])) ** 2
        for encoder in self.encoders:
            self.log(f"encoder: {encoder!r}")
            check_token_count(encoder.num_patches(), sit_tokens, encoder.name)

    def _resolve_attention(self) -> None:
        """attn_backend=measure: time every available backend at this run's shape (micro-batch, heads, tokens,
        head dim, dtype) and use the fastest correct one; rank 0 decides for all ranks."""
        if self.attn_backend != "measure":
            return
        from erw_fast.models.attention_select import choose_attention_backend, measure_attention_backends, timing_table

        kwargs = model_kwargs(self.config, [], attn_backend="math")
        heads, hidden = kwargs["num_heads"], kwargs["hidden_size"]
        tokens = (self.config.model.input_size // kwargs["patch_size"]) ** 2
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[self.config.train.precision]
        timings = measure_attention_backends(self.batch.micro_batch, heads, tokens, hidden // heads, dtype,
                                             self.device)
        choice = [choose_attention_backend(timings)]
        if self.env.world_size > 1:
            dist.broadcast_object_list(choice, src=0)
        self.attn_backend = choice[0]
        self.log(f"attention measured at batch {self.batch.micro_batch} × {heads} heads × {tokens} tokens × head dim "
                 f"{hidden // heads}, {dtype}:\n{timing_table(timings, self.attn_backend)}")

    def _z_dims(self) -> list[int]:
        return [int(e.embed_dim) for e in self.encoders]  # plain SiT: no projectors

    def _new_model(self, phase: Phase) -> nn.Module:
        kwargs = model_kwargs(self.config, self._z_dims(), self.attn_backend)
        if phase.name == WARMUP:
            model = SiTPhase1(self.config.erw.warmup_depth, **kwargs)
        else:
            model = SiT(encoder_depth=self.config.alignment.encoder_depth, **kwargs)
        return model.to(self.device)

    def _build_engine(self, phase: Phase, model: nn.Module, resume_info: dict[str, Any] | None = None) -> Engine:
        b = self.batch
        if self.engine_kind == "deepspeed":
            from erw_fast.engines.deepspeed_engine import DeepSpeedEngine

            return DeepSpeedEngine(model, self.config, self.env, global_batch=b.global_batch,
                                   micro_batch=b.micro_batch, accumulation=b.accumulation,
                                   model_factory=lambda: self._new_model(phase), resume_info=resume_info)
        return LocalEngine(model, self.config, self.env, b.accumulation)

    def _enter_phase(self, phase: Phase, model: nn.Module, resume_info: dict[str, Any] | None = None) -> None:
        self.phase = phase
        n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        started = time.perf_counter()
        self.engine = self._build_engine(phase, model, resume_info)
        self.engine_build_s = time.perf_counter() - started
        self.model = self.engine.module
        self.stats.setdefault(phase.name, PhaseStats(phase.name))
        self.log(
            f"phase {phase.name}: steps [{phase.start}, {phase.end}), {type(model).__name__} with "
            f"{len(model.blocks)} blocks, {n_params / 1e6:.2f}M trainable parameters, attention "
            f"{describe_attention_backend(model.attention_backend)}, alignment "
            f"{self.alignment.objective}/{self.alignment.backend if phase.aligns else '-'}{self._kernel_tiles(phase)}"
        )
        self.log(f"engine: {self.engine.describe()} ({self.engine_reason}; built in {self.engine_build_s:.2f}s)")
        ds_config = getattr(self.engine, "ds_config", None)
        if ds_config is not None and self.env.is_main:  # what DeepSpeed ran with, after merging the user's JSON
            path = self.run_dir / "deepspeed_config.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(ds_config, indent=2) + "\n")
            self.log(f"DeepSpeed config (generated + merged): {path}")

    def _kernel_tiles(self, phase: Phase) -> str:
        """' (<form>; <tile source>)' when this phase runs the Triton NT-Xent kernels, else ''."""
        if not (phase.aligns and self.alignment.objective == "nt_xent" and self.alignment.backend == "triton"):
            return ""
        from erw_fast.kernels.tiles import describe_tiles

        # The teacher's features are frozen: the one-sided loss takes the kernels' one-pass form.
        form = "two passes (symmetric)" if self.alignment.symmetric else "one pass, frozen teacher"
        return f" ({form}; {describe_tiles(self.device)})"

    # --------------------------------------------------------------------------------------- checkpoints

    def _rng_states(self) -> list[dict[str, Any]]:
        """Every rank's RNG state (index = rank). The step's noise does not come from these streams (see
        erw_fast.randomness); they are kept for anything else that draws from the global generators."""
        own = capture_rng_state()
        if self.env.world_size == 1:
            return [own]
        gathered: list[Any] = [None] * self.env.world_size
        dist.all_gather_object(gathered, own)
        return gathered

    def _state(self, step: int, rng: list[dict[str, Any]], engine_state: dict[str, Any]) -> dict[str, Any]:
        return {
            "step": step,
            "phase": self.phase.name,
            **engine_state,
            "rng": rng,
            "data": self.loader.position(step),
            "nonfinite_in_a_row": self.nonfinite_in_a_row,
            "stats": {k: {"steps": s.steps, "images": s.images, "wall_s": s.wall_s, "final_loss": s.final_loss,
                          "skipped": s.skipped} for k, s in self.stats.items()},
            "config": self.config.to_dict(),
            "world_size": self.env.world_size,
        }

    def _save(self, step: int, tag: str | None = None) -> None:
        self._check_nonfinite(step)
        rng = self._rng_states()  # collective: every rank takes part
        directory = self.run_dir / CHECKPOINT_SUBDIR
        engine_state = self.engine.checkpoint_state(directory, checkpoint_name(step, tag))  # collective too
        if self.env.world_size > 1:
            dist.barrier()  # every rank's engine files are complete before the state file marks the checkpoint
        if self.env.is_main:
            keep = self.config.checkpoint.keep_last
            path = save_checkpoint(self._state(step, rng, engine_state), self.run_dir, step, keep, tag=tag)
            prune_engine_dirs(self.run_dir)
            self.log(f"checkpoint: {path}")
        if self.env.world_size > 1:
            dist.barrier()
        if tag is None:  # a tagged one (the Phase-1 export) is not the resume point of this step
            self._saved_step = step

    def _resume_source(self) -> Path | None:
        choice = self.config.checkpoint.resume
        if choice == "none":
            return None
        if choice == "auto":
            return latest_checkpoint(self.run_dir)
        return Path(choice)

    def _restore(self, state: dict[str, Any], source: Path) -> int:
        from erw_fast.engines.deepspeed_engine import check_resumable

        check_resumable(state, self.engine_kind, source)
        step = int(state["step"])
        phase = next(p for p in self.phases if p.name == state["phase"])
        self._enter_phase(phase, self._new_model(phase), resume_info=state.get("engine"))
        self.engine.load_checkpoint_state(state, source.parent)
        self.nonfinite_in_a_row = int(state["nonfinite_in_a_row"])
        self._streak.fill_(self.nonfinite_in_a_row)
        for name, s in state["stats"].items():
            self.stats[name] = PhaseStats(name, s["steps"], s["images"], s["wall_s"], s["final_loss"], s["skipped"])
        rng = state["rng"]
        if len(rng) == self.env.world_size:
            restore_rng_state(rng[self.env.rank])
        else:
            # The step noise is drawn per global batch (erw_fast.randomness), so the run continues the same way
            # on any world size; only the global generators are re-seeded.
            torch.manual_seed(self.config.run.seed + self.env.rank)
            self.log(f"resume: checkpoint written with {len(rng)} rank(s), running with {self.env.world_size}")
        return step

    def _init_from_reference(self, path: str) -> int:
        """Start from a reference checkpoint: a warmup one (no final layer) becomes Phase 1."""
        ref = import_reference_checkpoint(path)
        weights = ref["model"]
        is_warmup = not any(k.startswith("final_layer.") for k in weights)
        phase = self.phases[0] if is_warmup else self.phases[-1]
        if is_warmup and phase.name != WARMUP:
            raise ConfigError(f"{path} is a warmup (Phase-1) checkpoint, but run.mode is {self.config.run.mode!r}")
        model = self._new_model(phase)
        model.load_state_dict(weights, strict=True)  # before the engine takes (and may partition) the weights
        self._enter_phase(phase, model)
        self.engine.ema.load_state_dict(ref["ema"] if ref["ema"] is not None else weights)
        step = phase.end if is_warmup else phase.start
        self.log(f"initialised from reference checkpoint {path} ({'Phase 1' if is_warmup else 'full model'})")
        return step

    # --------------------------------------------------------------------------------------- the step

    def _micro_batch_loss(
        self, batch: dict[str, torch.Tensor], sl: slice, lam: float, draw: StepDraw
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        c = self.config
        latents, labels = batch["latents"][sl], batch["labels"][sl]
        model = self.engine.forward_module
        with autocast_context(c.train.precision, self.device):
            feats = None
            if self.phase.aligns:
                if "features" in batch:  # precomputed teacher features (one encoder)
                    feats = [batch["features"][sl]]
                else:
                    with torch.no_grad():
                        feats = [encoder(batch["images"][sl].float()) for encoder in self.encoders]
            if self.phase.name == WARMUP:
                loss = phase1_loss(model, latents, labels, feats, self.alignment,
                                   legacy_warmup_loss=c.erw.legacy_warmup_loss, force_drop_ids=draw.drop_labels)
                return loss, {"loss": loss, "loss_align": loss}
            out = diffusion_loss(
                model, latents, labels, self.interpolant, encoder_features=feats,
                alignment=self.alignment if self.phase.aligns else None, alignment_weight=lam,
                t=draw.t.to(latents.dtype), noise=draw.noise.to(latents.dtype), force_drop_ids=draw.drop_labels,
            )
        parts = {"loss": out.loss, "loss_diffusion": out.diffusion}
        if out.alignment is not None:
            parts["loss_align"] = out.alignment
        return out.loss, parts

    def _step(self, step: int, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        lam = self.lam(step)
        totals: dict[str, torch.Tensor] = {}
        b = self.batch
        # This rank's rows of the step's global-batch draw (the sampler gives rank r the r-th slice).
        draw = self.randomness.draw(step, self.env.rank * b.local_batch, b.local_batch)
        for start in range(0, b.local_batch, b.micro_batch):
            sl = slice(start, start + b.micro_batch)
            with self.engine.micro_batch(last=start + b.micro_batch >= b.local_batch):
                loss, parts = self._micro_batch_loss(batch, sl, lam, draw.rows(sl))
                self.engine.backward(loss)
            for key, value in parts.items():
                totals[key] = totals.get(key, 0) + value.detach() / b.accumulation
        outcome = self.engine.step(totals["loss"])
        skipped = ~torch.as_tensor(outcome.applied, device=self.device)
        self._streak = (self._streak + 1) * skipped
        self._skips += skipped
        totals["skipped"] = skipped.float()
        totals["grad_norm"] = outcome.grad_norm
        totals["lambda"] = torch.tensor(lam if self.phase.aligns and self.phase.name != WARMUP else float("nan"))
        self._last_totals = totals
        return totals

    def _check_nonfinite(self, step: int) -> None:
        """Fold the device-side skip counters into the stats (one host read) and abort after
        train.max_nonfinite_steps non-finite steps in a row. Runs at logging steps, checkpoints and phase ends."""
        streak, skips = torch.stack([self._streak, self._skips]).tolist()
        self._skips.zero_()
        self.stats[self.phase.name].skipped += skips
        self.nonfinite_in_a_row = streak
        limit = self.config.train.max_nonfinite_steps
        if streak >= limit:
            last = {k: float(self._last_totals[k]) for k in ("loss", "grad_norm") if k in self._last_totals}
            raise NonFiniteLossError(
                f"step {step}: {streak} non-finite steps in a row (last loss {last.get('loss')}, grad norm "
                f"{last.get('grad_norm')}); aborting as configured by train.max_nonfinite_steps={limit}. The last "
                f"good checkpoint is in {self.run_dir / 'checkpoints'}"
            )

    # --------------------------------------------------------------------------------------- the run

    def _switch_to_full(self, phase: Phase) -> None:
        started = time.perf_counter()
        # The Phase-1 weights as the engine holds them (fp32 masters; gathered under ZeRO), in a plain model.
        phase1_model = self._new_model(self.phase)
        phase1_model.load_state_dict(self.engine.full_model_state(), strict=True)
        assert isinstance(phase1_model, SiTPhase1)
        self.engine.close()  # the Phase-1 optimizer state is dropped
        full = self._new_model(phase)
        report = transfer_phase1_weights(phase1_model, full, include_projectors=self.config.erw.reuse_projector)
        self._enter_phase(phase, full)
        self.log(f"ERW transfer at step {phase.start}: {report.summary()} (Phase-1 weights gathered, engine "
                 f"rebuilt for the full model: {time.perf_counter() - started:.2f}s)")
        self.transfer_report = report

    def run(self) -> dict[str, PhaseStats]:
        c = self.config
        torch.manual_seed(c.run.seed + self.env.rank)
        set_tf32(c.train.tf32)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.env.is_main:
            dump_config(c, self.run_dir / "config.yaml")
            self.log("resolved config:\n" + (self.run_dir / "config.yaml").read_text())
        self.log(
            f"batch: global {self.batch.global_batch} = {self.env.world_size} device(s) × "
            f"{self.batch.local_batch} per device = {self.batch.micro_batch} per micro-batch × "
            f"{self.batch.accumulation} accumulation step(s); device {self.device}; engine {self.engine_kind} "
            f"({self.engine_reason})"
        )
        self._build_encoders()
        self._resolve_attention()

        source = self._resume_source()
        if source is not None:
            step = self._restore(load_checkpoint(source, map_location=self.device), source)
            self.log(f"resumed from {source} at step {step} (phase {self.phase.name})")
        elif c.checkpoint.init_from_reference:
            step = self._init_from_reference(c.checkpoint.init_from_reference)
        else:
            step = 0
            first = self.phases[0]
            self._enter_phase(first, self._new_model(first))

        self.loader = self._build_loader(step)
        self.monitor = TrainingMonitor(c, self.run_dir, self.device, self._held_out_batch)
        self.log(f"data: {c.data.kind} ({self.loader.num_samples} samples, {self.loader.steps_per_epoch} steps per "
                 f"epoch), starting at {self.loader.position(step)}; {describe_device_prefetch(self.loader)}")
        metrics = None
        if self.env.is_main:
            metrics = MetricsWriter(
                self.run_dir / "metrics.jsonl", resume_step=step,
                tensorboard_dir=self.run_dir / "tb" if c.logging.tensorboard else None,
                wandb_project=c.logging.wandb_project if c.logging.wandb else None, run_name=c.run.name,
                config=c.to_dict(),
            )
        self._steps_left = c.train.max_steps_per_run
        self.stop_exit_code = 0
        # Handled through the final save and export too: a signal then is noted, and the run still completes.
        with self._stop_signals:
            self.log(self._stop_signals.describe())
            try:
                step = self._train(step, metrics)
            except StepBudgetReached:
                self.log(f"stopped after train.max_steps_per_run={c.train.max_steps_per_run} steps; rerun the "
                         "same command to resume")
                return self.stats
            except StopRequested as stop:
                self.stop_exit_code = self._stop_signals.exit_code
                self.log(f"{stop}: stopped at step {stop.step} with a checkpoint; rerun the same command to resume")
                return self.stats
            finally:
                self.loader.close()
                if metrics is not None:
                    metrics.close()
            self._finish(step)
        return self.stats

    def _train(self, step: int, metrics: MetricsWriter | None) -> int:
        for phase in self.phases:
            if step >= phase.end:
                continue
            if phase.name == FULL and self.phase.name == WARMUP:
                self._switch_to_full(phase)
            step = self._run_phase(phase, step, metrics)
            if phase.name == WARMUP:
                self._save(step, tag="phase1")
        return step

    def _run_phase(self, phase: Phase, step: int, metrics: MetricsWriter | None) -> int:
        c = self.config
        stats = self.stats[phase.name]
        progress = None
        if self.env.is_main and c.logging.progress:
            from tqdm import tqdm

            progress = tqdm(total=phase.end - phase.start, initial=step - phase.start, desc=phase.name,
                            unit="step", dynamic_ncols=True, file=sys.stderr)
        self.model.train()
        window_start, window_images, data_time = time.perf_counter(), 0, 0.0
        while step < phase.end:
            stop = self._stop_signals.due(self.env.world_size)
            if self._steps_left == 0 or stop is not None:
                if progress is not None:
                    progress.close()
                if self._saved_step != step:  # e.g. a periodic checkpoint just written: the grace period is short
                    self._save(step)
                if stop is not None:
                    raise StopRequested(stop.name, step)
                raise StepBudgetReached()
            t0 = time.perf_counter()
            batch = next(self.loader)
            data_time += time.perf_counter() - t0
            totals = self._step(step, batch)
            step += 1
            stats.steps += 1
            stats.images += self.batch.global_batch
            window_images += self.batch.global_batch
            if step % c.logging.log_every == 0 or step == phase.end:
                self._check_nonfinite(step)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                elapsed = time.perf_counter() - window_start
                stats.wall_s += elapsed
                record = {"step": step, "phase": phase.name, **self._global_means(totals),
                          "lr": self.engine.lr(), "img_per_s": window_images / elapsed,
                          "step_time_s": elapsed / max(window_images // self.batch.global_batch, 1),
                          "data_time_s": data_time / max(window_images // self.batch.global_batch, 1)}
                stats.final_loss = record["loss"]
                if metrics is not None:
                    metrics.write(record)
                if progress is not None:
                    progress.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['img_per_s']:.0f}")
                window_start, window_images, data_time = time.perf_counter(), 0, 0.0
            if progress is not None:
                progress.update(1)
            if self._steps_left is not None:
                self._steps_left -= 1
            if self.phase.name != WARMUP and self.monitor.due(step):
                ema_model = self.engine.ema_module()  # every rank takes part (a gather under ZeRO)
                if self.env.is_main:  # one writer for the sample grids and monitor.jsonl
                    result = self.monitor(step, ema_model, self.encoders)
                    if result:
                        self.log(f"monitor at step {step}: {result}")
            if step % c.checkpoint.every == 0 and step < phase.end:
                self._save(step)
        if progress is not None:
            progress.close()
        return step

    def _global_means(self, totals: dict[str, torch.Tensor]) -> dict[str, float]:
        """The logged values are means over the global batch (one all-reduce, at logging steps only), so a
        run logs the same numbers on any world size. The same all-reduce carries whether any rank received a
        stop signal, so all ranks stop at the same step boundary."""
        n = len(totals)
        values = torch.stack([v.detach().float().to(self.device).reshape(()) for v in totals.values()])
        if self.env.world_size > 1:
            packed = torch.cat([values, torch.tensor(self._stop_signals.votes(), device=self.device)])
            dist.all_reduce(packed)
            values = torch.cat([packed[:n] / self.env.world_size, packed[n:]])
        flat = values.tolist()  # one host sync
        if self.env.world_size > 1:
            self._stop_signals.agree(flat[n:])
        return dict(zip(totals, flat[:n], strict=True))

    def _finish(self, step: int) -> None:
        c = self.config
        self._save(step)
        export = c.checkpoint.export_reference and self.phase.name != WARMUP
        if export:  # gathered from every rank under ZeRO
            model_state = self.engine.full_model_state(everywhere=False)
            ema_state = self.engine.full_ema_state(everywhere=False)
        if self.env.is_main and export:
            paths = export_consolidated(model_state, ema_state, reference_args(c, self._z_dims()), step,
                                        self.run_dir / "reference")
            self.log(f"reference-layout export: {', '.join(str(p) for p in paths)}")
        if self.env.is_main:
            self._report()

    def _report(self) -> None:
        from erw_fast.flops import gflops_per_step
        from erw_fast.reporting import phase_summary_table, plot_loss_curves, read_metrics

        rows = [{"phase": s.name, "steps": s.steps, "images": s.images, "wall_s": s.wall_s,
                 "img_per_s": s.images / s.wall_s if s.wall_s else 0.0, "final_loss": s.final_loss,
                 "gflops_per_step": gflops_per_step(self.config, s.name, self.env.world_size)}
                for s in self.stats.values() if s.steps]
        self.log(phase_summary_table(rows))
        skipped = sum(s.skipped for s in self.stats.values())
        if skipped:
            self.log(f"non-finite steps skipped: {skipped}")
        if self.config.logging.plot:
            png = plot_loss_curves(read_metrics(self.run_dir / "metrics.jsonl"), self.run_dir / "loss_curves.png",
                                   title=f"{self.config.run.name}: {self.config.model.name} ({self.config.run.mode})")
            self.log(f"loss curves: {png}")


def reference_args(c: Config, z_dims: Sequence[int]) -> dict[str, Any]:
    """The `args` of a reference-layout checkpoint (what REPA/ERW's generate.py reads)."""
    return {"model": c.model.name, "encoder_depth": c.alignment.encoder_depth, "enc_type": ",".join(c.encoder.names),
            "proj_coeff": c.alignment.weight, "path_type": c.diffusion.path_type,
            "weighting": c.diffusion.time_weighting, "resolution": c.encoder.resolution,
            "num_classes": c.model.num_classes, "projector_embed_dims": ",".join(map(str, z_dims)),
            "qk_norm": c.model.qk_norm, "use_rope": c.model.use_rope}


def export_consolidated(model_state: dict[str, torch.Tensor], ema_state: dict[str, torch.Tensor],
                        args: dict[str, Any], step: int, out_dir: Path) -> list[Path]:
    """``{step}.pt`` = {model, ema, args, steps} (the reference layout) and the same weights as safetensors."""
    path = export_reference_checkpoint(model_state, ema_state, args, step, out_dir)
    return [path, export_safetensors(model_state, path.with_suffix(".model.safetensors")),
            export_safetensors(ema_state, path.with_suffix(".ema.safetensors"))]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train SiT with ERW / REPA / plain diffusion.")
    parser.add_argument("--config", type=str, default=None, help="YAML config (see configs/)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.total_steps=1000")
    # Set by the `deepspeed` launcher (which also selects the DeepSpeed engine); the device is taken from the
    # LOCAL_RANK environment variable.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--deepspeed", action="store_true", help="use the DeepSpeed engine")
    parser.add_argument("--deepspeed_config", "--deepspeed-config", type=str, default=None,
                        help="a DeepSpeed JSON merged into the generated one (implies the DeepSpeed engine)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        overrides = list(args.overrides)
        if args.deepspeed_config:
            overrides.append(f"engine.deepspeed_config={args.deepspeed_config}")
        config = load_config(args.config, overrides)
        # The deepspeed launcher passes --local_rank (unless --no_local_rank) and always sets CROSS_RANK.
        launched_by_deepspeed = args.local_rank is not None or "CROSS_RANK" in os.environ
        engine, reason = select_engine(config, deepspeed_flag=args.deepspeed, deepspeed_launcher=launched_by_deepspeed)
        trainer = Trainer(config, engine=engine, engine_reason=reason)
        trainer.run()
        exit_code = trainer.stop_exit_code
    except ConfigError as error:
        if int(os.environ.get("RANK", "0")) == 0:  # every rank finds the same problem; say it once
            print(f"config error: {error}", file=sys.stderr)
        return 2
    if dist.is_initialized():
        # A rank aborted in teardown after complete runs, twice in CI under load ("terminate called without an
        # active exception", exit -6; not reproduced in isolation). Likely cause (the mechanism described in
        # pytorch/pytorch#179291): the model's DDP reducer holds the process group, so destroying the group
        # alone left its gloo threads and their last work items to interpreter finalization. Release them
        # first, then meet (rank 0's final export included) and destroy the group while the interpreter is whole.
        del trainer
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
    return exit_code
