"""Reading encoder checkpoints and mapping them onto the timm VisionTransformer layout.

Accepted formats (``.safetensors`` or torch pickles, always read with ``weights_only=True``; TorchScript archives
only when their sha256 is a known release or ``encoder.trust_torchscript`` is set):
- timm / this package's own ``Encoder.model.state_dict()`` (or ``Encoder.state_dict()``, prefix ``model.``);
- DINOv2 as released by facebookresearch (``mask_token``, ``register_tokens``, SwiGLU ``w12``/``w3``);
- OpenAI / open_clip CLIP (``visual.conv1.weight`` ...; the text tower is ignored);
- MoCo v3 training checkpoints (``state_dict`` -> ``module.base_encoder.*``, with the released files'
  ``norm13``/``fc13``/``norm14``/``fc14`` naming slip fixed as REPA does);
- MAE (``model`` key, decoder keys ignored) and I-JEPA (``encoder`` key, ``module.`` prefix), as REPA
  reads them.
Absolute position embeddings of another grid are resampled with timm's ``resample_abs_pos_embed`` (bicubic,
antialiased), exactly the call REPA makes on DINOv2 / MoCo v3 / MAE weights.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import zipfile
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from erw_fast.errors import InputError

from .registry import EncoderSpec
from .timm_compat import import_timm

StateDict = dict[str, torch.Tensor]

# Containers checkpoints wrap their weights in, tried in this order per family.
_CONTAINERS: dict[str, tuple[str, ...]] = {
    "dinov2": ("teacher", "model", "state_dict"),
    "clip": ("state_dict", "model"),
    "mocov3": ("state_dict", "model"),
    "mae": ("model", "state_dict"),
    "jepa": ("encoder", "target_encoder", "state_dict", "model"),  # REPA reads 'encoder'
}
_GENERIC_PREFIXES = ("module.", "model.", "_orig_mod.", "backbone.")


class EncoderWeightsError(InputError):
    """A checkpoint could not be read or does not fit the encoder architecture."""


# TorchScript archives released with a published sha256: OpenAI's CLIP files, whose download URL carries it
# (openaipublic.azureedge.net/clip/models/<sha256>/ViT-L-14.pt, the files REPA's CLIP teacher loads).
KNOWN_TORCHSCRIPT_SHA256 = {
    "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836": "OpenAI CLIP ViT-L/14 (ViT-L-14.pt)",
    "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02": "OpenAI CLIP ViT-L/14@336px",
}


def sha256_of(path: str | os.PathLike[str], chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_checkpoint(path: str | os.PathLike[str], trust_torchscript: bool = False) -> Mapping[str, Any]:
    """Load a checkpoint file safely (safetensors, or torch.load with weights_only=True).

    A TorchScript archive is read only when its sha256 is a known release (``KNOWN_TORCHSCRIPT_SHA256``) or
    ``trust_torchscript``: loading TorchScript runs the code stored in the archive (its ``__setstate__`` methods
    can write files), so an unknown one is refused.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise EncoderWeightsError(f"encoder weights file not found: {path}")
    if _is_torchscript_archive(path):  # before torch.load, which would only refuse it (weights_only) with a warning
        digest = sha256_of(path)
        if digest not in KNOWN_TORCHSCRIPT_SHA256 and not trust_torchscript:
            raise EncoderWeightsError(
                f"{path} is a TorchScript archive (sha256 {digest}) that is not a known release; loading one runs "
                "the code stored in it, so it is refused. Convert it to a state dict or .safetensors where you "
                "trust it, or set encoder.trust_torchscript=true if you trust this file")
        try:
            return dict(torch.jit.load(path, map_location="cpu").state_dict())
        except Exception as exc:  # pragma: no cover - depends on the file
            error: Exception = exc
    else:
        try:
            if path.endswith(".safetensors"):
                from safetensors.torch import load_file

                return load_file(path, device="cpu")
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            error = exc
    raise EncoderWeightsError(
        f"could not read encoder weights from {path}: {type(error).__name__}: {error}. Expected a "
        "safetensors file or a torch checkpoint loadable with torch.load(weights_only=True); convert "
        "other pickles to a plain state dict (or .safetensors) first."
    ) from error


