"""What a resume may change, a rerun of a finished run, and a rollback to an older checkpoint.

**Changed settings.** Every checkpoint holds the config it was written with. A resume compares it with the new
one key by key; each difference is either honoured (and logged) or refused with one line naming the key and both
values. Nothing changes silently: before, a new ``optim.lr`` was overridden by the restored optimizer state while
``config.yaml`` said otherwise, a new seed or batch was accepted without a word, a new width failed with a size
mismatch traceback and another mode with a bare ``StopIteration``.

- Honoured (``HONOURED``): how the run is executed, logged and checkpointed, and the optimizer's settings. A new
  ``optim.lr``/``betas``/``weight_decay``/``eps`` is written into the restored optimizer's parameter groups
  (``apply_optimizer_settings``); ``grad_clip`` and ``ema_decay`` are read from the config each step.
  ``train.total_steps`` extends or shortens the run (ERW's λ is clamped at the last step, so the steps done are
  unaffected). ``data.kind`` may switch between ``webdataset`` and ``dali`` (the same batches), ``data.path`` may
  move (the dataset is assumed to be the same; its size is checked by the loader).
- Refused: everything else: what the model is (``model.*`` but the attention backend), what it learns from and
  how (``run.mode``, ``run.seed``, ``train.global_batch_size``, ``train.precision``, ``erw.*`` — warmup steps and
  depth —, ``alignment.*`` but the backend, ``encoder.names``/``resolution``/``pretrained``, ``diffusion.*``,
  ``reg.*``, the data's content). Keys added later default to refused. To change one, start a new run from the
  checkpoint's export (``checkpoint.init_from_reference``) or with ``checkpoint.resume=none``.

**A finished run** rerun (``resume: auto`` and the latest checkpoint at ``train.total_steps``) reports that it is
complete and exits 0 without rewriting its final checkpoint or its export (``checkpoint.reexport: true`` writes
the export again; a missing export is written).

**Rollback.** ``checkpoint.resume=<an older checkpoint of this run>`` starts a new branch: the checkpoints after it
(their DeepSpeed files, exports and metric records too) are moved to ``checkpoints/abandoned/<time>-after-<step>/``,
never deleted, and never resumed from by ``resume: auto``.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from erw_fast.checkpoint import CHECKPOINT_SUBDIR, ENGINE_SUBDIRS, list_checkpoints, load_checkpoint
from erw_fast.config import Config, ConfigError, flatten_dotted

# Keys (or sections, ending with '.') a resume may change. Everything else is refused.
HONOURED = (
    "run.name", "run.output_dir", "run.device", "logging.", "checkpoint.", "engine.",
    "optim.lr", "optim.betas", "optim.weight_decay", "optim.eps", "optim.grad_clip", "optim.ema_decay",
    "optim.implementation", "train.total_steps", "train.micro_batch_size", "train.tf32", "train.compile",
    "train.compile_scope", "train.compile_mode", "train.compile_backend", "train.max_nonfinite_steps",
    "train.max_steps_per_run", "model.attn_backend", "alignment.backend", "encoder.dtype", "encoder.compile",
    "encoder.weights_paths", "encoder.trust_torchscript", "data.path", "data.num_workers", "data.loader_threads",
    "data.prefetch", "data.pin_memory", "data.device_prefetch", "data.verify", "data.on_error", "data.dali_threads",
    "data.dali_decoder",
)
# Where to start and how long this invocation runs: not what is trained, and different from one job to the next.
_NOT_COMPARED = ("checkpoint.resume", "checkpoint.init_from_reference", "checkpoint.reexport",
                 "train.max_steps_per_run")
OPTIMIZER_KEYS = {"optim.lr": "lr", "optim.weight_decay": "weight_decay", "optim.eps": "eps", "optim.betas": "betas"}
_SHARD_KINDS = ("webdataset", "dali")


def _honoured(key: str, old: Any, new: Any) -> bool:
    if key == "data.kind":
        return old in _SHARD_KINDS and new in _SHARD_KINDS
    return any(key == h or (h.endswith(".") and key.startswith(h)) for h in HONOURED)


def config_changes(saved: dict[str, Any], config: Config) -> tuple[list[str], list[str]]:
    """(honoured, refused) differences between a checkpoint's config and this run's, one ``key: old → new`` each.
    A key missing from the saved config (added since) is not compared."""
    old, new = flatten_dotted(saved), flatten_dotted(config.to_dict())
    honoured, refused = [], []
    for key in sorted(old.keys() & new.keys()):
        if key in _NOT_COMPARED or old[key] == new[key]:
            continue
        if isinstance(old[key], list | tuple) and list(old[key]) == list(new[key]):
            continue
        line = f"{key}: {old[key]!r} → {new[key]!r}"
        (honoured if _honoured(key, old[key], new[key]) else refused).append(line)
    return honoured, refused


def check_resume_config(state: dict[str, Any], config: Config, source: Path, log: Callable[[str], None]) -> list[str]:
    """Refuse a resume that changes what is trained (ConfigError naming each key, old and new value); log and
    return the honoured changes."""
    saved = state.get("config")
    if not isinstance(saved, dict):
        return []
    honoured, refused = config_changes(saved, config)
    if refused:
        raise ConfigError(
            f"resume from {source}: the run was started with other settings that a resume cannot change: "
            + "; ".join(refused) + ". Use the checkpoint's values, or start a new run from it (its export via "
            "checkpoint.init_from_reference, or checkpoint.resume=none)")
    if honoured:
        log("resume with changed settings (honoured): " + "; ".join(honoured))
    return honoured


def load_resume_state(source: Path | None, config: Config, engine_kind: str, device: Any,
                      log: Callable[[str], None]) -> tuple[dict[str, Any] | None, list[str]]:
    """(the checkpoint's state, the honoured changes) to resume from ``source``; (None, []) for a fresh start.
    Refuses another engine's checkpoint and refused settings before anything is built or written."""
    if source is None:
        return None, []
    from erw_fast.engines.deepspeed_engine import check_resumable

    state = load_checkpoint(source, map_location=device)
    check_resumable(state, engine_kind, source)
    return state, check_resume_config(state, config, source, log)


def _param_groups(engine: Any) -> list[dict[str, Any]]:
    optimizer = getattr(engine, "optimizer", None)
    if optimizer is None:  # DeepSpeed: its ZeRO/bf16 wrapper exposes the base optimizer's groups
        optimizer = engine.engine.optimizer
    return optimizer.param_groups


def apply_optimizer_settings(engine: Any, config: Config, honoured: Iterable[str]) -> None:
    """Write the new optim.lr/betas/weight_decay/eps into the restored optimizer (its state dict brought back the
    old values)."""
    keys = {line.split(":", 1)[0] for line in honoured} & OPTIMIZER_KEYS.keys()
    for group in _param_groups(engine) if keys else []:
        for key in keys:
            value = getattr(config.optim, OPTIMIZER_KEYS[key])
            group[OPTIMIZER_KEYS[key]] = tuple(value) if key == "optim.betas" else value


# ------------------------------------------------------------------------------------------------ finished runs


def finished_run(config: Config, source: Path | None, phases: Sequence[Any], world_size: int,
                 log: Callable[[str], None]) -> dict[str, Any] | None:
    """The phase stats of a finished run, after saying it is complete and printing its summary: the checkpoint to
    resume from is at the last step and its export is there (or not wanted). None when there is something to do:
    training, or an export that is missing or asked for again (checkpoint.reexport)."""
    step = _step_of(source) if source is not None else None
    if step is None or step < phases[-1].end:
        return None
    c = config.checkpoint
    exported = all(p.is_file() for p in export_paths(config.run_dir, step))
    if c.export_reference and phases[-1].exported and (c.reexport or not exported):
        return None  # resumed at the last step: the final checkpoint is not rewritten, the export is
    from erw_fast.checkpoint_state import PhaseStats
    from erw_fast.reporting import report_run

    state = load_checkpoint(source)
    stats = {name: PhaseStats(name, **s) for name, s in state["stats"].items()}
    log(f"run {config.run.name} is already complete: {source} is at step {step} of train.total_steps="
        f"{config.train.total_steps}" + (f", exported as {export_paths(config.run_dir, step)[0]}" if exported else "")
        + "; nothing to do (raise train.total_steps to train on; checkpoint.reexport=true writes the export again)")
    ordered = [stats[p.name] for p in phases if p.name in stats]
    for line in report_run(config, ordered, world_size, plot=False):
        log(line)
    return stats


def export_paths(run_dir: Path, step: int) -> list[Path]:
    pt = run_dir / "reference" / f"{step:07d}.pt"
    return [pt, pt.with_suffix(".model.safetensors"), pt.with_suffix(".ema.safetensors")]


# ------------------------------------------------------------------------------------------------ rollback


def _step_of(path: Path) -> int | None:
    from erw_fast.checkpoint import _parse_name

    parsed = _parse_name(path)
    return parsed[0] if parsed is not None else None


def branch_from(config: Config, source: Path | None, log: Callable[[str], None]) -> Path | None:
    """A resume from an older checkpoint of this run while newer ones exist: move those (with their DeepSpeed
    files, the exports after the step and the metric records after it) to ``checkpoints/abandoned/…``. Starting
    over (``resume: none``, or from a reference checkpoint) where checkpoints exist moves all of them. Returns that
    directory, None when nothing is newer. Rank 0 only, before training."""
    run_dir = config.run_dir
    step = _step_of(source) if source is not None else -1
    if step is None:
        return None
    directory = run_dir / CHECKPOINT_SUBDIR
    newer = [p for p in list_checkpoints(run_dir) if (source is None or p.resolve() != source.resolve())
             and (_step_of(p) or 0) > step]
    if source is None and not newer:
        return None  # a fresh run directory (or one killed before its first checkpoint): nothing to keep
    exports = [p for p in (run_dir / "reference").glob("*") if p.name[:7].isdigit() and int(p.name[:7]) > step] \
        if (run_dir / "reference").is_dir() else []
    if not newer and not exports:
        return None
    aside = directory / "abandoned" / f"{time.strftime('%Y%m%d-%H%M%S')}-after-{max(step, 0):07d}"
    aside.mkdir(parents=True, exist_ok=False)
    for path in newer:
        for sub in ENGINE_SUBDIRS:
            engine_files = directory / sub / path.stem
            if engine_files.exists():
                (aside / sub).mkdir(exist_ok=True)
                shutil.move(str(engine_files), aside / sub / path.stem)
        path.rename(aside / path.name)
    for path in exports:
        (aside / "reference").mkdir(exist_ok=True)
        path.rename(aside / "reference" / path.name)
    _move_records(run_dir / "metrics.jsonl", aside / "metrics.jsonl", step)
    start = f"resuming from {source.name} (step {step})" if source is not None else "starting over"
    log(f"rollback: {start} starts a new branch; the {len(newer)} newer checkpoint(s)"
        f"{' and exports' if exports else ''} of the abandoned one were moved to {aside} (kept, never resumed from "
        "by checkpoint.resume=auto). Rerun with checkpoint.resume=auto to continue this branch")
    return aside


def _move_records(metrics: Path, target: Path, step: int) -> None:
    """Copy the records after ``step`` (which the resumed run drops from metrics.jsonl) beside the abandoned
    checkpoints."""
    if not metrics.is_file():
        return
    kept = []
    for line in metrics.read_text().splitlines():
        try:
            if json.loads(line).get("step", -1) > step:
                kept.append(line)
        except (json.JSONDecodeError, AttributeError):
            continue
    if kept:
        from erw_fast.atomic import atomic_write_text

        atomic_write_text(target, "".join(f"{line}\n" for line in kept))
