"""What a training checkpoint holds besides the engine's tensors, how the ranks write it together, how a run
resumes from it, and the reference-layout export of a finished run. File handling is in ``checkpoint.py``."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from erw_fast.atomic import TMP_PREFIX, fsync_dir
from erw_fast.checkpoint import (
    CHECKPOINT_SUBDIR,
    capture_rng_state,
    checkpoint_name,
    export_reference_checkpoint,
    export_safetensors,
    import_reference_checkpoint,
    latest_checkpoint,
    prune_engine_dirs,
    restore_rng_state,
    save_checkpoint,
)
from erw_fast.config import Config, ConfigError
from erw_fast.engines import Engine
from erw_fast.phases import Phase, WarmupPhase
from erw_fast.runtime import DistEnv


@dataclass
class PhaseStats:
    """What a phase has done so far (kept across resumes; the end-of-run summary table)."""

    name: str
    steps: int = 0
    images: int = 0
    wall_s: float = 0.0
    final_loss: float | None = None
    skipped: int = 0


@dataclass
class RunState:
    """The trainer's own state at a step boundary."""

    step: int
    phase: str
    stats: dict[str, PhaseStats]
    nonfinite_in_a_row: int
    data: dict[str, Any]  # the loader's position (plain data)


def _per_rank(env: DistEnv, own: Any) -> list[Any]:
    """``own`` of every rank (index = rank), gathered at checkpoint time."""
    if env.world_size == 1:
        return [own]
    gathered: list[Any] = [None] * env.world_size
    dist.all_gather_object(gathered, own)
    return gathered


def save_training_checkpoint(run: RunState, engine: Engine, config: Config, env: DistEnv,
                             tag: str | None = None) -> Path | None:
    """Every rank takes part (RNG gather, the engine's own files); rank 0 writes the state file, which is what
    marks the checkpoint complete. Returns its path on rank 0."""
    # Every rank's RNG state (the step's noise does not come from these streams, see erw_fast.randomness; they are
    # kept for anything else drawing from the global generators) and its count of replaced unreadable samples.
    rng, skipped = zip(*_per_rank(env, (capture_rng_state(), int(run.data.get("skipped", 0)))), strict=True)
    data = {**run.data, "skipped": sum(skipped), "skipped_per_rank": list(skipped)}
    run_dir = config.run_dir
    engine_state = engine.checkpoint_state(run_dir / CHECKPOINT_SUBDIR, checkpoint_name(run.step, tag))
    if env.world_size > 1:
        dist.barrier()  # every rank's engine files are complete before the state file marks the checkpoint
    path = None
    if env.is_main:
        state = {
            "step": run.step, "phase": run.phase, **engine_state, "rng": list(rng), "data": data,
            "nonfinite_in_a_row": run.nonfinite_in_a_row,
            "stats": {k: {f: v for f, v in asdict(s).items() if f != "name"} for k, s in run.stats.items()},
            "config": config.to_dict(), "world_size": env.world_size,
        }
        path = save_checkpoint(state, run_dir, run.step, config.checkpoint.keep_last, tag=tag)
        prune_engine_dirs(run_dir)
    if env.world_size > 1:
        dist.barrier()
    return path


def resume_source(config: Config) -> Path | None:
    """checkpoint.resume: none, auto (the run directory's latest complete checkpoint) or a path."""
    choice = config.checkpoint.resume
    if choice == "none":
        return None
    if choice == "auto":
        return latest_checkpoint(config.run_dir)
    return Path(choice)


def restore_run_state(state: dict[str, Any], env: DistEnv, config: Config,
                      log: Callable[[str], None]) -> RunState:
    """The trainer's state from a checkpoint; this rank's RNG state restored when the world size is unchanged."""
    rng = state["rng"]
    if len(rng) == env.world_size:
        restore_rng_state(rng[env.rank])
    else:
        # The step noise is drawn per global batch (erw_fast.randomness), so the run continues the same way on
        # any world size; only the global generators are re-seeded.
        torch.manual_seed(config.run.seed + env.rank)
        log(f"resume: checkpoint written with {len(rng)} rank(s), running with {env.world_size}")
    stats = {name: PhaseStats(name, **s) for name, s in state["stats"].items()}
    return RunState(int(state["step"]), state["phase"], stats, int(state["nonfinite_in_a_row"]), state["data"])


def restored_skip_count(data: dict[str, Any], env: DistEnv) -> int:
    """This rank's count of replaced unreadable samples at the checkpoint (on another world size rank 0 carries
    the total), so the counter goes on across resumes."""
    per_rank = data.get("skipped_per_rank")
    if per_rank is not None and len(per_rank) == env.world_size:
        return int(per_rank[env.rank])
    return int(data.get("skipped", 0)) if env.rank == 0 else 0


