"""U-REPA's manifold loss (arXiv 2503.18414): align the *relative* similarities of the tokens of an image, not
the tokens one by one.

Per image b and encoder: G_b = cos-Gram of the teacher's tokens (T × T, entry (i, j) = cos(z_i, z_j)) and Ĝ_b the
same of the projected SiT tokens; the loss is ‖G_b − Ĝ_b‖²_F **divided by T²** (the mean over the T × T entries),
averaged over the images and the encoders.

The normalisation is this project's documented choice, not a reference number: only U-REPA's abstract was at hand
(it speaks of regularising the relative similarity between samples), neither the paper's equation nor its
code, so neither the scale (mean over the T × T entries or their sum) nor the exact set compared (the tokens of one
image, as here, or the images of a batch) could be checked. The mean over entries keeps the value in [0, 4]
whatever T is (a weight then transfers between resolutions); the sum is T² times it. U-REPA's best weight is
w = 3 (``alignment.manifold_weight``). Math in fp32; one batched matmul per encoder (B × T × T), no loop.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def cosine_gram(x: torch.Tensor) -> torch.Tensor:
    """(B, T, D) → (B, T, T) cosine similarities between the tokens of each image (fp32, eps 1e-12 as REPA's
    F.normalize)."""
    u = F.normalize(x.float(), dim=-1)
    return u @ u.transpose(1, 2)


def manifold_loss(projs: torch.Tensor | Sequence[torch.Tensor],
                  targets: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """mean over images and encoders of mean_{i,j} (cos(z_i, z_j) − cos(ẑ_i, ẑ_j))² (see the module docstring)."""
    projs = [projs] if isinstance(projs, torch.Tensor) else list(projs)
    targets = [targets] if isinstance(targets, torch.Tensor) else list(targets)
    if len(projs) != len(targets) or not projs:
        raise ValueError(f"need one target per projection, got {len(projs)} projections, {len(targets)} targets")
    terms = []
    for i, (p, t) in enumerate(zip(projs, targets, strict=True)):
        if p.dim() != 3 or p.shape[:2] != t.shape[:2]:
            raise ValueError(f"encoder {i}: projection {tuple(p.shape)} and target {tuple(t.shape)} must be (B, T, ·) "
                             "with the same B and T")
        with torch.autocast(device_type=p.device.type, enabled=False):
            diff = cosine_gram(t.detach()) - cosine_gram(p)
            terms.append(diff.pow(2).mean())  # equal T per image: the mean of the per-image means
    return torch.stack(terms).mean()
