"""The FID Inception-v3 (TF 2015-12-05 weights ported by pytorch-fid) with the three outputs ADM's evaluator reads.

ADM's evaluator (openai/guided-diffusion ``evaluations/evaluator.py``) runs the TF graph
``classify_image_graph_def.pb`` of the same 2015-12-05 Inception release. Its tensors map onto pytorch-fid's
``fid_inception_v3`` layout as follows (TF scopes ``mixed, mixed_1, …`` are ``Mixed_5b, 5c, 5d, 6a, 6b, 6c, 6d,
6e, 7a, 7b, 7c``, as in torch-fidelity's TF→PyTorch weight table):

- ``pool_3:0`` (FID, IS, precision/recall): the 2048-d global average pool after ``Mixed_7c``.
- ``mixed_6/conv:0`` (sFID): the 1×1 branch (conv → BN → ReLU) of ``Mixed_6d``, (N, 17, 17, 192) in NHWC;
  ADM keeps channels ``[..., :7]`` and flattens in NHWC order (h, w, c) → 2023-d. The order matters only to
  compare against stored ``mu_s``/``sigma_s``, so it is kept.
- IS logits: ADM multiplies ``pool_3`` by ``softmax/logits/MatMul``'s weight only — the 1008-way ``fc`` **without
  its bias** — and takes the softmax over all 1008 outputs. Reproduced here as ``pool @ fc.weight.T``.

Input pipeline of the TF graph: uint8 [0, 255] → float → ``ResizeBilinear`` to 299×299 (TF1 legacy sampling:
``src = dst · in/out``, no half-pixel centres) → ``(x − 128) / 128``. ``resize="tf"`` reproduces it;
``resize="torch"`` uses pytorch-fid's ``F.interpolate(bilinear, align_corners=False)`` and ``2·x/255 − 1``.
Remaining differences to ADM are float rounding between TF and PyTorch convolutions.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "FID_WEIGHTS_FILE",
    "FID_WEIGHTS_URL",
    "INCEPTION_SIZE",
    "SPATIAL_CHANNELS",
    "InceptionFeatureExtractor",
    "InceptionOutputs",
    "build_fid_inception",
    "tf_legacy_resize_bilinear",
]

FID_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
)
FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_SIZE = 299
SPATIAL_CHANNELS = 7  # ADM: spatial[..., :7]


@dataclass
class InceptionOutputs:
    pool: torch.Tensor  # (N, 2048) pool_3
    spatial: torch.Tensor  # (N, 2023) mixed_6/conv[..., :7], NHWC-flattened
    logits: torch.Tensor  # (N, 1008) pool_3 @ W (no bias)


def tf_legacy_resize_bilinear(x: torch.Tensor, size: int) -> torch.Tensor:
    """TF1 ``ResizeBilinear(align_corners=False, half_pixel_centers=False)`` of (N, C, H, W) to size×size.

    Output index i samples the input at ``i · in/out``; the upper neighbour is clamped at the border.
    """
    out = x
    for dim in (-2, -1):
        n_in = out.shape[dim]
        if n_in == size:
            continue
        src = torch.arange(size, dtype=torch.float64, device=x.device) * (n_in / size)
        i0 = src.floor().long().clamp_(max=n_in - 1)
        i1 = (i0 + 1).clamp_(max=n_in - 1)
        w = (src - i0).to(x.dtype)
        shape = [1] * out.dim()
        shape[dim] = size
        lo, hi = out.index_select(dim, i0), out.index_select(dim, i1)
        out = lo + (hi - lo) * w.view(shape)
    return out


class InceptionFeatureExtractor(nn.Module):
    """``forward(images) -> InceptionOutputs`` for images (N, 3, H, W), uint8 or float in [0, 255]."""

    def __init__(self, net: nn.Module, resize: str = "tf", weights_source: str = "") -> None:
        super().__init__()
        if resize not in ("tf", "torch"):
            raise ValueError(f"resize must be 'tf' or 'torch', got {resize!r}")
        self.net = net
        self.resize = resize
        self.weights_source = weights_source
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> InceptionFeatureExtractor:
        return super().train(False)  # BatchNorm must always use its running statistics

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images (N, 3, H, W) in [0, 255], got {tuple(images.shape)}")
        x = images.to(torch.float32)
        if self.resize == "tf":
            return (tf_legacy_resize_bilinear(x, INCEPTION_SIZE) - 128.0) / 128.0
        x = F.interpolate(x / 255.0, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
        return 2.0 * x - 1.0

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> InceptionOutputs:
        net = self.net
        x = self._prepare(images.to(next(net.parameters()).device))
        for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1",
                     "Conv2d_4a_3x3", "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b",
                     "Mixed_6c"):
            x = getattr(net, name)(x)
        # mixed_6/conv: Mixed_6d's 1×1 branch, evaluated on its own (a 768→192 1×1 conv, cheap).
        spatial = net.Mixed_6d.branch1x1(x)[:, :SPATIAL_CHANNELS]
        spatial = spatial.permute(0, 2, 3, 1).reshape(spatial.shape[0], -1)
        for name in ("Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"):
            x = getattr(net, name)(x)
        pool = x.mean(dim=(2, 3))
        logits = pool @ net.fc.weight.T
        return InceptionOutputs(pool=pool, spatial=spatial, logits=logits)


def _fid_inception_architecture() -> nn.Module:
    """pytorch-fid's FID Inception (torchvision Inception3 with the TF-compatible blocks), no weights loaded."""
    from erw_fast.encoders.timm_compat import ensure_torchvision_importable

    ensure_torchvision_importable()  # before torchvision: the CUDA wheel's ops do not load on CPU-only torch
    from pytorch_fid import inception as pfi

    net = pfi._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    net.Mixed_5b = pfi.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = pfi.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = pfi.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = pfi.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = pfi.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = pfi.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = pfi.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = pfi.FIDInceptionE_1(1280)
    net.Mixed_7c = pfi.FIDInceptionE_2(2048)
    return net