def reference_start(path: str | Path, phases: Sequence[Phase],
                    mode: str) -> tuple[Phase, dict[str, torch.Tensor], dict[str, torch.Tensor], int]:
    """(phase, weights, EMA, step) to start a run from a reference checkpoint. A warmup one (no final layer)
    ends the first phase; a full one starts the last phase (its EMA: the raw weights when it has none)."""
    ref = import_reference_checkpoint(path)
    weights = ref["model"]
    is_warmup = not any(k.startswith("final_layer.") for k in weights)
    aligned = [p for p in phases if not p.keeps_state]  # not the phase after the alignment stopped
    phase = phases[0] if is_warmup else aligned[-1]
    if is_warmup and not isinstance(phase, WarmupPhase):
        raise ConfigError(f"{path} is a warmup (Phase-1) checkpoint, but run.mode is {mode!r}")
    ema = ref["ema"] if ref["ema"] is not None else weights
    return phase, weights, ema, phase.end if is_warmup else phase.start


def reference_args(c: Config, z_dims: Sequence[int], phase: str = "full") -> dict[str, Any]:
    """The `args` of a reference-layout export: the reference's keys (what REPA/ERW's generate.py reads) and the
    whole architecture, so that the file alone rebuilds its model (``cli.loading`` reads them back). A warmup
    (Phase-1) export describes the Phase-1 model: its projectors read block ``erw.warmup_depth``. A REG model
    adds REG's train.py keys (``cls``: the class-token loss weight) and its class token's width."""
    kwargs = c.model.sit_kwargs(z_dims, alignment=c.alignment)
    warmup = phase == "warmup"
    reg = {"cls": c.reg.cls_weight, "cls_token_dim": z_dims[0]} if c.class_token_in(phase) and z_dims else {}
    from erw_fast.codecs import latent_source

    # The VAE and scale of the training latents (the manifest's), so erw-sample decodes an export copied away from
    # its dataset the way the latents were made.
    src = latent_source(c)
    latent = {"latent_vae": src.vae, "latent_scale": src.scale} if src.scale is not None else {}
    return {"model": c.model.name, "phase": phase,
            "encoder_depth": c.erw.warmup_depth if warmup else c.alignment.encoder_depth,
            "enc_type": ",".join(c.encoder.names), "proj_coeff": c.alignment.weight, "path_type": c.diffusion.path_type,
            "weighting": c.diffusion.time_weighting, "resolution": c.encoder.resolution,
            "projector_embed_dims": ",".join(map(str, z_dims)),
            **{k: kwargs[k] for k in ("depth", "hidden_size", "num_heads", "patch_size", "mlp_ratio", "input_size",
                                      "in_channels", "num_classes", "class_dropout_prob", "projector_dim",
                                      "qk_norm")},
            "use_rope": c.erw.warmup_rope if warmup else c.model.use_rope,
            **alignment_args(c),
            **({"l2r_depth": c.erw.warmup_depth, "warmup_loss_weight": c.erw.warmup_loss_weight} if warmup else {}),
            **reg, **latent}


def alignment_args(c: Config) -> dict[str, Any]:
    """iREPA's and U-REPA's settings under iREPA's argument names (projection_layer_type, proj_kwargs_kernel_size,
    spnorm_method, zscore_alpha) and this project's manifold_weight: what an export and a sample protocol say."""
    a = c.alignment
    return {"projection_layer_type": a.projector, "proj_kwargs_kernel_size": a.projector_kernel_size,
            "spnorm_method": "zscore" if a.target_norm == "spatial_zscore" else "none",
            "zscore_alpha": a.zscore_alpha, "manifold_weight": a.manifold_weight}


def _pid_alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def export_consolidated(model_state: dict[str, torch.Tensor], ema_state: dict[str, torch.Tensor],
                        args: dict[str, Any], step: int, out_dir: Path) -> list[Path]:
    """``{step}.pt`` = {model, ema, args, steps} (the reference layout) and the same weights as safetensors.

    All or nothing: the three files are written into a hidden temp directory beside them, then renamed into
    place, the ``.pt`` last; a failure on the way (a full disk) removes the temp directory and leaves no file of
    this export (an earlier export of the same step stays whole until the renames)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(f"{TMP_PREFIX}export-*"):  # a killed export's (its pid is in the name)
        if not _pid_alive(stale.name.split("-")[3]):
            shutil.rmtree(stale, ignore_errors=True)
    scratch = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}export-{step:07d}-{os.getpid()}-", dir=out_dir))
    try:
        pt = export_reference_checkpoint(model_state, ema_state, args, step, scratch)
        written = [export_safetensors(model_state, pt.with_suffix(".model.safetensors")),
                   export_safetensors(ema_state, pt.with_suffix(".ema.safetensors")), pt]
        for path in written:  # renames within one directory: nothing more is written
            os.replace(path, out_dir / path.name)
        fsync_dir(out_dir)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    final = out_dir / f"{step:07d}.pt"
    return [final, final.with_suffix(".model.safetensors"), final.with_suffix(".ema.safetensors")]


def export_final(engine: Engine, config: Config, env: DistEnv, z_dims: Sequence[int], phase: str,
                 step: int) -> list[Path]:
    """The run's final reference-layout export (every rank takes part in the gather under ZeRO; rank 0 writes it,
    all or nothing). Returns the paths on rank 0."""
    model_state = engine.full_model_state(everywhere=False)
    ema_state = engine.full_ema_state(everywhere=False)
    if not env.is_main:
        return []
    args = reference_args(config, z_dims, phase)
    return export_consolidated(model_state, ema_state, args, step, config.run_dir / "reference")
