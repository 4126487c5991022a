"""Multi-head self-attention with a switchable kernel backend.

Backends
- ``sdpa`` (default): ``F.scaled_dot_product_attention``; torch picks flash / cuDNN / memory-efficient / math.
- ``sdpa_flash`` / ``sdpa_efficient`` / ``sdpa_cudnn`` (CUDA): SDPA pinned to one of its kernels.
- ``math``: explicit softmax(q·kᵀ/√d)·v in the input dtype — the readable reference the others are tested against.
- ``flash_attn``: Dao-AILab flash-attn (FA3 ``flash_attn_interface`` preferred over FA2), CUDA + bf16/fp16 only.
- ``xformers``: ``xformers.ops.memory_efficient_attention``.
Optional packages are detected at run time and never required; asking for a missing one is a clear error.
``measure`` (resolved by the trainer, see ``attention_select``) times every available backend at the model's
shape and takes the fastest one that agrees with ``math``.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

ATTENTION_BACKENDS = ("sdpa", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "math", "flash_attn", "xformers")
_SDPA_PINNED = {"sdpa_flash": "FLASH_ATTENTION", "sdpa_efficient": "EFFICIENT_ATTENTION",
                "sdpa_cudnn": "CUDNN_ATTENTION"}


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def available_attention_backends() -> dict[str, bool]:
    """Which backends can run in this environment (importable packages; flash-attn also needs CUDA)."""
    cuda = torch.cuda.is_available()
    flash = cuda and (_has_module("flash_attn_interface") or _has_module("flash_attn"))
    pinned = {name: cuda for name in _SDPA_PINNED}
    return {"sdpa": True, **pinned, "math": True, "flash_attn": flash, "xformers": _has_module("xformers")}


def resolve_attention_backend(name: str) -> str:
    """Validate a backend name ('auto' → 'sdpa') and check that it can run here."""
    if name == "auto":
        return "sdpa"
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {('auto',) + ATTENTION_BACKENDS}")
    if not available_attention_backends()[name]:
        hint = {"flash_attn": "pip install flash-attn (needs CUDA)", "xformers": "pip install xformers"}.get(
            name, "needs CUDA")
        raise RuntimeError(f"attention backend {name!r} was requested but is not available here ({hint})")
    return name


def describe_attention_backend(name: str) -> str:
    """Human-readable description for run logs: which kernel family will actually run."""
    name = resolve_attention_backend(name)
    if name == "flash_attn":
        return "flash_attn (FA3)" if _has_module("flash_attn_interface") else "flash_attn (FA2)"
    if name == "sdpa":
        return "sdpa (torch selects flash/cuDNN/efficient/math)" if torch.cuda.is_available() else "sdpa (cpu)"
    return name


def _math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    return scores.softmax(dim=-1) @ v


def _flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # flash-attn takes (B, T, H, D); FA3 returns (out, lse) in some versions.
    module = importlib.import_module(
        "flash_attn_interface" if _has_module("flash_attn_interface") else "flash_attn"
    )
    out = module.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    if isinstance(out, tuple):
        out = out[0]
    return out.transpose(1, 2)


def _xformers_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    xops = importlib.import_module("xformers.ops")
    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def _pinned_sdpa(kernel: str) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(getattr(SDPBackend, kernel)):
            return F.scaled_dot_product_attention(q, k, v)

    return attention


_KERNELS: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "sdpa": F.scaled_dot_product_attention,
    **{name: _pinned_sdpa(kernel) for name, kernel in _SDPA_PINNED.items()},
    "math": _math_attention,
    "flash_attn": _flash_attention,
    "xformers": _xformers_attention,
}


class Attention(nn.Module):
    """qkv (with bias) → optional per-head QK-norm → optional RoPE → attention → proj.

    Parameter names (`qkv`, `q_norm`, `k_norm`, `proj`) match timm's Attention, which the reference uses.
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False, backend: str = "sdpa") -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        # timm's default norm layer for QK-norm is nn.LayerNorm(head_dim) with affine and eps 1e-5.
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.set_backend(backend)

    def set_backend(self, backend: str) -> None:
        self.backend = resolve_attention_backend(backend)
        self._kernel = _KERNELS[self.backend]

    def forward(self, x: torch.Tensor, rope: nn.Module | None = None,
                logit_heads: Sequence[int] | None = None, skip_tokens: int = 0,
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``logit_heads``: also return the attention logits (q·scale)·kᵀ of these heads, (B, len, T', T') with
        T' = T − ``skip_tokens`` (the leading tokens' rows and columns left out), for HASTE's distillation. The
        output itself still comes from the backend's kernel."""
        B, T, C = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, H, T, hd)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = rope(q), rope(k)
        out = self.proj(self._kernel(q, k, v).transpose(1, 2).reshape(B, T, C))
        if logit_heads is None:
            return out
        return out, attention_logits(q, k, logit_heads, skip_tokens)


def attention_logits(q: torch.Tensor, k: torch.Tensor, heads: Sequence[int], skip_tokens: int = 0) -> torch.Tensor:
    """(q·scale)·kᵀ, scale = head_dim^−½ (the order of HASTE's reference), for ``heads`` of (B, H, T, hd) q and k,
    without the first ``skip_tokens`` queries and keys. Only these heads' maps are materialised."""
    heads = list(heads)
    if heads == list(range(heads[0], heads[0] + len(heads))):  # a run of heads: a view, no gather
        q, k = q[:, heads[0] : heads[0] + len(heads)], k[:, heads[0] : heads[0] + len(heads)]
    else:  # stacked views: no index tensor to copy to the device every step
        q, k = torch.stack([q[:, h] for h in heads], dim=1), torch.stack([k[:, h] for h in heads], dim=1)
    q, k = q[:, :, skip_tokens:], k[:, :, skip_tokens:]
    return (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
