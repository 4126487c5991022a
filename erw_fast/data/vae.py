"""The VAE of preprocessing: diffusers' ``AutoencoderKL`` by hub name or local path, and its posterior moments.

REPA (``preprocessing/encoders.py``) encodes ``x/127.5 − 1`` in float32 and stores ``cat([mean, std])`` of the
diagonal-Gaussian posterior, so training can draw a fresh ``z = (mean + std·ε)·scaling_factor`` every step. We do
the same; the moments of the horizontally flipped image come from the same forward pass (batch doubled).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import torch
from torch import nn

DEFAULT_VAE = "stabilityai/sd-vae-ft-mse"
SD_SCALING_FACTOR = 0.18215  # the SD VAE's latent scale (REPA's latents_scale); diffusers' config default


def import_autoencoder_kl() -> type:
    """``diffusers.AutoencoderKL``, with a clear message where diffusers cannot be imported."""
    from erw_fast.encoders.timm_compat import ensure_torchvision_importable

    # diffusers imports torchvision, which fails on CPU-only torch with the CUDA torchvision wheel; same fix as timm.
    ensure_torchvision_importable()
    try:
        from diffusers import AutoencoderKL
    except (ImportError, RuntimeError) as exc:  # RuntimeError: diffusers' lazy module wraps import failures
        raise ImportError(
            f"the VAE needs diffusers and its dependencies (pip install 'erw-fast[vae]'); importing it failed: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    return AutoencoderKL


def load_vae(name_or_path: str = DEFAULT_VAE, device: torch.device | str = "cpu") -> nn.Module:
    """Frozen float32 ``AutoencoderKL`` from a local directory or a hub name (the local cache is tried first)."""
    autoencoder_kl = import_autoencoder_kl()
    # Without accelerate, diffusers falls back to a plain load and says so in a five-line warning at every load;
    # asking for the plain load directly is the same load, silently (a VAE is small).
    # float32 at load (torch_dtype), not by a cast afterwards, which diffusers warns about on every load.
    opts: dict[str, Any] = {"torch_dtype": torch.float32}
    if not importlib.util.find_spec("accelerate"):
        opts["low_cpu_mem_usage"] = False
    if os.path.isdir(name_or_path):
        vae = autoencoder_kl.from_pretrained(name_or_path, **opts)
    else:
        try:  # offline nodes: a cached copy must not need the network
            vae = autoencoder_kl.from_pretrained(name_or_path, local_files_only=True, **opts)
        except Exception:  # noqa: BLE001 - not cached (the exception type depends on the hub client)
            vae = autoencoder_kl.from_pretrained(name_or_path, **opts)
    return vae.eval().requires_grad_(False).to(device=device)


def vae_info(vae: nn.Module, name: str) -> dict[str, Any]:
    """What the manifest records about the VAE (latent size is filled in from the moments' shape)."""
    cfg = getattr(vae, "config", None)
    scale = getattr(cfg, "scaling_factor", None)
    return {
        # A local directory by its absolute path: samplers read it back from any working directory (--vae auto).
        "name": os.path.abspath(name) if os.path.isdir(name) else name,
        "scaling_factor": float(scale) if scale is not None else SD_SCALING_FACTOR,
        "latent_channels": int(getattr(cfg, "latent_channels", 4)),
        "dtype": "float16",
    }


@torch.no_grad()
def encode_moments(
    vae: nn.Module, images: torch.Tensor, flip: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """uint8 (B, 3, H, W) on the VAE's device → float32 moments (B, 2C, h, w) [and those of the flipped images]."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 (B, 3, H, W) images, got {images.dtype} {tuple(images.shape)}")
    x = images.to(torch.float32) / 127.5 - 1
    if flip:
        x = torch.cat([x, x.flip(-1)])
    dist = vae.encode(x).latent_dist
    moments = torch.cat([dist.mean, dist.std], dim=1).float()
    if flip:
        return moments[: images.shape[0]], moments[images.shape[0] :]
    return moments, None
