"""Pre-flight: every cheap check of a run's config against this machine, before anything heavy happens.

``trainer.main`` calls ``preflight(config)`` right after the config is loaded and validated (types, cross-field
rules and numeric ranges are ``config.validate``'s), before the config dump, the run directory, the encoders,
the model and the engine. What it checks needs no model: the run directory's place, the device, the batch split,
the optional packages the enabled features import, the dataset's manifest against the model's shapes, the
encoders' names and files, the monitors' resources, the DeepSpeed JSON merge and the checkpoint paths. A bad
config used to fail after 5–22 s of setup (minutes at XL) with a traceback and a run directory left behind.

Every problem found is reported, each as one line ``config error: <key>: <why> (<what to do>)``; ``main`` exits
with 2 and nothing has been written.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path, PurePath

import torch

from erw_fast.config import Config, ConfigError
from erw_fast.monitor import check_monitor_resources

__all__ = ["preflight", "problems"]


class _Problem(ConfigError):
    def __init__(self, key: str, why: str, fix: str) -> None:
        super().__init__(f"{key}: {why} ({fix})")


def _one_line(error: Exception) -> str:
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip())


def _installed(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it (a missing parent package counts as missing)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


# ------------------------------------------------------------------------------------------------ the checks


def _run_dir(c: Config) -> None:
    name, out = c.run.name, Path(c.run.output_dir)
    parts = PurePath(name).parts
    if not name.strip() or PurePath(name).is_absolute() or ".." in parts or all(p == "." for p in parts):
        raise _Problem("run.name", f"{name!r} does not name a directory inside run.output_dir ({out})",
                       "use a plain name such as 'erw-xl2'; subdirectories such as 'ablations/a1' are fine")
    for key, path in (("run.output_dir", out), ("run.name", c.run_dir)):
        if path.exists() and not path.is_dir():
            raise _Problem(key, f"{path} exists and is not a directory", "choose another run.output_dir/run.name")
    existing = next(p for p in (c.run_dir, *c.run_dir.parents) if p.exists())  # '.' exists at the latest
    if not os.access(existing, os.W_OK | os.X_OK):
        raise _Problem("run.output_dir", f"{existing} is not writable", "choose a directory you can write to")


def _device(c: Config) -> torch.device:
    """The device this rank will train on, checked against what the machine has."""
    spec = c.run.device
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise _Problem("run.device", f"{spec!r} is not a device", "use auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise _Problem("run.device", f"{spec!r}: only cpu and cuda devices are supported", "use auto, cpu or cuda")
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise _Problem("run.device", f"{spec} requested, but there is no usable CUDA device (torch "
                       f"{torch.__version__}, {build})", "use run.device=cpu, or auto to take a GPU when there is one")
    index = device.index if device.index is not None else int(os.environ.get("LOCAL_RANK", "0"))
    if index >= torch.cuda.device_count():
        raise _Problem("run.device", f"GPU {index} requested, but this machine has {torch.cuda.device_count()}",
                       "use run.device=cuda (each rank takes GPU LOCAL_RANK)")
    return device


def _batch(c: Config) -> None:
    """The split step.BatchPlan makes at the start of the run."""
    world, global_batch = _world_size(), c.train.global_batch_size
    if global_batch % world:
        raise _Problem("train.global_batch_size", f"{global_batch} is not divisible by the world size {world}",
                       f"use a multiple of {world}")
    local = global_batch // world
    micro = c.train.micro_batch_size or local
    if local % micro:
        raise _Problem("train.micro_batch_size", f"{micro} does not divide the per-device batch {local}",
                       "use a divisor of it, or leave it unset for no accumulation")


def _packages(c: Config) -> None:
    """The optional packages of the features this config enables (imported only when the feature first runs)."""
    aligns = c.run.mode != "sit"
    wanted = [  # (enabled, module, key, what needs it, how to install it)
        (c.logging.tensorboard, "tensorboard", "logging.tensorboard", "TensorBoard logging",
         "pip install 'erw-fast[tb]'"),
        (c.logging.wandb, "wandb", "logging.wandb", "W&B logging", "pip install 'erw-fast[wandb]'"),
        (c.data.kind == "dali", "nvidia.dali", "data.kind", "the DALI loader", "pip install nvidia-dali-cuda120"),
        (aligns and c.alignment.backend == "triton", "triton", "alignment.backend", "the Triton alignment backend",
         "pip install triton"),
        (c.engine.kind == "deepspeed" or bool(c.engine.deepspeed_config), "deepspeed", "engine.kind",
         "the DeepSpeed engine", "pip install deepspeed"),
        (aligns, "timm", "encoder.names", "the teacher", "pip install 'erw-fast[encoders]'"),
        (c.logging.plot, "matplotlib", "logging.plot", "the loss-curve plot", "pip install matplotlib"),
        (c.logging.sample_every > 0, "matplotlib", "logging.sample_every", "the sample-grid monitor",
         "pip install matplotlib"),
    ]
    for enabled, module, key, what, install in wanted:
        if enabled and not _installed(module):
            raise _Problem(key, f"{what} needs the {module} package, which is not installed",
                           f"{install}, or change {key}")


def _alignment_backend(c: Config) -> None:
    """What objectives.triton_kernels_usable will require (asked here without touching a GPU)."""
    if c.run.mode == "sit" or c.alignment.backend != "triton":
        return
    if _device(c).type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise _Problem("alignment.backend", "the Triton kernels run on CUDA devices (or on the CPU under "
                       "TRITON_INTERPRET=1, for tests)", "use alignment.backend=auto or torch here")


def _dataset_size(c: Config) -> int | None:
    """Samples in the run's dataset (the demo's configured size, or the manifest's); None if unreadable."""
    if c.data.kind == "demo":
        return c.data.num_samples
    from erw_fast.data.shards import DataError, Manifest

    try:
        return Manifest.load(c.data.path).num_samples if c.data.path else None
    except DataError:
        return None  # reported by _data


