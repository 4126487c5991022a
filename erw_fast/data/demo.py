"""Procedural class-conditional demo data and a fixed "toy autoencoder" standing in for the VAE.

The embedded demo must run offline on a small CPU, so the dataset is rendered in code: class ``k`` is a shape
(``SHAPES[k % 8]``) in a class colour (a golden-ratio hue step, so classes beyond 8 still differ in colour), with
per-sample position / size / colour jitter and a noisy background.

Determinism contract: sample ``i`` depends only on ``(seed, i)``. Each sample reseeds one ``torch.Generator``
with ``_sample_seed(seed, i)`` (a splitmix64 mix) and draws, in a fixed order, ``_NUM_PARAMS`` uniforms for its
parameters and then ``3·H·W`` uniforms for its background noise. Changing ``num_samples`` therefore only adds or
removes samples at the end; it never changes an existing one. Only uniforms are drawn because torch's ``randn``
fills in vectorised blocks, whose values would depend on the tensor size.

Label of sample ``i`` is ``i % num_classes`` (exactly balanced when ``num_classes`` divides ``num_samples``).

Latents come from :func:`toy_encode`: space-to-depth by ``f = image_size // latent_size`` of the image in
``[-1, 1]`` (``3·f²`` channels, order ``(c, dy, dx)``), a fixed orthonormal projection to ``latent_channels``
channels (seeded by a constant, never by the data seed, so every dataset shares one "autoencoder"), then a fixed
scale that makes the demo latents roughly unit-variance.
"""

from __future__ import annotations

import colorsys
import math

import torch
from torch.utils.data import Dataset

SHAPES: tuple[str, ...] = ("disc", "square", "ring", "cross", "hstripes", "vstripes", "checker", "triangle")

# Seed of the projection matrix: a constant so that the toy autoencoder is the same for every data seed.
_PROJECTION_SEED = 0x5EED_AE
# Divides the projected patches: their std on DemoShapesDataset(seed=0) defaults, measured once and frozen so the
# encoder stays a fixed function rather than a data-dependent normaliser.
TOY_LATENT_SCALE = 0.36
# Uniform parameters drawn per sample (see _render_chunk for their meaning); changing it changes every sample.
_NUM_PARAMS = 11
# Samples rendered at once: bounds the float32 temporaries (chunk · 3 · H · W · 4 bytes each).
_CHUNK = 512

_MASK64 = (1 << 64) - 1


def _sample_seed(seed: int, index: int) -> int:
    """splitmix64 of (seed, index): unrelated streams for neighbouring samples and seeds."""
    z = ((seed & 0xFFFFFFFF) << 32 | (index & 0xFFFFFFFF)) ^ ((seed >> 32) & _MASK64)
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    z ^= z >> 31
    return z & ((1 << 63) - 1)  # manual_seed wants a non-negative int < 2**64; 63 bits keeps it portable


def class_colours(num_classes: int) -> torch.Tensor:
    """(num_classes, 3) float32 RGB in [0, 1]: saturated, bright, hues spread by the golden ratio."""
    rows = [colorsys.hsv_to_rgb((0.05 + k * 0.6180339887) % 1.0, 0.85, 0.95) for k in range(num_classes)]
    return torch.tensor(rows, dtype=torch.float32)


def toy_projection(in_channels: int, latent_channels: int) -> torch.Tensor:
    """(latent_channels, in_channels) float32 matrix with orthonormal rows, fixed by a constant seed."""
    if not 1 <= latent_channels <= in_channels:
        raise ValueError(f"latent_channels must be in [1, in_channels={in_channels}], got {latent_channels}")
    g = torch.Generator().manual_seed(_PROJECTION_SEED + 7919 * in_channels + latent_channels)
    a = torch.rand(in_channels, latent_channels, generator=g, dtype=torch.float64) * 2 - 1
    q, r = torch.linalg.qr(a)
    # QR is unique only up to column signs; pin them so the matrix does not depend on the LAPACK build.
    q = q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0)
    return q.T.contiguous().to(torch.float32)


def _check_encode_args(images: torch.Tensor, latent_size: int) -> int:
    if images.dtype != torch.uint8:
        raise ValueError(f"images must be uint8, got {images.dtype}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (N, 3, H, W) or (3, H, W), got shape {tuple(images.shape)}")
    h, w = images.shape[-2:]
    if h != w:
        raise ValueError(f"images must be square, got {h}x{w}")
    if latent_size < 1 or h % latent_size:
        raise ValueError(f"image size {h} must be divisible by latent_size, got latent_size={latent_size}")
    return h // latent_size


