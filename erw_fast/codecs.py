"""Latent codecs: uint8 images ↔ the latents a SiT models (the SD VAE for real runs, the demo's toy autoencoder).

SD VAE convention (REPA): latents z = 0.18215 · (VAE posterior); decoding runs ``vae.decode(z / scale)`` and
maps x ∈ [−1, 1] to ``clamp(255 · (x + 1) / 2, 0, 255)`` cast to uint8 (truncation), exactly as REPA's
``generate.py`` writes the images its FID numbers are computed from. Encoding (for analysis) uses the posterior
mean.

The scale is the one the training latents were made with: the export's ``latent_scale``, else the dataset
manifest's ``vae.scaling_factor``, else 0.18215 (``latent_source``). With ``--vae auto`` the decoder is the VAE
the manifest names; for the SD VAE family (``sd-vae-ft-mse``/``-ema``: one encoder, two fine-tuned decoders) it is
``ema``, the decoder of REPA's published samples.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "SD_VAE_HUB_NAMES", "SD_VAE_SCALE", "LatentCodec", "LatentSource", "build_codec", "latent_source",
    "resolve_codec_name", "vae_output_to_uint8",
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


def _hub_id(name: str) -> bool:
    """``owner/name`` (a Hugging Face id), not a relative or absolute path."""
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and not Path(name).exists()


def _sd_vae_codec(spec: str, device: torch.device, scale: float) -> LatentCodec:
    source = SD_VAE_HUB_NAMES.get(spec, spec)
    if spec not in SD_VAE_HUB_NAMES and not Path(source).exists() and not _hub_id(source):
        raise ValueError(f"--vae {spec!r}: choose toy, {', '.join(SD_VAE_HUB_NAMES)}, a Hugging Face VAE id "
                         "(owner/name) or a local diffusers VAE path")
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
        return vae_output_to_uint8(vae.decode(z.to(device, torch.float32) / scale).sample)

    @torch.no_grad()
    def encode(images: torch.Tensor) -> torch.Tensor:
        x = images.to(device, torch.float32) / 127.5 - 1.0
        return vae.encode(x).latent_dist.mean * scale

    return LatentCodec(name=spec, description=f"diffusers AutoencoderKL {source}, latent scale {scale:g}",
                       decode=decode, encode=encode)


@dataclass(frozen=True)
class LatentSource:
    """What made a run's latents: the VAE (hub name or path; None: unknown) and its scale, and where that was read."""

    vae: str | None = None
    scale: float | None = None
    where: str = "nothing recorded"


def _dataset_vae(config: Any) -> LatentSource:
    data = config.data
    if data.kind == "demo":
        return LatentSource("toy", None, "the demo dataset")
    if not data.path:
        return LatentSource()
    from erw_fast.data.shards import DataError, Manifest

    try:
        man = Manifest.load(data.path)
    except (DataError, OSError):
        return LatentSource(None, data.latent_scale, "the run config (the dataset's manifest is not readable here)"
                            if data.latent_scale is not None else "nothing recorded")
    return LatentSource(man.vae.get("name"), man.scaling_factor, f"{Path(data.path) / 'manifest.json'}")


def latent_source(config: Any | None = None, args: Mapping[str, Any] | None = None) -> LatentSource:
    """The latents' VAE and scale: an export's ``args`` (``latent_vae``/``latent_scale``) first, then the run config's
    dataset (its manifest; ``data.latent_scale``)."""
    args = args or {}
    if args.get("latent_scale") is not None:
        return LatentSource(args.get("latent_vae"), float(args["latent_scale"]), "the checkpoint's args")
    return _dataset_vae(config) if config is not None else LatentSource()


def resolve_codec_name(spec: str, data_kind: str | None, latents_vae: str | None = None) -> str:
    """``auto`` → ``toy`` for demo runs (their latents are toy-encoded); else the VAE that made the latents
    (``latents_vae``, the manifest's), as ``ema`` for the SD VAE family (same encoder; REPA samples with the ema
    decoder); else ``ema``."""
    if spec != "auto":
        return spec
    if data_kind == "demo" or latents_vae == "toy":
        return "toy"
    if latents_vae and latents_vae not in SD_VAE_HUB_NAMES and latents_vae not in SD_VAE_HUB_NAMES.values():
        return latents_vae
    return "ema"


def latent_scale_for(codec_name: str, source: LatentSource) -> tuple[float, str]:
    """The scale decoding divides by, and a phrase saying where it came from (for the log)."""
    if codec_name == "toy":
        return 1.0, "the toy codec's own"
    if source.scale is not None:
        return source.scale, f"recorded in {source.where}"
    return SD_VAE_SCALE, "the SD VAE's 0.18215 (no scale recorded)"


def build_codec(
    spec: str, *, device: torch.device | str = "cpu", image_size: int, latent_size: int, latent_channels: int = 4,
    scale: float = SD_VAE_SCALE,
) -> LatentCodec:
    """``toy`` (the demo's fixed linear autoencoder), ``ema``/``mse`` (SD VAE by hub name), a hub name or a local
    VAE path; ``scale``: the latents' scaling factor (``latent_scale_for``)."""
    if spec == "toy":
        return _toy_codec(image_size, latent_size, latent_channels)
    return _sd_vae_codec(spec, torch.device(device), scale)


@dataclass(frozen=True)
class DecodeChoice:
    """The codec a sampler builds for a run, its latent scale, and one log line saying why."""

    name: str
    scale: float
    note: str


def choose_codec(spec: str, config: Any | None = None, args: Mapping[str, Any] | None = None) -> DecodeChoice:
    """``--vae``/``logging.sample_vae`` resolved against what made the run's latents (``latent_source``)."""
    source = latent_source(config, args)
    name = resolve_codec_name(spec, config.data.kind if config is not None else None, source.vae)
    if spec == "auto" and name not in ("toy", *SD_VAE_HUB_NAMES) and not _hub_id(name) and not Path(name).exists():
        from erw_fast.config import ConfigError  # a ValueError: the CLIs' one-line error, preflight's problem line

        raise ConfigError(f"--vae / logging.sample_vae auto: the latents were made with the VAE {name} "
                          f"({source.where}), which is not here (give its local directory, or a Hugging Face id)")
    scale, why = latent_scale_for(name, source)
    picked = f"{name} ({spec})" if spec != name else name
    made = f"latents from {source.vae} ({source.where})" if source.vae else f"latents' VAE: {source.where}"
    return DecodeChoice(name, scale, f"decoder VAE {picked}, {made}; latent scale {scale:g}, {why}")
