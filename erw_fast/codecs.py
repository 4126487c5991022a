"""Latent codecs: uint8 images ↔ the latents a SiT models (the SD VAE for real runs, the demo's toy autoencoder).

SD VAE convention (REPA): latents z = 0.18215 · (VAE posterior); decoding runs ``vae.decode(z / 0.18215)`` and
maps x ∈ [−1, 1] to ``clamp(255 · (x + 1) / 2, 0, 255)`` cast to uint8 (truncation), exactly as REPA's
``generate.py`` writes the images its FID numbers are computed from. Encoding (for analysis) uses the posterior
mean.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "SD_VAE_HUB_NAMES", "SD_VAE_SCALE", "LatentCodec", "build_codec", "resolve_codec_name", "vae_output_to_uint8",
]

SD_VAE_SCALE = 0.18215
SD_VAE_HUB_NAMES = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}


@dataclass
class LatentCodec:
    name: str
    description: str
    decode: Callable[[torch.Tensor], torch.Tensor]  # float latents (N, C, h, w) → uint8 (N, 3, H, W) on the CPU
    encode: Callable[[torch.Tensor], torch.Tensor]  # uint8 (N, 3, H, W) → float32 latents


def vae_output_to_uint8(x: torch.Tensor) -> torch.Tensor:
    """REPA generate.py: clamp(255·(x + 1)/2, 0, 255) → uint8 (truncating), on the CPU."""
    return torch.clamp(255.0 * (x.float() + 1.0) / 2.0, 0, 255).to("cpu", dtype=torch.uint8)


def _toy_codec(image_size: int, latent_size: int, latent_channels: int) -> LatentCodec:
    from erw_fast.data.demo import toy_decode, toy_encode

    return LatentCodec(
        name="toy",
        description=f"demo toy autoencoder ({latent_channels}×{latent_size}² latents ↔ {image_size}px images)",
        decode=lambda z: toy_decode(z.float().cpu(), image_size),
        encode=lambda images: toy_encode(images.cpu(), latent_size, latent_channels),
    )


def _sd_vae_codec(spec: str, device: torch.device) -> LatentCodec:
    source = SD_VAE_HUB_NAMES.get(spec, spec)
    if spec not in SD_VAE_HUB_NAMES and not Path(source).exists():
        raise ValueError(f"--vae {spec!r}: choose toy, {', '.join(SD_VAE_HUB_NAMES)} or a local diffusers VAE path")
    from erw_fast.data.vae import load_vae  # the preprocessing VAE loader: local path or (cached) hub name

    try:
        vae = load_vae(os.fspath(source), device=device)
    except Exception as exc:
        raise RuntimeError(
            f"could not load the VAE {source!r} ({type(exc).__name__}: {exc}); offline? pass a local path or "
            "pre-populate the Hugging Face cache"
        ) from exc

    @torch.no_grad()
    def decode(z: torch.Tensor) -> torch.Tensor:
        return vae_output_to_uint8(vae.decode(z.to(device, torch.float32) / SD_VAE_SCALE).sample)

    @torch.no_grad()
    def encode(images: torch.Tensor) -> torch.Tensor:
        x = images.to(device, torch.float32) / 127.5 - 1.0
        return vae.encode(x).latent_dist.mean * SD_VAE_SCALE

    return LatentCodec(name=spec, description=f"diffusers AutoencoderKL {source}", decode=decode, encode=encode)


def resolve_codec_name(spec: str, data_kind: str | None) -> str:
    """``auto`` → ``toy`` for demo runs (their latents are toy-encoded), else the SD VAE ``ema``."""
    if spec != "auto":
        return spec
    return "toy" if data_kind == "demo" else "ema"


def build_codec(
    spec: str, *, device: torch.device | str = "cpu", image_size: int, latent_size: int, latent_channels: int = 4
) -> LatentCodec:
    """``toy`` (the demo's fixed linear autoencoder), ``ema``/``mse`` (SD VAE by hub name) or a local VAE path."""
    if spec == "toy":
        return _toy_codec(image_size, latent_size, latent_channels)
    return _sd_vae_codec(spec, torch.device(device))