def _data(c: Config) -> None:
    d, m = c.data, c.model
    global_batch = c.train.global_batch_size
    if d.kind == "demo":
        for key, on in (("data.flip", d.flip), ("data.features", d.features)):
            if on:
                raise _Problem(key, "the demo dataset has no flipped moments or precomputed features",
                               f"set {key}=false, or train on prepared shards")
        if d.num_samples < global_batch:
            raise _Problem("data.num_samples", f"{d.num_samples} samples cannot fill one global batch of "
                           f"{global_batch}", "raise data.num_samples or lower train.global_batch_size")
        return
    if d.kind == "dali" and d.dali_decoder == "mixed" and _device(c).type != "cuda":
        raise _Problem("data.dali_decoder", "the mixed (GPU) decoder needs CUDA", "use data.dali_decoder=auto")
    from erw_fast.data.shards import DataError, Manifest

    if not d.path:
        raise _Problem("data.path", f"data.kind={d.kind} reads prepared shards, but data.path is not set",
                       "set data.path to the directory erw-prepare wrote, or use data.kind=demo")
    root = Path(d.path)
    if not root.is_dir():
        raise _Problem("data.path", f"{root} does not exist or is not a directory",
                       "point data.path at the directory erw-prepare wrote (it holds manifest.json)")
    try:
        man = Manifest.load(root)
    except DataError as error:
        raise _Problem("data.path", _one_line(error), "rerun erw-prepare on it, or point data.path elsewhere") from None
    where = root / "manifest.json"
    c2, h, w = man.moments_shape
    mismatch = (_features_mismatch(c, man.features, str(where))
                if d.features and man.features is not None and c.run.mode != "sit" else None)
    mismatches = [
        ("data.image_size", d.image_size != man.image_size,
         f"{d.image_size}, but {where} holds {man.image_size} px images", f"set data.image_size={man.image_size}"),
        ("model.input_size", (h, w) != (m.input_size, m.input_size),
         f"{m.input_size}, but {where} holds {h}x{w} latents", f"set model.input_size={h}"),
        ("model.in_channels", c2 // 2 != m.in_channels,
         f"{m.in_channels}, but {where} holds latents of {c2 // 2} channels", f"set model.in_channels={c2 // 2}"),
        ("model.num_classes", man.num_classes > m.num_classes,
         f"{m.num_classes}, but {where} has {man.num_classes} classes", f"set model.num_classes={man.num_classes}"),
        ("data.latent_scale", d.latent_scale is not None and abs(man.scaling_factor - d.latent_scale) > 1e-9,
         f"{d.latent_scale}, but {where} was encoded with scaling factor {man.scaling_factor}",
         "leave data.latent_scale unset to take the manifest's"),
        ("data.flip", d.flip and not man.flip_moments, f"true, but {root} was prepared without flipped moments",
         "rerun erw-prepare with --flip-moments, or set data.flip=false"),
        ("data.features", d.features and man.features is None, f"true, but {root} has no precomputed features",
         "set data.features=false"),
        ("data.features", d.features and c.run.class_token and man.features is not None
         and not man.features.get("cls_token"), f"true, but {root}'s features hold no CLS token (run.mode="
         f"{c.run.mode} needs it)", "rerun erw-prepare with --encoder-cls-token, or set data.features=false"),
        ("encoder.names", mismatch is not None, mismatch,
         "use the encoder settings the features were prepared with, or set data.features=false"),
        ("train.global_batch_size", man.num_samples < global_batch,
         f"{global_batch} is more than the {man.num_samples} samples of {root}", "use a smaller global batch"),
    ]
    for key, wrong, why, fix in mismatches:
        if wrong:
            raise _Problem(key, why, fix)
    if m.num_classes > man.num_classes:  # legal (unused label rows), but REPA sets them equal: say so once
        _warn(f"model.num_classes={m.num_classes}, but {where} has {man.num_classes} classes: "
              f"{m.num_classes - man.num_classes} label embeddings are never trained")


def _features_mismatch(c: Config, features: dict, where: str) -> str | None:
    from erw_fast.encoders.teacher import features_mismatch

    try:
        return features_mismatch(c, features, where)
    except ValueError:  # an unknown encoder name: _encoders says so
        return None


def _warn(message: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"warning: {message}", file=sys.stderr, flush=True)


