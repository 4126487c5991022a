"""Rebuild a SiT from a checkpoint for sampling and analysis.

Accepts the reference layout (``run/reference/NNNNNNN.pt`` = ``{model, ema, args, steps}``, also REPA's own
training checkpoints) and the trainer's checkpoints (``run/checkpoints/step_*.pt``). The architecture comes
from, in order of precedence: the state dict itself for every shape it determines (width, depth, patch,
channels, latent size, MLP ratio, projectors and their type: MLP or iREPA's conv and its kernel, QK-norm), then
``--config`` or the run's ``config.yaml`` found two levels above the checkpoint, then the checkpoint's ``args``,
then the ``--model`` name. Only the number of heads and the alignment depth are not visible in the weights.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from erw_fast.checkpoint import import_reference_checkpoint
from erw_fast.config import Config, ConfigError, load_config
from erw_fast.models import SiT, sit_config

__all__ = ["LoadedSiT", "find_run_config", "load_sit_checkpoint", "sit_kwargs_from_state_dict"]

PathLike = str | os.PathLike[str]


@dataclass
class LoadedSiT:
    model: SiT
    checkpoint: Path
    step: int | None
    weights: str  # "ema" | "raw"
    kwargs: dict[str, Any]
    args: dict[str, Any] = field(default_factory=dict)
    config: Config | None = None
    config_path: Path | None = None

    @property
    def path_type(self) -> str:
        """The interpolant the model was trained with (checkpoint args, then run config, else linear)."""
        if self.args.get("path_type"):
            return str(self.args["path_type"])
        return self.config.diffusion.path_type if self.config is not None else "linear"


def find_run_config(checkpoint: PathLike) -> Path | None:
    """``run_dir/config.yaml`` for ``run_dir/{reference,checkpoints}/*.pt``, if it exists."""
    candidate = Path(checkpoint).resolve().parent.parent / "config.yaml"
    return candidate if candidate.is_file() else None


def sit_kwargs_from_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Constructor arguments that the tensor shapes determine (REG's class token included)."""
    cls = sd.get("cls_projectors2.weight")  # (hidden, Dc): a REG model, with a class-token row in pos_embed
    try:
        hidden = sd["pos_embed"].shape[-1]
        num_patches = sd["pos_embed"].shape[1] - (cls is not None)
        proj = sd["x_embedder.proj.weight"]  # (hidden, C, p, p)
        fc1 = sd["blocks.0.mlp.fc1.weight"]
    except KeyError as exc:
        raise ValueError(f"not a SiT state dict: missing {exc}") from exc
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    grid = math.isqrt(num_patches)
    n_proj = 1 + max((int(m.group(1)) for k in sd if (m := re.match(r"projectors\.(\d+)\.", k))), default=-1)
    conv = sd.get("projectors.0.projection_layer.weight")  # iREPA's conv projector: (z, hidden, k, k)
    last = "projection_layer.weight" if conv is not None else "4.weight"
    kwargs: dict[str, Any] = {
        "hidden_size": hidden, "depth": depth, "patch_size": proj.shape[-1], "in_channels": proj.shape[1],
        "input_size": grid * proj.shape[-1], "mlp_ratio": fc1.shape[0] / hidden,
        "z_dims": [int(sd[f"projectors.{j}.{last}"].shape[0]) for j in range(n_proj)],
        "qk_norm": any(k.endswith("attn.q_norm.weight") for k in sd),
    }
    if conv is not None:
        kwargs.update(projector="conv", projector_kernel_size=int(conv.shape[-1]))
    elif n_proj:
        kwargs.update(projector="mlp", projector_dim=int(sd["projectors.0.0.weight"].shape[0]))
    if "feat_rope.freqs_cos" in sd:  # absent tables say nothing: our checkpoints before they were persistent
        kwargs["use_rope"] = True
    if cls is not None:
        kwargs["cls_token_dim"] = int(cls.shape[1])
    return kwargs


def _checkpoint_step(path: Path, steps: int | None) -> int | None:
    if steps is not None:
        return steps
    match = re.search(r"(\d+)\.pt$", path.name)
    return int(match.group(1)) if match else None


def _config_kwargs(config: Config) -> dict[str, Any]:
    # The run's model section; the state dict then fixes whatever it determines (widths, projectors, ...).
    return {**config.model.sit_kwargs(attn_backend="sdpa", alignment=config.alignment),
            "encoder_depth": config.alignment.encoder_depth}


# What an export's `args` records of the architecture (checkpoint_state.reference_args), and how to read it.
_ARCH_ARGS = (("depth", int), ("hidden_size", int), ("num_heads", int), ("patch_size", int), ("mlp_ratio", float),
              ("input_size", int), ("in_channels", int), ("qk_norm", bool), ("use_rope", bool), ("num_classes", int),
              ("class_dropout_prob", float), ("projector_dim", int), ("encoder_depth", int))


def _args_kwargs(args: dict[str, Any], model_name: str | None) -> dict[str, Any]:
    """The model an export's `args` describes: the named size, then every architecture key it records."""
    name = model_name or args.get("model")
    kwargs: dict[str, Any] = sit_config(name) if name else {}
    for key, cast in _ARCH_ARGS:
        if args.get(key) is not None:
            kwargs[key] = cast(args[key])
    if args.get("projection_layer_type") is not None:  # iREPA's names for the projector type and kernel
        kwargs["projector"] = str(args["projection_layer_type"])
    if args.get("proj_kwargs_kernel_size") is not None:
        kwargs["projector_kernel_size"] = int(args["proj_kwargs_kernel_size"])
    dims = args.get("projector_embed_dims")
    if dims not in (None, ""):
        kwargs["z_dims"] = [int(d) for d in str(dims).split(",")]
    return kwargs


def load_sit_checkpoint(
    path: PathLike,
    *,
    ema: bool = True,
    config_path: PathLike | None = None,
    model_name: str | None = None,
    device: torch.device | str = "cpu",
) -> LoadedSiT:
    """Load EMA (default) or raw weights into a freshly built SiT in eval mode; clear errors for bad inputs."""
    path = Path(path)
    ckpt = import_reference_checkpoint(path)  # FileNotFoundError / RuntimeError / ValueError with the path
    sd = ckpt["ema"] if ema else ckpt["model"]
    if sd is None:
        raise ValueError(f"{path} holds no EMA weights; use the raw weights (--raw)")
    if "final_layer.linear.weight" not in sd:
        raise ValueError(f"{path} is an ERW Phase-1 (warmup) checkpoint: it has no final layer and cannot sample")
    args = dict(ckpt["args"] or {})

    config: Config | None = None
    cfg_file = Path(config_path) if config_path is not None else find_run_config(path)
    if cfg_file is not None:
        try:
            config = load_config(cfg_file)
        except ConfigError as exc:
            raise ValueError(f"run config {cfg_file}: {exc}") from exc

    if config is not None:
        kwargs = _config_kwargs(config)
        if model_name:
            kwargs.update(sit_config(model_name))
    else:
        kwargs = _args_kwargs(args, model_name)
    if "num_heads" not in kwargs:
        raise ValueError(f"cannot tell the architecture of {path}: its args name no model; pass --model or --config")
    from_sd = sit_kwargs_from_state_dict(sd)
    kwargs.update(from_sd)
    table_rows = sd["y_embedder.embedding_table.weight"].shape[0]
    kwargs.setdefault("num_classes", table_rows - 1)
    if table_rows == kwargs["num_classes"]:
        kwargs["class_dropout_prob"] = 0.0  # no null row: the model was trained without label dropout
    if kwargs["hidden_size"] % kwargs["num_heads"]:
        raise ValueError(
            f"{path}: width {kwargs['hidden_size']} is not divisible by {kwargs['num_heads']} heads; the model "
            "name does not describe this checkpoint, pass --config (the run's config.yaml) or --model"
        )
    # The alignment depth only places the projectors and changes no velocity (reference default 8); plain SiT
    # runs have no projectors but may carry a config value beyond their depth, so it is clamped, not checked.
    kwargs["encoder_depth"] = min(kwargs.get("encoder_depth", 8), kwargs["depth"])
    model = SiT(**kwargs)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{path}: weights do not fit the SiT rebuilt as {kwargs}: {exc}") from exc
    return LoadedSiT(
        model=model.to(device).eval().requires_grad_(False), checkpoint=path.resolve(),
        step=_checkpoint_step(path, ckpt["steps"]), weights="ema" if ema else "raw", kwargs=kwargs, args=args,
        config=config, config_path=cfg_file.resolve() if cfg_file is not None else None,
    )
