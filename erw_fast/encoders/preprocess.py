"""REPA's ``preprocess_raw_image``: raw [0, 255] images -> normalised encoder input.

Per family (REPA train.py, resolution = image width):
    clip:          x/255 -> bicubic resize to 224·(res//256) -> normalise (OpenAI CLIP mean/std)
    dinov2, jepa:  x/255 -> normalise (ImageNet)        -> bicubic resize to 224·(res//256)
    mocov3, mae:   x/255 -> normalise (ImageNet), no resize (they run at 256·(res//256))
The order is kept even though bicubic resize and per-channel normalisation commute up to rounding.
Resize is ``F.interpolate(mode="bicubic")`` with its defaults (align_corners=False, no antialias), as REPA.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .registry import ENCODER_SPECS, EncoderSpec, get_encoder_spec


@functools.lru_cache(maxsize=64)
def _stats(
    mean: tuple[float, ...], std: tuple[float, ...], device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    # Cached so a training step does not build (and copy to the GPU) two tiny tensors per call.
    m = torch.tensor(mean, dtype=dtype, device=device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=dtype, device=device).view(1, -1, 1, 1)
    return m, s


def normalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """(x - mean) / std per channel, computed in x's dtype like torchvision's Normalize."""
    m, s = _stats(tuple(mean), tuple(std), x.device, x.dtype)
    return (x - m) / s


def _resolve(encoder: str | EncoderSpec) -> EncoderSpec:
    if isinstance(encoder, EncoderSpec):
        return encoder
    try:
        return get_encoder_spec(encoder)
    except ValueError:
        pass
    # REPA matches on substrings of its enc_type ('clip' in enc_type ...): accept a bare family too.
    for spec in ENCODER_SPECS.values():
        if spec.family == encoder.strip().lower():
            return spec
    raise ValueError(f"unknown encoder or family {encoder!r} for preprocessing")


def preprocess_raw_image(x: torch.Tensor, encoder: str | EncoderSpec) -> torch.Tensor:
    """Map a (B, 3, H, H) batch of [0, 255] images (uint8 or float) to `encoder`'s input.

    Integer inputs become float32; float inputs keep their dtype. H must be a multiple of 256.
    """
    spec = _resolve(encoder)
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(x.shape)}")
    resolution = x.shape[-1]  # REPA: resolution = x.shape[-1]
    if x.shape[-2] != resolution:
        raise ValueError(f"expected square images, got {x.shape[-2]}x{x.shape[-1]}")
    if resolution < spec.base_resolution or resolution % spec.base_resolution:
        raise ValueError(f"image side must be a multiple of {spec.base_resolution} px, got {resolution}")
    if not x.is_floating_point():
        x = x.float()
    x = x / 255.0
    size = spec.input_size(resolution)
    if spec.preprocess == "resize_then_normalize":
        x = F.interpolate(x, size=size, mode="bicubic")
        x = normalize(x, spec.mean, spec.std)
    elif spec.preprocess == "normalize_then_resize":
        x = normalize(x, spec.mean, spec.std)
        x = F.interpolate(x, size=size, mode="bicubic")
    else:
        x = normalize(x, spec.mean, spec.std)
    return x