def _random_init(net: nn.Module, seed: int) -> None:
    """He-normal convs and fc from a private generator: reproducible across processes, O(1) activations."""
    g = torch.Generator().manual_seed(seed)
    for module in net.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            fan_in = module.weight[0].numel()
            std = (2.0 / fan_in) ** 0.5 if isinstance(module, nn.Conv2d) else fan_in**-0.5
            with torch.no_grad():
                module.weight.copy_(torch.randn(module.weight.shape, generator=g) * std)
                if module.bias is not None:
                    module.bias.zero_()
        elif isinstance(module, nn.BatchNorm2d):
            module.reset_parameters()  # identity statistics: mean 0, var 1, γ 1, β 0


def _default_weights_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS_FILE


def build_fid_inception(
    pretrained: bool = True,
    weights_path: str | os.PathLike[str] | None = None,
    *,
    seed: int = 0,
    resize: str = "tf",
    device: torch.device | str = "cpu",
    download: bool = True,
) -> InceptionFeatureExtractor:
    """The FID Inception feature extractor.

    pretrained=True: weights from ``weights_path``, else the torch.hub cache
    (``<hub>/checkpoints/pt_inception-2015-12-05-6726825d.pth``, where pytorch-fid keeps them), downloaded there
    if missing and ``download``. pretrained=False: random weights drawn from ``seed`` (tests; the numbers are
    not comparable with any published result).
    """
    net = _fid_inception_architecture()
    if not pretrained:
        if weights_path is not None:
            raise ValueError("weights_path given with pretrained=False")
        _random_init(net, seed)
        source = f"random init (seed {seed}; not comparable)"
    else:
        path = Path(weights_path) if weights_path is not None else _default_weights_path()
        if not path.is_file():
            if weights_path is not None or not download:
                raise FileNotFoundError(f"FID Inception weights not found at {path} (get {FID_WEIGHTS_URL})")
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.hub.download_url_to_file(FID_WEIGHTS_URL, str(path), progress=False)
            except Exception as exc:
                raise FileNotFoundError(
                    f"could not download the FID Inception weights ({type(exc).__name__}: {exc}); no network? "
                    f"place {FID_WEIGHTS_FILE} at {path} or pass its path"
                ) from exc
        state = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict(state, strict=True)
        source = str(path)
    return InceptionFeatureExtractor(net, resize=resize, weights_source=source).to(device)