def toy_encode(images: torch.Tensor, latent_size: int = 8, latent_channels: int = 4) -> torch.Tensor:
    """uint8 (N, 3, H, W) or (3, H, W) → float32 (N, C, h, w) (or (C, h, w)) latents; see the module docstring."""
    single = images.ndim == 3
    x = images[None] if single else images
    f = _check_encode_args(x, latent_size)
    n = x.shape[0]
    # Space-to-depth + projection is exactly a stride-f, kernel-f convolution whose kernel is the projection
    # reshaped to (C, 3, f, f) (channel order c·f² + dy·f + dx); the [0, 255] → [-1, 1] rescale folds into the
    # weight and bias, so the uint8 images are read once.
    weight = toy_projection(3 * f * f, latent_channels).reshape(latent_channels, 3, f, f) / TOY_LATENT_SCALE
    bias = -weight.sum(dim=(1, 2, 3))
    weight = weight / 127.5
    out = torch.empty(n, latent_channels, latent_size, latent_size, dtype=torch.float32)
    for start in range(0, n, _CHUNK):  # chunked: a float copy of all images would be 4x their size
        xc = x[start : start + _CHUNK].to(torch.float32)
        out[start : start + _CHUNK] = torch.nn.functional.conv2d(xc, weight, bias, stride=f)
    return out[0] if single else out