def _encoders(c: Config) -> None:
    if c.run.mode == "sit":
        return
    from erw_fast.encoders import check_token_count
    from erw_fast.encoders.registry import check_resolution, get_encoder_spec

    e = c.encoder
    if e.resolution != c.data.image_size:
        raise _Problem("encoder.resolution", f"{e.resolution}, but the data provides {c.data.image_size} px images",
                       f"set encoder.resolution={c.data.image_size}")
    for name in e.names:
        for part in (p.strip() for p in name.split(",") if p.strip().lower() not in ("", "none")):
            try:
                spec = get_encoder_spec(part)
            except ValueError as error:
                raise _Problem("encoder.names", _one_line(error), "use one of the names listed") from None
            try:
                check_resolution(e.resolution, spec.base_resolution)
            except ValueError as error:
                raise _Problem("encoder.resolution", _one_line(error), f"{spec.name} needs such a size") from None
            if not c.data.features:
                try:
                    check_token_count(spec.num_patches(e.resolution), c.model.num_tokens(), spec.name)
                except ValueError as error:
                    raise _Problem("encoder.names", _one_line(error), "change model.patch_size, model.input_size "
                                   "or encoder.resolution") from None
    if e.weights_paths and not e.pretrained:
        raise _Problem("encoder.weights_paths", "given with encoder.pretrained=false",
                       "set encoder.pretrained=true to load them, or drop the paths")
    for i, path in enumerate(e.weights_paths):
        if not c.data.features and not Path(path).is_file():  # precomputed features: no weights are loaded
            raise _Problem(f"encoder.weights_paths[{i}]", f"{path} does not exist", "give the weights file's path")


def _monitors(c: Config) -> None:
    log = c.logging
    if log.fid_every and log.fid_inception and not Path(log.fid_inception).is_file():
        raise _Problem("logging.fid_inception", f"{log.fid_inception} does not exist",
                       "give the Inception weights file, or leave it unset for the torch hub cache")
    if log.sample_every or log.fid_every:
        from erw_fast.codecs import SD_VAE_HUB_NAMES, choose_codec

        name = choose_codec(log.sample_vae, c).name
        hub_id = name in SD_VAE_HUB_NAMES or (name.count("/") == 1 and not name.startswith((".", "/", "~")))
        if name != "toy" and not _installed("diffusers"):
            raise _Problem("logging.sample_vae", f"the {name} VAE needs the diffusers package, not installed",
                           "pip install 'erw-fast[vae]', or turn logging.sample_every/fid_every off")
        if name != "toy" and not hub_id and not Path(name).exists():
            raise _Problem("logging.sample_vae", f"{name} does not exist",
                           f"use toy, {', '.join(SD_VAE_HUB_NAMES)} or a local diffusers VAE directory")
    for key, every, n in (("logging.cknna_samples", log.cknna_every, log.cknna_samples),
                          ("logging.fid_samples", log.fid_every, log.fid_samples)):
        size = _dataset_size(c) if every else None
        if size is not None and n > size:
            raise _Problem(key, f"{n} is more than the dataset's {size} samples", f"lower {key}")


def _deepspeed_json(c: Config) -> None:
    path = c.engine.deepspeed_config
    if not path:
        return
    from erw_fast.engines.ds_config import build_deepspeed_config, load_user_json
    from erw_fast.step import BatchPlan

    try:
        plan = BatchPlan.derive(c, _world_size())
    except ConfigError:
        return  # reported by _batch
    try:
        user = load_user_json(path)
        build_deepspeed_config(c, global_batch=plan.global_batch, micro_batch=plan.micro_batch,
                               accumulation=plan.accumulation, device=_device(c), user=user, user_source=path)
    except ConfigError as error:
        raise _Problem("engine.deepspeed_config", _one_line(error), "change the JSON or the run config") from None


def _checkpoint_paths(c: Config) -> None:
    resume = c.checkpoint.resume
    if resume not in ("auto", "none") and not Path(resume).is_file():
        raise _Problem("checkpoint.resume", f"{resume} does not exist",
                       "give a checkpoint file, auto (the run directory's latest) or none")
    ref = c.checkpoint.init_from_reference
    if ref and not Path(ref).is_file():
        raise _Problem("checkpoint.init_from_reference", f"{ref} does not exist", "give a reference checkpoint file")


CHECKS: tuple[Callable[[Config], object], ...] = (
    _run_dir, _device, _batch, _packages, _alignment_backend, _data, _encoders, _monitors, _deepspeed_json,
    _checkpoint_paths, check_monitor_resources,
)


def problems(config: Config) -> list[str]:
    """Every problem the checks find, one line each (a check stops at its first)."""
    found = []
    for check in CHECKS:
        try:
            check(config)
        except ConfigError as error:
            line = _one_line(error)
            if line not in found:  # the device and the dataset are looked at by several checks
                found.append(line)
    return found


def preflight(config: Config) -> None:
    """Raise one ConfigError listing every problem (``main`` prints each as a ``config error:`` line)."""
    found = problems(config)
    if found:
        raise ConfigError("\nconfig error: ".join(found))
