"""The training loop and the run's lifecycle: the phases in order (an engine per phase, the hand-over between
them), data, logging, checkpoints, stop signals and the final export.

What one step computes is in ``step.py`` (``TrainStep``) and ``phases.py`` (each phase's model and loss).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

import torch
import torch.distributed as dist
import yaml
from torch import nn

from erw_fast.checkpoint import CHECKPOINT_SUBDIR, checkpoint_name, load_checkpoint
from erw_fast.checkpoint_state import (
    PhaseStats,
    RunState,
    export_final,
    reference_start,
    restore_run_state,
    restored_skip_count,
    resume_source,
    save_training_checkpoint,
)
from erw_fast.config import Config, ConfigError, dump_config, load_config
from erw_fast.data.device_prefetch import describe_device_prefetch
from erw_fast.encoders.teacher import Teacher, encoder_widths, load_teacher, target_norm
from erw_fast.engines import Engine, build_engine, select_engine
from erw_fast.metrics import LogWindow, MetricsWriter, global_means
from erw_fast.models import describe_attention_backend
from erw_fast.monitor import TrainingMonitor
from erw_fast.objectives import resolve_alignment_backend
from erw_fast.phases import Phase, plan_phases
from erw_fast.reporting import log_line, progress_bar, report_run, run_eta_s, use_progress_bar
from erw_fast.resume_checks import apply_optimizer_settings, branch_from, finished_run, load_resume_state
from erw_fast.run_lock import run_dir_lock
from erw_fast.runtime import DistEnv, init_runtime, set_tf32
from erw_fast.step import BatchPlan, TrainStep
from erw_fast.stop_signals import LauncherWatch, StopSignals


class NonFiniteLossError(RuntimeError):
    @classmethod
    def at(cls, step: int, streak: int, last: dict[str, float], limit: int, run_dir: Any) -> NonFiniteLossError:
        return cls(f"step {step}: {streak} non-finite steps in a row (last loss {last.get('loss')}, grad norm "
                   f"{last.get('grad_norm')}); aborting as configured by train.max_nonfinite_steps={limit}. The last "
                   f"good checkpoint is in {run_dir / 'checkpoints'}")


class StopRun(Exception):  # noqa: N818 (control flow, not an error)
    """The run stops early with a checkpoint: train.max_steps_per_run reached, or a stop signal arrived."""

    def __init__(self, message: str, step: int, exit_code: int = 0) -> None:
        super().__init__(message)
        self.step, self.exit_code = step, exit_code


class Trainer:
    def __init__(self, config: Config, env: DistEnv | None = None, log_stream: TextIO | None = None,
                 engine: str | None = None, engine_reason: str | None = None) -> None:
        self.config = c = config
        kind, reason = select_engine(config)  # main() passes what the launcher says; else engine.kind decides
        self.engine_kind = engine or kind
        self.engine_reason = engine_reason or (reason if engine is None else "chosen by the caller")
        self.env = env or init_runtime(c.run.device)
        self.device = self.env.device
        self.out = log_stream
        self.run_dir = c.run_dir
        self.batch = BatchPlan.derive(c, self.env.world_size)
        self.teacher = Teacher(target_norm=target_norm(c.alignment))  # its encoders are loaded in run()
        backend = resolve_alignment_backend(c.alignment.backend, torch.empty(0, device=self.device))
        self.phases = plan_phases(c, self.teacher, backend)
        self.phase: Phase = self.phases[0]
        self.train_step = TrainStep.for_run(c, self.batch, self.env)
        self.attn_backend = c.model.attn_backend  # "measure" is resolved in run()
        self.stats: dict[str, PhaseStats] = {}
        self.nonfinite_in_a_row = 0
        self.stop_exit_code = 0
        self._stop_signals = StopSignals(c.checkpoint.stop_signals, LauncherWatch())  # and the launcher's death
        self._saved_step: int | None = None  # the step of the last checkpoint written by this process
        self.engine: Engine | None = None  # built per phase
        self.engine_build_s = 0.0
        self.model: nn.Module | None = None
        self.loader: Any = None  # built in run(), at the resume step
        self.monitor: TrainingMonitor | None = None
        self._steps_left: int | None = None  # train.max_steps_per_run, counted down
        self._skips_at_resume = 0  # this rank's replaced unreadable samples before this invocation

    def log(self, message: str) -> None:
        if self.env.is_main:
            print(message, file=self.out or sys.stdout, flush=True)

    # --------------------------------------------------------------------------------------- components

    def _build_loader(self, start_step: int, data: Any = None, **placement: Any):
        from erw_fast.data.loaders import build_loader

        c = self.config
        where = {"global_batch_size": self.batch.global_batch, "rank": self.env.rank,
                 "world_size": self.env.world_size, **placement}
        aligned = self._phase_at(start_step).aligns  # none after the alignment stopped: no images, no features
        if not aligned and data is None:
            data = dataclasses.replace(c.data, features=False)
        return build_loader(data or c.data, seed=c.run.seed, start_step=start_step, device=self.device,
                            num_classes=c.model.num_classes,
                            images=c.run.mode != "sit" and not c.data.features and aligned,
                            latent_size=c.model.input_size, latent_channels=c.model.in_channels, **where)

    def _phase_at(self, step: int) -> Phase:
        """The phase that runs step ``step`` (the last one at or past the end)."""
        return next((p for p in self.phases if p.start <= step < p.end), self.phases[-1])

    def _held_out_batch(self, n: int) -> dict[str, torch.Tensor]:
        """The monitors' fixed batch: the data order's first n samples, read in this process and released."""
        data = dataclasses.replace(self.config.data, num_workers=0, loader_threads=0, device_prefetch=False)
        with self._build_loader(0, data, rank=0, world_size=1, global_batch_size=n) as loader:
            return next(loader)

    def _new_model(self, phase: Phase) -> nn.Module:
        kwargs = self.config.model.sit_kwargs(self.teacher.z_dims, self.attn_backend, self.config.alignment)
        return phase.build_model(kwargs).to(self.device)

    def _enter_phase(self, phase: Phase, model: nn.Module, resume_info: dict[str, Any] | None = None) -> None:
        self.phase = phase
        n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        started = time.perf_counter()
        self.engine = build_engine(self.engine_kind, model, self.config, self.env, self.batch,
                                   lambda: self._new_model(phase), resume_info)
        self.engine_build_s = time.perf_counter() - started
        self.model = self.engine.module
        self.stats.setdefault(phase.name, PhaseStats(phase.name))
        self.log(f"phase {phase.name}: steps [{phase.start}, {phase.end}), {type(model).__name__} with "
                 f"{len(model.blocks)} blocks, {n_params / 1e6:.2f}M trainable parameters, attention "
                 f"{describe_attention_backend(model.attention_backend)}, {phase.describe(self.device)}")
        self.log(f"engine: {self.engine.describe()} ({self.engine_reason}; built in {self.engine_build_s:.2f}s)")
        if self.engine_kind == "deepspeed":
            self.log(f"DeepSpeed config (generated + merged): {self.run_dir / 'deepspeed_config.json'}")

    def _hand_over(self, phase: Phase) -> None:
        """The previous phase's weights (fp32 masters, gathered under ZeRO) seed the next phase's model; the
        previous optimizer state is dropped and the engine rebuilt. Into a phase that keeps the state (the
        alignment stopped): ``_stop_alignment``."""
        if phase.keeps_state:
            self._stop_alignment(phase)
            return
        started = time.perf_counter()
        weights = self.engine.full_model_state()
        self.engine.close()
        model = self._new_model(phase)
        report = self.phase.carry_into(weights, model)
        self._enter_phase(phase, model)
        if report is not None:
            self.log(f"ERW transfer at step {phase.start}: {report.summary()} (weights gathered, engine rebuilt for "
                     f"the {phase.name} model: {time.perf_counter() - started:.2f}s)")

    def _stop_alignment(self, phase: Phase) -> None:
        """Every alignment weight is 0 from ``phase.start`` = E on: continue in ``phase`` (no teacher, projector,
        attention capture or images) with the same weights, optimizer state, EMA and counters. They travel through
        the checkpoint at E, restored as a resume restores it, so a run resumed across E is the same run."""
        step = phase.start
        path = self.run_dir / CHECKPOINT_SUBDIR / f"{checkpoint_name(step)}.pt"
        self.log(f"alignment weights are 0 from step {step} on: teacher, projector, attention capture and image "
                 f"decode switched off; model, optimizer state and EMA carried over through {path.name}")
        if self._saved_step != step:
            self._save(step)
        state = load_checkpoint(path, map_location=self.device)
        self.engine.close()
        self._enter_phase(phase, self._new_model(phase), resume_info=state.get("engine"))
        self.engine.load_checkpoint_state(state, path.parent)
        del state
        skipped = self.loader.position(step)["skipped"]
        self.loader.close()
        self.loader = self._build_loader(step)  # without images from here on
        self.loader.restore_skip_count(skipped)
        self._release_teacher()

    def _load_teacher(self, state: dict[str, Any] | None) -> Teacher:
        """The run's encoders; none when it resumes after its alignment stopped and no monitor calls them (the
        projector widths then come from the encoder registry)."""
        c = self.config
        resumed = next((p for p in self.phases if state is not None and p.name == state["phase"]), None)
        if resumed is not None and resumed.keeps_state and not c.logging.cknna_every:
            self.log("teacher: not loaded (the run resumes after its alignment stopped)")
            return Teacher(dims=encoder_widths(c))
        return load_teacher(c, self.device, c.model.num_tokens(), self.log)

    def _release_teacher(self) -> None:
        """After the alignment stopped nothing calls the teacher but the CKNNA monitor: without it, free it."""
        if self.config.logging.cknna_every or not self.teacher.encoders:
            return
        self.teacher.release()
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.log("teacher released: its encoders are not called after the alignment stopped")

    # --------------------------------------------------------------------------------------- checkpoints

    def _check_nonfinite(self, step: int) -> None:
        """Fold the device-side skip counters into the stats (one host read); abort after
        train.max_nonfinite_steps non-finite steps in a row."""
        streak, skips = self.train_step.skips.read()
        self.stats[self.phase.name].skipped += skips
        self.nonfinite_in_a_row = streak
        limit = self.config.train.max_nonfinite_steps
        if streak >= limit:
            last = {k: float(self.train_step.last[k]) for k in ("loss", "grad_norm") if k in self.train_step.last}
            raise NonFiniteLossError.at(step, streak, last, limit, self.run_dir)

    def _save(self, step: int, tag: str | None = None) -> None:
        self._check_nonfinite(step)
        run = RunState(step, self.phase.name, self.stats, self.nonfinite_in_a_row, self.loader.position(step))
        path = save_training_checkpoint(run, self.engine, self.config, self.env, tag)
        if path is not None:
            self.log(f"checkpoint: {path}")
        if tag is None:  # a tagged one (the Phase-1 export) is not the resume point of this step
            self._saved_step = step

    def _restore(self, source: Any, state: dict[str, Any], honoured: list[str]) -> int:
        phase = next(p for p in self.phases if p.name == state["phase"])
        self._enter_phase(phase, self._new_model(phase), resume_info=state.get("engine"))
        self.engine.load_checkpoint_state(state, source.parent)
        apply_optimizer_settings(self.engine, self.config, honoured)  # e.g. a new optim.lr, over the restored one
        run = restore_run_state(state, self.env, self.config, self.log)
        self.stats.update(run.stats)
        self.nonfinite_in_a_row, self._saved_step = run.nonfinite_in_a_row, run.step  # its checkpoint exists
        self.train_step.skips.streak.fill_(run.nonfinite_in_a_row)
        self._skips_at_resume = restored_skip_count(run.data, self.env)
        self.log(f"resumed from {source} at step {run.step} (phase {phase.name})")
        return run.step

    def _init_from_reference(self, path: str) -> int:
        """Start from a reference checkpoint: a warmup one (no final layer) as if the warmup had just ended."""
        phase, weights, ema, step = reference_start(path, self.phases, self.config.run.mode)
        model = self._new_model(phase)
        model.load_state_dict(weights, strict=True)  # before the engine takes (and may partition) the weights
        self._enter_phase(phase, model)
        self.engine.ema.load_state_dict(ema)
        kind = "Phase 1" if step == phase.end else "full model"
        self.log(f"initialised from reference checkpoint {path} ({kind})")
        return step

    # --------------------------------------------------------------------------------------- the run

    def run(self) -> dict[str, PhaseStats]:
        """The run, holding its directory (rank 0 locks it; a second trainer on it is refused)."""
        with run_dir_lock(self.run_dir, self.env.rank, self.env.world_size, self.log):
            return self._run()

    def _run(self) -> dict[str, PhaseStats]:
        c = self.config
        torch.manual_seed(c.run.seed + self.env.rank)
        set_tf32(c.train.tf32)
        source = resume_source(c)
        if (done := finished_run(c, source, self.phases, self.env.world_size, self.log)) is not None:
            self.stats.update(done)  # complete: said so, nothing rewritten (checkpoint.reexport to export again)
            return self.stats
        state, honoured = load_resume_state(source, c, self.engine_kind, self.device, self.log)  # or refused
        self.log("resolved config:\n" + yaml.safe_dump(c.to_dict(), sort_keys=False))
        b = self.batch
        self.log(f"batch: global {b.global_batch} = {self.env.world_size} device(s) × {b.local_batch} per device = "
                 f"{b.micro_batch} per micro-batch × {b.accumulation} accumulation step(s); device {self.device}; "
                 f"engine {self.engine_kind} ({self.engine_reason})")
        self.teacher.replace_with(self._load_teacher(state))
        if self.attn_backend == "measure":
            from erw_fast.models.attention_select import measured_backend_for_run

            self.attn_backend = measured_backend_for_run(c.model.sit_kwargs(), b.micro_batch, c.train.precision,
                                                         self.device, self.env.world_size, self.log,
                                                         extra_tokens=int(c.run.class_token))
        if source is not None:
            step = self._restore(source, state, honoured)
            del state
        elif c.checkpoint.init_from_reference:
            step = self._init_from_reference(c.checkpoint.init_from_reference)
        else:
            step = 0
            self._enter_phase(self.phases[0], self._new_model(self.phases[0]))
        if self.env.is_main:  # the resume holds (a refused one, or an engine that refuses it, changed nothing)
            branch_from(c, source, self.log)  # a rollback (or over): newer checkpoints moved aside, kept
            dump_config(c, self.run_dir / "config.yaml")  # atomic
        # Before the loader: a tracker that cannot start (no W&B login) is a config error, not a leaked loader.
        metrics = MetricsWriter.for_run(c, step) if self.env.is_main else None  # + TensorBoard / W&B
        try:
            self.loader = self._build_loader(step)
        except BaseException:
            if metrics is not None:  # a shard error: the trackers' files and W&B run are closed, not left open
                metrics.close()
            raise
        self.loader.restore_skip_count(self._skips_at_resume)
        self.monitor = TrainingMonitor(c, self.run_dir, self.device, self._held_out_batch)
        from erw_fast.data.loaders import resolve_num_workers

        d = c.data
        workers = "" if d.kind == "demo" else f"; {resolve_num_workers(d.num_workers, d.loader_threads)[1]}"
        self.log(f"data: {c.data.kind} ({self.loader.num_samples} samples, {self.loader.steps_per_epoch} steps per "
                 f"epoch), starting at {self.loader.position(step)}; {describe_device_prefetch(self.loader)}{workers}")
        self._steps_left = c.train.max_steps_per_run
        # Handled through the final save and export too: a signal then is noted, and the run still completes.
        with self._stop_signals:
            self.log(self._stop_signals.describe())
            try:
                for phase in self.phases:
                    if step >= phase.end:
                        continue
                    if phase is not self.phase:
                        self._hand_over(phase)
                    step = self._run_phase(phase, step, metrics)
                    if phase.end_tag is not None:
                        self._save(step, tag=phase.end_tag)
            except StopRun as stop:
                self.stop_exit_code = stop.exit_code
                self.log(f"{stop}: stopped at step {stop.step} with a checkpoint; rerun the same command to resume")
                return self.stats
            finally:
                self.loader.close()
                if metrics is not None:
                    metrics.close()
            self._finish(step)
        return self.stats

    def _run_phase(self, phase: Phase, step: int, metrics: MetricsWriter | None) -> int:
        c = self.config
        stats = self.stats[phase.name]
        index = next(i for i, p in enumerate(self.phases) if p is phase)
        if metrics is not None and index > 0 and step == phase.start:  # the switch step itself, not the next log
            metrics.phase_switch(step, self.phases[index - 1].name, phase.name, index)
        # A bar on a terminal; in a log file (SLURM) or with logging.progress off, one plain line per logging step.
        bar = self.env.is_main and use_progress_bar(c.logging.progress, sys.stderr, self.out or sys.stdout)
        progress = progress_bar(phase, step) if bar else None
        self.model.train()
        window = LogWindow(self.batch.global_batch)
        while step < phase.end:
            stop = self._stop_signals.due(self.env.world_size)
            if self._steps_left == 0 or stop is not None:
                if progress is not None:
                    progress.close()
                if self._saved_step != step:  # e.g. a periodic checkpoint just written: the grace period is short
                    self._save(step)
                if stop is not None:
                    raise StopRun(self._stop_signals.reason(), step, self._stop_signals.exit_code)
                raise StopRun(f"train.max_steps_per_run={c.train.max_steps_per_run} steps ran", step)
            t0 = time.perf_counter()
            batch = next(self.loader)
            window.data_s += time.perf_counter() - t0
            totals = self.train_step(self.engine, phase, step, batch)
            step, window.steps = step + 1, window.steps + 1
            stats.steps, stats.images = stats.steps + 1, stats.images + self.batch.global_batch
            if step % c.logging.log_every == 0 or step == phase.end:
                self._check_nonfinite(step)
                elapsed, rates = window.close(self.device)
                stats.wall_s += elapsed
                means = global_means(totals, self.env.world_size, self.device, self._stop_signals)
                record = {"step": step, "phase": phase.name, "phase_index": index, **means, "lr": self.engine.lr(),
                          **rates}
                stats.final_loss = record["loss"]
                if metrics is not None:
                    metrics.write(record)
                if progress is not None:
                    progress.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['img_per_s']:.0f}")
                else:
                    eta = run_eta_s(c, self.phases, index, step, record["step_time_s"], self.env.world_size)
                    self.log(log_line(record, self.phases[-1].end, eta))
            if progress is not None:
                progress.update(1)
            if self._steps_left is not None:
                self._steps_left -= 1
            if phase.monitored and self.monitor.due(step):
                ema_model = self.engine.ema_module()  # every rank takes part (a gather under ZeRO)
                if self.env.is_main:  # one writer for the sample grids and monitor.jsonl
                    result = self.monitor(step, ema_model, self.teacher.encoders, self.log, sink=metrics)
                    if result:
                        self.log(f"monitor at step {step}: {result}")
            if step % c.checkpoint.every == 0 and step < phase.end:
                self._save(step)
        if progress is not None:
            progress.close()
        return step

    def _finish(self, step: int) -> None:
        c = self.config
        if self._saved_step != step:  # not when the run resumed from its final checkpoint (to export it again)
            self._save(step)
        if c.checkpoint.export_reference and self.phase.exported:  # all or nothing; gathered under ZeRO
            paths = export_final(self.engine, c, self.env, self.teacher.z_dims, self.phase.name, step)
            self.log(f"reference-layout export: {', '.join(str(p) for p in paths)}")
        if self.env.is_main:  # in phase order, whichever phase a resume restored first
            for line in report_run(c, [self.stats[p.name] for p in self.phases if p.name in self.stats],
                                   self.env.world_size):
                self.log(line)


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
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error, not one line")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        overrides = list(args.overrides)
        if args.deepspeed_config:
            overrides.append(f"engine.deepspeed_config={args.deepspeed_config}")
        config = load_config(args.config, overrides)
        from erw_fast.preflight import preflight

        preflight(config)  # every cheap check of the config against this machine, before anything is built
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
        # A rank aborted in teardown after complete runs ("terminate called without an active exception"): the
        # DDP reducer holds the process group, so destroying the group alone left its gloo threads to interpreter
        # finalization (the mechanism in pytorch/pytorch#179291). Release them, meet, then destroy the group.
        del trainer
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
    return exit_code