def toy_decode(latents: torch.Tensor, image_size: int = 64) -> torch.Tensor:
    """Least-squares inverse of :func:`toy_encode` (transpose of the projection, then depth-to-space) → uint8.

    Lossy by construction: only the ``C`` of ``3·f²`` patch directions survive (4 of 192 at the demo defaults,
    where the reconstruction is faint texture rather than a recognisable shape). A debugging aid, not a VAE.
    """
    single = latents.ndim == 3
    z = latents[None] if single else latents
    n, c, s, _ = z.shape
    if image_size % s:
        raise ValueError(f"image_size {image_size} must be divisible by the latent size {s}")
    f = image_size // s
    proj = toy_projection(3 * f * f, c)
    patches = torch.einsum("kc,nkhw->nchw", proj, z.float() * TOY_LATENT_SCALE)
    x = patches.reshape(n, 3, f, f, s, s).permute(0, 1, 4, 2, 5, 3).reshape(n, 3, image_size, image_size)
    img = ((x + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return img[0] if single else img


def _shape_distance(shape: str, dx: torch.Tensor, dy: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Approximate signed distance (negative inside) of ``shape`` with circumradius ``r``; y points down.

    ``dx`` is (n, 1, W) and ``dy`` (n, H, 1): per-axis terms stay small and only the final combination is
    full-size, which keeps the renderer cheap.
    """
    ax, ay = dx.abs(), dy.abs()
    w = r / 2.5  # stripe / checker period is 2w
    if shape == "disc":
        return torch.sqrt(dx * dx + dy * dy) - r
    if shape == "square":
        return torch.maximum(ax, ay) - 0.8 * r
    if shape == "ring":
        return (torch.sqrt(dx * dx + dy * dy) - 0.75 * r).abs_() - 0.25 * r
    if shape == "cross":
        arm = 0.3 * r
        return torch.minimum(torch.maximum(ax - arm, ay - r), torch.maximum(ax - r, ay - arm))
    box = torch.maximum(ax - r, ay - r)
    if shape == "hstripes":
        return torch.maximum(box, -torch.cos(math.pi * dy / w) * w / math.pi)
    if shape == "vstripes":
        return torch.maximum(box, -torch.cos(math.pi * dx / w) * w / math.pi)
    if shape == "checker":
        return torch.maximum(box, -torch.cos(math.pi * dx / w) * torch.cos(math.pi * dy / w) * w / math.pi)
    if shape == "triangle":  # apex up: outward edge normals (0, 1), (±√3/2, −1/2); inradius r/2
        return torch.maximum(dy - 0.5 * r, (math.sqrt(3) / 2) * ax - 0.5 * dy - 0.5 * r)
    raise ValueError(f"unknown shape {shape!r}")


def _render_chunk(
    params: torch.Tensor, noise: torch.Tensor, labels: torch.Tensor, colours: torch.Tensor, image_size: int
) -> torch.Tensor:
    """params (n, _NUM_PARAMS) and noise (n, 3, H, W) uniforms → uint8 images (n, 3, H, W).

    Written with few full-size passes (addcmul, lerp, in-place rescale): this is the demo's start-up cost.
    """
    n = params.shape[0]
    coords = (torch.arange(image_size, dtype=torch.float32) + 0.5) / image_size * 2 - 1  # pixel centres in [-1, 1]
    cx, cy = (params[:, 0] - 0.5) * 0.6, (params[:, 1] - 0.5) * 0.6  # centre within ±0.3
    r = 0.4 + 0.25 * params[:, 2]  # circumradius: the shape always stays inside the frame
    fg = (colours[labels] + (params[:, 3:6] - 0.5) * 0.24).clamp(0, 1)  # class colour ± 0.12 per channel
    bg = 0.05 + 0.3 * params[:, 6:7] + (params[:, 7:10] - 0.5) * 0.1  # dark grey with a slight tint
    noise_amp = 0.02 + 0.06 * params[:, 10]

    shape_ids = labels % len(SHAPES)
    mask = torch.empty(n, 1, image_size, image_size)
    pixel = 2.0 / image_size
    for s, name in enumerate(SHAPES):
        idx = (shape_ids == s).nonzero(as_tuple=True)[0]
        if idx.numel() == 0:
            continue
        dx = coords[None, None, :] - cx[idx, None, None]
        dy = coords[None, :, None] - cy[idx, None, None]
        sd = _shape_distance(name, dx, dy, r[idx, None, None])
        mask[idx, 0] = sd.mul_(-1.0 / pixel).add_(0.5).clamp_(0, 1)  # ~1-pixel anti-aliased edge
    # background = bg + amp · (u − 0.5), then blend towards the foreground colour by the mask.
    amp = noise_amp[:, None, None, None]
    img = torch.addcmul((bg - 0.5 * noise_amp[:, None])[:, :, None, None], amp, noise)
    img.lerp_(fg[:, :, None, None].expand_as(img), mask.expand_as(img))
    return img.mul_(255.0).add_(0.5).clamp_(0.0, 255.0).to(torch.uint8)  # +0.5 then truncation = rounding


class DemoShapesDataset(Dataset):
    """Deterministic procedural shapes with precomputed toy latents; see the module docstring for the contract.

    Attributes ``images`` (N, 3, H, W) uint8, ``latents`` (N, C, h, w) float32, ``labels`` (N,) int64.
    """

    def __init__(
        self,
        num_samples: int = 2048,
        num_classes: int = 8,
        image_size: int = 64,
        latent_size: int = 8,
        latent_channels: int = 4,
        seed: int = 0,
    ) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be ≥ 1, got {num_samples}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be ≥ 1, got {num_classes}")
        if image_size < 8:
            raise ValueError(f"image_size must be ≥ 8 (shapes need a few pixels), got {image_size}")
        if latent_size < 1 or image_size % latent_size:
            raise ValueError(f"image_size ({image_size}) must be divisible by latent_size, got {latent_size}")
        f = image_size // latent_size
        if not 1 <= latent_channels <= 3 * f * f:
            raise ValueError(
                f"latent_channels must be in [1, 3·f²={3 * f * f}] for f = image_size // latent_size = {f}, "
                f"got {latent_channels}"
            )
        self.num_samples, self.num_classes, self.seed = num_samples, num_classes, seed
        self.image_size, self.latent_size, self.latent_channels = image_size, latent_size, latent_channels
        self.class_names = [f"{SHAPES[k % len(SHAPES)]}{k // len(SHAPES) or ''}" for k in range(num_classes)]

        self.labels = torch.arange(num_samples, dtype=torch.int64) % num_classes
        self.images = torch.empty(num_samples, 3, image_size, image_size, dtype=torch.uint8)
        colours = class_colours(num_classes)
        g = torch.Generator()
        for start in range(0, num_samples, _CHUNK):
            stop = min(start + _CHUNK, num_samples)
            params = torch.empty(stop - start, _NUM_PARAMS)
            noise = torch.empty(stop - start, 3, image_size, image_size)
            for j, i in enumerate(range(start, stop)):
                g.manual_seed(_sample_seed(seed, i))
                torch.rand(_NUM_PARAMS, generator=g, out=params[j])
                torch.rand(3, image_size, image_size, generator=g, out=noise[j])
            self.images[start:stop] = _render_chunk(params, noise, self.labels[start:stop], colours, image_size)
        self.latents = toy_encode(self.images, latent_size, latent_channels)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        index = int(index)
        if not -self.num_samples <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        return {"image": self.images[index], "latent": self.latents[index], "label": self.labels[index]}
