"""Per-layer SiT representations and their CKNNA alignment with an encoder (REPA Fig. 2 / ERW's analysis).

SiT features at depth l are the hidden states after block l of the noisy input x_t = α_t·x0 + σ_t·ε, mean-pooled
over tokens (one vector per image, as platonic-rep and REPA's alignment plots use); encoder features are its
patch tokens on the clean image, mean-pooled the same way. Both are L2-normalised before CKNNA.
"""

from __future__ import annotations

import torch

from erw_fast.evaluation.cknna import cknna, pool_features
from erw_fast.models import SiT
from erw_fast.objectives.interpolants import Interpolant

__all__ = ["layerwise_cknna", "sit_layer_features"]


@torch.no_grad()
def sit_layer_features(
    model: SiT,
    x0: torch.Tensor,
    y: torch.Tensor,
    t: float,
    noise: torch.Tensor,
    *,
    path_type: str = "linear",
    batch_size: int = 64,
    cls_token: torch.Tensor | None = None,
    cls_noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """(depth, N, hidden) float64: token-mean hidden state after each block at time ``t`` (not normalised).

    One pass through the blocks per batch collects every depth (``model.hidden_after`` would redo the prefix
    for each depth). A class-token model (REG) takes the teacher's clean CLS ``cls_token`` (N, Dc) and its noise,
    interpolated at the same t; the mean runs over the patch tokens only.
    """
    if x0.shape != noise.shape:
        raise ValueError(f"x0 {tuple(x0.shape)} and noise {tuple(noise.shape)} must have the same shape")
    if getattr(model, "cls_token_dim", None) is not None and (cls_token is None or cls_noise is None):
        raise ValueError("this SiT has a class token (REG): pass cls_token= (the teacher's CLS) and cls_noise=")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    interpolant = Interpolant(path_type)
    out = torch.empty(len(model.blocks), len(x0), model.hidden_size, dtype=torch.float64)
    for start in range(0, len(x0), batch_size):
        sl = slice(start, start + batch_size)
        xb, nb = x0[sl].to(device, dtype), noise[sl].to(device, dtype)
        tb = torch.full((len(xb),), t, device=device, dtype=dtype)
        x_t, _ = interpolant.interpolate(xb, nb, tb)
        cls_t = None
        if cls_token is not None:
            cls_t, _ = interpolant.interpolate(cls_token[sl].to(device, dtype), cls_noise[sl].to(device, dtype), tb)
        h, c = model.embed(x_t, tb, y[sl].to(device), cls_token=cls_t)
        prefix = getattr(model, "num_prefix_tokens", 0)
        for depth, block in enumerate(model.blocks):
            h = block(h, c, model.feat_rope)
            out[depth, sl] = h[:, prefix:].mean(dim=1).to(torch.float64).cpu()
    return out


def layerwise_cknna(layer_features: torch.Tensor, encoder_features: torch.Tensor, topk: int = 10) -> list[float]:
    """CKNNA of each layer's (N, D) features (stacked as (depth, N, D)) with the encoder's (N, D′ or N, T, D′)."""
    target = pool_features(encoder_features)
    return [cknna(pool_features(layer), target, topk) for layer in layer_features]