def _is_torchscript_archive(path: str) -> bool:
    try:
        with zipfile.ZipFile(path) as zf:
            return any(n.split("/", 2)[1:2] == ["code"] for n in zf.namelist())
    except (zipfile.BadZipFile, OSError, IndexError):
        return False


def _unwrap(raw: Mapping[str, Any], family: str) -> Mapping[str, Any]:
    sd = raw
    for _ in range(3):  # nested containers, e.g. {'state_dict': {'model': ...}}
        key = next((k for k in _CONTAINERS[family] if isinstance(sd.get(k), Mapping)), None)
        if key is None:
            break
        sd = sd[key]
    return sd


def _strip_prefix(sd: StateDict, prefix: str) -> StateDict:
    if sd and all(k.startswith(prefix) for k in sd):
        return {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


def _convert_dinov2(sd: StateDict) -> StateDict:
    """facebookresearch/dinov2 layout -> timm layout (timm's dinov2 models)."""
    sd = dict(sd)
    sd.pop("mask_token", None)
    if "register_tokens" in sd:
        # timm's reg4 models are `no_embed_class`: the CLS position embedding is folded into cls_token and
        # pos_embed holds patch positions only (numerically the same token sequence as the original).
        sd["reg_token"] = sd.pop("register_tokens")
        pos = sd.pop("pos_embed")
        sd["cls_token"] = sd.pop("cls_token") + pos[:, :1]
        sd["pos_embed"] = pos[:, 1:]
    out = {}
    for k, v in sd.items():
        k = re.sub(r"^(blocks\.\d+\.mlp)\.w12\.", r"\1.fc1.", k)
        k = re.sub(r"^(blocks\.\d+\.mlp)\.w3\.", r"\1.fc2.", k)
        out[k] = v
    return out


_CLIP_SWAPS = (
    ("conv1.", "patch_embed.proj."),
    ("ln_pre.", "norm_pre."),
    ("ln_post.", "norm."),
    ("transformer.resblocks.", "blocks."),
    (".ln_1.", ".norm1."),
    (".ln_2.", ".norm2."),
    (".attn.in_proj_weight", ".attn.qkv.weight"),
    (".attn.in_proj_bias", ".attn.qkv.bias"),
    (".attn.out_proj.", ".attn.proj."),
    (".mlp.c_fc.", ".mlp.fc1."),
    (".mlp.c_proj.", ".mlp.fc2."),
)


def _convert_openai_clip(sd: StateDict, prefix: str) -> StateDict:
    """OpenAI / open_clip visual tower -> timm CLIP ViT (text tower dropped)."""
    out = {}
    for k, v in sd.items():
        if not k.startswith(prefix):
            continue
        k = k[len(prefix) :]
        if k == "class_embedding":
            out["cls_token"] = v.reshape(1, 1, -1)
        elif k == "positional_embedding":
            out["pos_embed"] = v.unsqueeze(0)
        elif k == "proj":
            out["head.weight"] = v.t()  # projection to the joint space; dropped below (REPA skips it)
        else:
            for a, b in _CLIP_SWAPS:
                k = k.replace(a, b)
            out[k] = v
    return out


def _fix_mocov3(sd: StateDict) -> StateDict:
    if any(k.startswith("module.base_encoder.") for k in sd):
        sd = {
            k[len("module.base_encoder.") :]: v for k, v in sd.items() if k.startswith("module.base_encoder.")
        }
    elif any(k.startswith("base_encoder.") for k in sd):
        sd = {k[len("base_encoder.") :]: v for k, v in sd.items() if k.startswith("base_encoder.")}
    out = {}
    for k, v in sd.items():
        # The released MoCo v3 ViT checkpoints misname two modules in blocks 13/14 (REPA fixes the same).
        k = k.replace("blocks.13.norm13", "blocks.13.norm1").replace(
            "blocks.13.mlp.fc13", "blocks.13.mlp.fc1"
        )
        k = k.replace("blocks.14.norm14", "blocks.14.norm2").replace(
            "blocks.14.mlp.fc14", "blocks.14.mlp.fc2"
        )
        out[k] = v
    return out


def _droppable(key: str, spec: EncoderSpec) -> bool:
    """Keys of heads / unused parts we deliberately do not load."""
    if key.startswith(("head.", "head_drop.", "fc.")) or key in ("head", "mask_token"):
        return True
    if not spec.final_norm and (key.startswith("norm.") or key.startswith("fc_norm.")):
        return True  # REPA reads CLIP / MAE tokens before the final norm
    if spec.family == "mae" and key.startswith("decoder"):
        return True
    return False


def convert_state_dict(raw: Mapping[str, Any], spec: EncoderSpec) -> StateDict:
    """Unwrap and rename a checkpoint of any supported format to timm keys; drop unused heads."""
    sd: Mapping[str, Any] = _unwrap(raw, spec.family)
    tensors: StateDict = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise EncoderWeightsError(f"no tensors found (top-level keys: {sorted(raw)[:10]})")
    if spec.family == "clip":
        for prefix in ("visual.", "module.visual."):
            if prefix + "class_embedding" in tensors:
                tensors = _convert_openai_clip(tensors, prefix)
                break
        else:
            if any(k.startswith("visual.trunk.") for k in tensors):  # open_clip with a timm trunk
                tensors = {
                    k[len("visual.trunk.") :]: v for k, v in tensors.items() if k.startswith("visual.trunk.")
                }
    if spec.family == "mocov3":
        tensors = _fix_mocov3(tensors)
    if spec.family == "dinov2" and any(k.startswith("backbone.") for k in tensors):
        # DINOv2 training checkpoints: teacher.backbone.* next to the dino/ibot heads
        tensors = {k[len("backbone.") :]: v for k, v in tensors.items() if k.startswith("backbone.")}
    for prefix in _GENERIC_PREFIXES:
        tensors = _strip_prefix(tensors, prefix)
    if spec.family == "dinov2" and (
        "mask_token" in tensors or "register_tokens" in tensors or any(".mlp.w12." in k for k in tensors)
    ):
        tensors = _convert_dinov2(tensors)
    return {k: v for k, v in tensors.items() if not _droppable(k, spec)}


def adapt_pos_embed(sd: StateDict, model: nn.Module) -> StateDict:
    """Resample a checkpoint's absolute position embedding to the model's patch grid (REPA's call)."""
    v = sd.get("pos_embed")
    target = getattr(model, "pos_embed", None)
    if (
        v is None
        or target is None
        or v.ndim != 3
        or v.shape == target.shape
        or v.shape[-1] != target.shape[-1]
    ):
        return sd
    resample_abs_pos_embed = import_timm().layers.resample_abs_pos_embed
    n_prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 1))
    n_old = v.shape[1] - n_prefix
    side = math.isqrt(n_old)
    if side * side != n_old:
        return sd  # not a square grid: leave it for the shape check to report
    sd = dict(sd)
    sd["pos_embed"] = resample_abs_pos_embed(
        v, new_size=list(model.patch_embed.grid_size), old_size=[side, side], num_prefix_tokens=n_prefix
    )
    return sd


def check_keys(sd: StateDict, model: nn.Module) -> None:
    """Strict key/shape comparison with a readable message (before touching the model)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in sd and tuple(sd[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} keys (e.g. {missing[:5]})")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} keys (e.g. {unexpected[:5]})")
    if wrong:
        problems.append(f"{len(wrong)} shape mismatches (e.g. {wrong[:3]})")
    if problems:
        raise EncoderWeightsError("; ".join(problems))
