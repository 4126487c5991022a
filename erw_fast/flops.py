"""Analytic FLOP accounting for SiT / ERW / REPA training: per component, per phase, per step.

Conventions
- **One multiply-add = 2 FLOPs.** Every number returned here is in FLOPs. DiT's and SiT's published "Gflops"
  (SiT/DiT-XL/2: 118.6 per 256-px image) count multiply-adds (MACs): ``FlopBreakdown.dit_gflops()`` converts.
- **Matmul FLOPs** (``kind="matmul"``) are every Linear, the patch-embedding convolutions and the two attention
  products (Q·Kᵀ and A·V): exactly what ``torch.utils.flop_counter.FlopCounterMode`` counts (mm / addmm / bmm /
  convolution / SDPA). Bias additions are not in it (FlopCounterMode leaves them out too). These are the
  headline numbers ("model FLOPs", the usual MFU convention).
- **Elementwise FLOPs** (``kind="elementwise"``) are *estimates* added beside them, never folded into the
  headline: LayerNorm 5/element (+2 with affine), softmax 5 per score + 1 for the q scaling, tanh-GELU 8,
  SiLU 4, adaLN modulate 2, gated residual 2, residual add / layer scale 1, cosine alignment 8 per token·dim
  (two normalisations and a dot product). FlopCounterMode cannot check them; for SiT-XL/2 they are ≈ 0.3 % of
  the matmul FLOPs.
- **Backward.** For a trained matmul, backward = 2× forward (input gradient + weight gradient), except where
  the input needs no gradient (the patch embedding reads the data, the first timestep Linear reads the fixed
  sinusoids): 1×. Attention: 2× (dQ, dK, dA, dV), no recomputation counted (FlashAttention recomputes Q·Kᵀ once
  more; see ``attention_recompute``). Frozen parts (the teacher encoder) run forward only. NT-Xent: only the
  query side is trained, so its logits' backward is 1× (dq). Elementwise backward ≈ 2× forward.
- **Phases.** ERW Phase 1 ("warmup") trains embedders + the first L blocks + the projector(s) and runs the frozen
  encoder forward; Phase 2 ("full"), REPA ("repa") train the whole SiT with projector(s) plus the encoder forward;
  plain SiT ("sit") has neither projector nor encoder, nor have the steps after the alignment stopped ("denoise");
  REG ("reg") is REPA with the class token.
- **REG's class token** (``cls_token_dim``; phase "reg", or any phase with ``class_token=True``): every block,
  the final layer's norm and the projectors run on 1 + N tokens, plus the class token's embedder (Linear Dc→D,
  whose input needs no gradient: backward 1×) and head (Linear D→Dc); the alignment covers 1 + N tokens. The
  teacher's forward already counts its CLS token.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the config module imports nothing heavy, but keep flops importable on its own
    from erw_fast.config import Config

FLOPS_PER_MAC = 2
MATMUL, ELEMENTWISE = "matmul", "elementwise"
PHASES = ("warmup", "full", "repa", "sit", "reg", "denoise")
UNALIGNED = ("sit", "denoise")  # no projector, no teacher: plain SiT and the steps after the alignment stopped
TIMESTEP_FREQ_DIM = 256  # SiT's sinusoidal timestep features

# Elementwise estimates, FLOPs per element (forward). See the module docstring.
_LN, _LN_AFFINE, _SOFTMAX, _GELU, _SILU, _MODULATE, _GATED_RESIDUAL = 5, 7, 6, 8, 4, 2, 2

# Published multiply-add counts (G per 256-px image, forward) from the DiT paper (Peebles & Xie 2023), which SiT
# shares: S/2 6.1, B/2 23.0, L/2 80.7, XL/2 118.6. The number of decimals is the stated precision.
DIT_PUBLISHED_GMACS: dict[str, tuple[float, int]] = {
    "SiT-S/2": (6.1, 1),
    "SiT-B/2": (23.0, 1),
    "SiT-L/2": (80.7, 1),
    "SiT-XL/2": (118.6, 1),
}

# The ERW paper's cost analysis (Fig. 4): GFLOPs per 256-image step of ERW SiT-XL/2 with DINOv2-B.
PAPER_GFLOPS_PER_STEP: dict[str, float] = {"warmup": 42.2e3, "full": 224.8e3}
PAPER_BATCH = 256


@dataclass(frozen=True)
class Component:
    """One accounted part: forward FLOPs, backward FLOPs when trained (0 if frozen), and its kind."""

    forward: float
    backward: float
    kind: str = MATMUL

    def __add__(self, other: Component) -> Component:
        if self.kind != other.kind:
            raise ValueError(f"cannot add a {self.kind} and an {other.kind} component")
        return Component(self.forward + other.forward, self.backward + other.backward, self.kind)

    def scaled(self, factor: float) -> Component:
        return Component(self.forward * factor, self.backward * factor, self.kind)


def _kinds(include_elementwise: bool) -> tuple[str, ...]:
    return (MATMUL, ELEMENTWISE) if include_elementwise else (MATMUL,)


@dataclass
class FlopBreakdown:
    """Per-component FLOPs of one forward (and backward) at ``batch`` samples.

    Totals count matmul FLOPs unless ``include_elementwise=True``. ``training()`` = forward + backward of the
    trained components + forward of the frozen ones.
    """

    label: str
    batch: int
    components: dict[str, Component] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    def add(self, name: str, forward: float, backward_factor: float, kind: str = MATMUL) -> None:
        part = Component(float(forward), float(forward) * backward_factor, kind)
        self.components[name] = self.components[name] + part if name in self.components else part

    def forward(self, include_elementwise: bool = False) -> float:
        kinds = _kinds(include_elementwise)
        return sum(c.forward for c in self.components.values() if c.kind in kinds)

    def backward(self, include_elementwise: bool = False) -> float:
        kinds = _kinds(include_elementwise)
        return sum(c.backward for c in self.components.values() if c.kind in kinds)

    def training(self, include_elementwise: bool = False) -> float:
        return self.forward(include_elementwise) + self.backward(include_elementwise)

    def macs(self) -> float:
        """Forward multiply-adds (matmul only): the unit of DiT's "Gflops"."""
        return self.forward() / FLOPS_PER_MAC

    def dit_gflops(self) -> float:
        """Forward G multiply-adds per sample: directly comparable to DiT's published Gflops."""
        return self.macs() / self.batch / 1e9

    def select(self, prefix: str) -> FlopBreakdown:
        """The components whose name starts with ``prefix``."""
        parts = {k: v for k, v in self.components.items() if k.startswith(prefix)}
        return FlopBreakdown(f"{self.label}[{prefix}]", self.batch, parts, dict(self.settings))

    def scaled(self, factor: float, label: str | None = None) -> FlopBreakdown:
        parts = {k: v.scaled(factor) for k, v in self.components.items()}
        return FlopBreakdown(label or self.label, self.batch, parts, dict(self.settings))

    def merged(self, *others: FlopBreakdown, label: str | None = None) -> FlopBreakdown:
        """Sum of several breakdowns (same batch); component names must not collide."""
        out = FlopBreakdown(label or self.label, self.batch, dict(self.components), dict(self.settings))
        for other in others:
            clash = set(out.components) & set(other.components)
            if clash:
                raise ValueError(f"component names collide: {sorted(clash)}")
            out.components.update(other.components)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "batch": self.batch,
            "forward_flops": self.forward(),
            "training_flops": self.training(),
            "forward_flops_with_elementwise": self.forward(True),
            "training_flops_with_elementwise": self.training(True),
            "components": {
                k: {"forward": c.forward, "backward": c.backward, "kind": c.kind} for k, c in self.components.items()
            },
            "settings": self.settings,
        }


def _mm(rows: float, k: int, n: int) -> float:
    """FLOPs of a (rows × k) @ (k × n) product."""
    return FLOPS_PER_MAC * rows * k * n


# ------------------------------------------------------------------------------------------------ SiT


@dataclass(frozen=True)
class SiTShape:
    """The numbers SiT's FLOPs depend on (resolved from a name + overrides or constructor kwargs)."""

    depth: int
    hidden_size: int
    num_heads: int
    patch_size: int
    input_size: int = 32
    in_channels: int = 4
    mlp_ratio: float = 4.0
    qk_norm: bool = False
    use_rope: bool = False

    @property
    def tokens(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)  # as SiTBlock builds it

    @classmethod
    def resolve(cls, model: str | Mapping[str, Any], **overrides: Any) -> SiTShape:
        from erw_fast.models.sit import sit_config

        kwargs = dict(sit_config(model, **overrides)) if isinstance(model, str) else {**dict(model), **overrides}
        defaults: dict[str, Any] = {"input_size": 32, "in_channels": 4, "mlp_ratio": 4.0, "qk_norm": False,
                                    "use_rope": False}
        values = {n: kwargs.get(n) if kwargs.get(n) is not None else defaults.get(n) for n in cls.__dataclass_fields__}
        missing = [n for n, v in values.items() if v is None]
        if missing:
            raise ValueError(f"model config lacks {missing}")
        shape = cls(**values)
        if shape.input_size % shape.patch_size:
            raise ValueError(f"input_size {shape.input_size} is not divisible by patch_size {shape.patch_size}")
        return shape


def _sit_block(out: FlopBreakdown, s: SiTShape, batch: int, blocks: int, attention_recompute: bool,
               prefix: int = 0) -> None:
    t = s.tokens + prefix  # the sequence: patches and the class token (REG)
    n, d, h = batch * t, s.hidden_size, s.mlp_hidden
    # qkv, proj, fc1, fc2 on every token
    out.add("sit.blocks.linear", blocks * (_mm(n, d, 3 * d) + _mm(n, d, d) + _mm(n, d, h) + _mm(n, h, d)), 2.0)
    # Q·Kᵀ and A·V: 2·T²·D multiply-adds per sample and block, split over heads
    attn = blocks * 2 * _mm(batch * t, d, t)
    out.add("sit.blocks.attention", attn, 2.0 + (0.5 if attention_recompute else 0.0))
    # adaLN-Zero: SiLU + Linear D→6D on the conditioning vector, once per sample
    out.add("sit.blocks.adaln", blocks * _mm(batch, d, 6 * d), 2.0)
    per_token = 2 * _LN * d + 2 * _MODULATE * d + 2 * _GATED_RESIDUAL * d + _GELU * h + _SOFTMAX * s.num_heads * t
    if s.qk_norm:
        per_token += 2 * _LN_AFFINE * d
    if s.use_rope:
        per_token += 2 * 3 * d  # q and k: x·cos + rotate(x)·sin
    out.add("sit.blocks.elementwise", blocks * (n * per_token + batch * _SILU * d), 2.0, ELEMENTWISE)


def _sit_embedders(out: FlopBreakdown, s: SiTShape, batch: int, cls_token_dim: int | None = None) -> None:
    n, d, p = batch * s.tokens, s.hidden_size, s.patch_size
    out.add("sit.embed.patch", _mm(n, s.in_channels * p * p, d), 1.0)  # reads the latents: no input gradient
    out.add("sit.embed.timestep", _mm(batch, TIMESTEP_FREQ_DIM, d), 1.0)  # reads the fixed sinusoids
    out.add("sit.embed.timestep", _mm(batch, d, d), 2.0)
    # label embedding: a table lookup (no FLOPs); + pos_embed, + label vector, SiLU inside the MLP
    out.add("sit.embed.elementwise", n * d + batch * (d + _SILU * d), 2.0, ELEMENTWISE)
    if cls_token_dim is not None:  # REG: Linear Dc→D on the (noisy) teacher CLS, affine LayerNorm, + pos_embed row
        out.add("sit.embed.class_token", _mm(batch, cls_token_dim, d), 1.0)
        out.add("sit.embed.elementwise", batch * (_LN_AFFINE + 1) * d, 2.0, ELEMENTWISE)


def _sit_final(out: FlopBreakdown, s: SiTShape, batch: int, cls_token_dim: int | None = None) -> None:
    n, d, p = batch * s.tokens, s.hidden_size, s.patch_size
    out.add("sit.final_layer", _mm(batch, d, 2 * d) + _mm(n, d, p * p * s.in_channels), 2.0)
    rows = n + (batch if cls_token_dim is not None else 0)  # the shared norm and modulation see the class token
    out.add("sit.final_layer.elementwise", rows * (_LN + _MODULATE) * d + batch * _SILU * d, 2.0, ELEMENTWISE)
    if cls_token_dim is not None:  # REG's class-token head: Linear D→Dc on token 0
        out.add("sit.final_layer", _mm(batch, d, cls_token_dim), 2.0)


def projector_flops(
    hidden_size: int, batch: int, tokens: int, z_dims: Sequence[int] = (768,), projector_dim: int = 2048,
    projector: str = "mlp", kernel_size: int = 1,
) -> FlopBreakdown:
    """REPA projector(s): Linear D→P, SiLU, Linear P→P, SiLU, Linear P→z on every token, one per encoder; or
    iREPA's conv (``projector='conv'``): a k×k Conv2d D→z on the token grid, k² times the MACs of a 1×1 (zero
    padding counted, as FlopCounterMode counts a convolution)."""
    out = FlopBreakdown("projector", batch, settings={"projector_dim": projector_dim, "z_dims": list(z_dims),
                                                      "projector": projector, "kernel_size": kernel_size})
    n = batch * tokens
    if projector == "conv":
        for z in z_dims:
            out.add("projector", _mm(n, hidden_size * kernel_size**2, z), 2.0)
        return out
    if projector != "mlp":
        raise ValueError(f"unknown projector {projector!r}; choose mlp or conv")
    for z in z_dims:
        out.add("projector", _mm(n, hidden_size, projector_dim) + _mm(n, projector_dim, projector_dim)
                + _mm(n, projector_dim, z), 2.0)
        out.add("projector.elementwise", n * 2 * _SILU * projector_dim, 2.0, ELEMENTWISE)
    return out


def sit_flops(
    model: str | Mapping[str, Any] = "SiT-XL/2",
    batch: int = 1,
    phase: str = "full",
    warmup_depth: int | None = None,
    encoder_depth: int | None = None,
    z_dims: Sequence[int] = (768,),
    projector_dim: int = 2048,
    attention_recompute: bool = False,
    cls_token_dim: int | None = None,
    projector: str | None = None,
    projector_kernel_size: int | None = None,
    **overrides: Any,
) -> FlopBreakdown:
    """FLOPs of the trained SiT part of one step at ``batch`` samples (no encoder, no loss).

    ``model``: a name ('SiT-XL/2') with constructor ``overrides`` (input_size, depth, hidden_size, …), or a
    mapping of SiT constructor keywords. ``phase``: 'full' / 'repa' (the whole SiT + projectors), 'warmup' (ERW
    Phase 1: embedders + first ``warmup_depth`` blocks + projectors), 'sit' / 'denoise' (the whole SiT, no
    projector), 'reg'
    (REPA's with REG's class token). ``z_dims=()`` also drops the projectors. ``encoder_depth`` only checks the
    value (where the projector reads does not change the FLOPs). ``attention_recompute`` adds FlashAttention's
    recomputed Q·Kᵀ to the backward. ``cls_token_dim``: REG's class token in any phase (default for 'reg':
    ``z_dims[0]``). ``projector``/``projector_kernel_size``: 'mlp' (default) or iREPA's 'conv' with its kernel
    (also read from a mapping of constructor keywords).
    """
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}; choose one of {PHASES}")
    if phase == "reg" and cls_token_dim is None:
        if not z_dims:
            raise ValueError("phase 'reg' needs the class token's width: pass z_dims or cls_token_dim")
        cls_token_dim = z_dims[0]
    if cls_token_dim is None and not isinstance(model, str):  # SiT constructor keywords may carry it
        cls_token_dim = dict(model).get("cls_token_dim")
    given = {} if isinstance(model, str) else dict(model)
    projector = projector or given.get("projector") or "mlp"
    kernel = projector_kernel_size or given.get("projector_kernel_size") or 1
    shape = SiTShape.resolve(model, **overrides)
    label = model if isinstance(model, str) else "SiT"
    if phase == "warmup":
        if warmup_depth is None or not 1 <= warmup_depth <= shape.depth:
            raise ValueError(f"phase 'warmup' needs warmup_depth in [1, {shape.depth}], got {warmup_depth}")
        blocks = warmup_depth
    else:
        blocks = shape.depth
    if encoder_depth is not None and not 1 <= encoder_depth <= shape.depth:
        raise ValueError(f"encoder_depth must be in [1, {shape.depth}], got {encoder_depth}")
    zs = [] if phase in UNALIGNED else list(z_dims)
    prefix = int(cls_token_dim is not None)
    out = FlopBreakdown(
        f"{label} {phase}", batch,
        settings={"model": label, "phase": phase, "blocks": blocks, "tokens": shape.tokens, "z_dims": zs,
                  "projector_dim": projector_dim, "cls_token_dim": cls_token_dim,
                  "sequence": shape.tokens + prefix, **{k: getattr(shape, k) for k in SiTShape.__dataclass_fields__}},
    )
    _sit_embedders(out, shape, batch, cls_token_dim)
    _sit_block(out, shape, batch, blocks, attention_recompute, prefix)
    if phase != "warmup":
        _sit_final(out, shape, batch, cls_token_dim)
    if zs:
        out = out.merged(projector_flops(shape.hidden_size, batch, shape.tokens + prefix, zs, projector_dim,
                                         projector, kernel))
    return out


# ------------------------------------------------------------------------------------------------ encoders


def encoder_flops(name: str, resolution: int = 256, batch: int = 1) -> FlopBreakdown:
    """Forward FLOPs of a frozen ViT teacher at ``resolution``-px images (patch embed + blocks, prefix tokens
    included; backward 0). Reads depth / width / heads / patch / MLP from the encoder registry."""
    from erw_fast.encoders import get_encoder_spec

    spec = get_encoder_spec(name)
    grid = spec.grid_size(resolution)
    patches = grid * grid
    tokens = patches + spec.num_prefix_tokens
    d = spec.embed_dim
    n = batch * tokens
    out = FlopBreakdown(
        f"{spec.name} @ {resolution}px", batch,
        settings={"encoder": spec.name, "resolution": resolution, "input_size": spec.input_size(resolution),
                  "patch_tokens": patches, "prefix_tokens": spec.num_prefix_tokens, "embed_dim": d,
                  "depth": spec.depth, "num_heads": spec.num_heads},
    )
    out.add("encoder.patch_embed", _mm(batch * patches, 3 * spec.patch_size**2, d), 0.0)
    if spec.mlp_hidden_dim is None:  # plain GELU MLP D → 4D → D
        hidden = 4 * d
        mlp = _mm(n, d, hidden) + _mm(n, hidden, d)
        mlp_elementwise = _GELU * hidden
    else:  # SwiGLU (ViT-g): fc1 D → 2H (value and gate), fc2 H → D
        hidden = spec.mlp_hidden_dim
        mlp = _mm(n, d, 2 * hidden) + _mm(n, hidden, d)
        mlp_elementwise = (_SILU + 1) * hidden
    out.add("encoder.blocks.linear", spec.depth * (_mm(n, d, 3 * d) + _mm(n, d, d) + mlp), 0.0)
    out.add("encoder.blocks.attention", spec.depth * 2 * _mm(batch * tokens, d, tokens), 0.0)
    per_token = 2 * _LN_AFFINE * d + 2 * d + mlp_elementwise + _SOFTMAX * spec.num_heads * tokens
    if spec.layer_scale:
        per_token += 2 * d
    elementwise = spec.depth * n * per_token + n * d + (n * _LN_AFFINE * d if spec.final_norm else 0)
    out.add("encoder.elementwise", elementwise, 0.0, ELEMENTWISE)
    return out


# ------------------------------------------------------------------------------------------------ alignment


def alignment_flops(
    batch: int,
    tokens: int,
    z_dims: Sequence[int] = (768,),
    objective: str = "cosine",
    negatives: str = "batch",
    symmetric: bool = False,
    manifold: bool = False,
) -> FlopBreakdown:
    """Alignment loss FLOPs for one group of ``batch`` samples (one micro-batch on one device).

    Cosine: elementwise only (≈ 8·M·D: two normalisations and a dot product), M = batch·tokens.
    NT-Xent logits: 2·M²·D with batch negatives, 2·T·B²·D with position negatives (T groups of B × B);
    ``symmetric`` computes the swapped direction again (×2). Backward: dq only (the targets are frozen): 1×.
    ``manifold`` (U-REPA): two T × T cosine Grams per image, 2·B·T²·z each; only the student's has a backward
    (two products, 2×), so 1× of the pair.
    """
    out = FlopBreakdown(f"alignment {objective}", batch,
                        settings={"objective": objective, "negatives": negatives, "symmetric": symmetric,
                                  "tokens": tokens, "z_dims": list(z_dims)})
    m = batch * tokens
    for z in z_dims:
        out.add("alignment.elementwise", 8 * m * z, 2.0, ELEMENTWISE)
        if manifold:
            out.add("alignment.manifold", 2 * batch * _mm(tokens, z, tokens), 1.0)
        if objective == "cosine":
            continue
        if objective != "nt_xent":
            raise ValueError(f"unknown alignment objective {objective!r}")
        if negatives == "batch":
            logits, scores = _mm(m, z, m), m * m
        elif negatives == "position":
            logits, scores = tokens * _mm(batch, z, batch), tokens * batch * batch
        else:
            raise ValueError(f"unknown negatives {negatives!r}")
        directions = 2 if symmetric else 1
        out.add("alignment.logits", directions * logits, 1.0)
        out.add("alignment.elementwise", directions * scores * _SOFTMAX, 2.0, ELEMENTWISE)
    return out


# ------------------------------------------------------------------------------------------------ per step


def check_phase(phase: str) -> str:
    """Validate a phase name (one of PHASES) and return it."""
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}; choose one of {PHASES}")
    return phase


def step_breakdown(
    model: str | Mapping[str, Any],
    phase: str,
    batch: int,
    *,
    encoders: Sequence[str] = ("dinov2-vit-b",),
    resolution: int = 256,
    warmup_depth: int = 4,
    projector_dim: int = 2048,
    objective: str = "cosine",
    negatives: str = "batch",
    symmetric: bool = False,
    alignment_group: int | None = None,
    attention_recompute: bool = False,
    class_token: bool | None = None,
    projector: str = "mlp",
    projector_kernel_size: int = 1,
    manifold: bool = False,
    **overrides: Any,
) -> FlopBreakdown:
    """Everything one training step computes at ``batch`` samples: the trained SiT part, the frozen encoder
    forward(s) and the alignment loss. ``alignment_group``: samples per NT-Xent negative set (the micro-batch
    on one device; default ``batch``). ``class_token``: REG's class token (the first encoder's width); default:
    for phase 'reg' only. ``projector``, ``projector_kernel_size``: the projector type (iREPA's conv);
    ``manifold``: U-REPA's manifold loss beside the alignment objective."""
    phase = check_phase(phase)
    aligns = phase not in UNALIGNED
    from erw_fast.encoders import get_encoder_spec

    z_dims = [get_encoder_spec(e).embed_dim for e in encoders] if aligns else []
    class_token = phase == "reg" if class_token is None else class_token and aligns
    sit = sit_flops(model, batch, phase, warmup_depth=warmup_depth if phase == "warmup" else None, z_dims=z_dims,
                    projector_dim=projector_dim, attention_recompute=attention_recompute,
                    cls_token_dim=z_dims[0] if class_token else None, projector=projector,
                    projector_kernel_size=projector_kernel_size, **overrides)
    parts = [sit]
    if aligns:
        parts += [encoder_flops(e, resolution, batch) for e in encoders]
        # Distinct names per encoder, so two teachers add up rather than collide.
        if len(encoders) > 1:
            parts = [parts[0]] + [
                FlopBreakdown(p.label, p.batch, {f"{k}[{i}]": v for k, v in p.components.items()}, p.settings)
                for i, p in enumerate(parts[1:])
            ]
        group = alignment_group or batch
        if batch % group:
            raise ValueError(f"alignment group {group} does not divide the batch {batch}")
        align = alignment_flops(group, sit.settings["sequence"], z_dims, objective, negatives, symmetric, manifold)
        parts.append(align.scaled(batch // group))
    out = parts[0].merged(*parts[1:], label=f"{sit.settings['model']} {phase} step")
    out.settings.update({"encoders": list(encoders) if aligns else [], "resolution": resolution,
                         "objective": objective if aligns else None, "alignment_group": alignment_group or batch})
    return out


def _config_model(config: Config) -> tuple[str, dict[str, Any]]:
    """The model's name and the shape-determining SiT arguments the config gives it (``ModelConfig.sit_kwargs``)."""
    kwargs = config.model.sit_kwargs()
    shape = ("depth", "hidden_size", "num_heads", "patch_size", "input_size", "in_channels", "mlp_ratio", "qk_norm",
             "use_rope")
    return config.model.name, {k: kwargs[k] for k in shape}


def step_flops(config: Config, phase: str, world_size: int = 1) -> dict[str, Any]:
    """Per-step FLOPs at the config's global batch for ``phase`` ('warmup', 'full', 'repa', 'sit', 'reg'); with
    REG's class token where the run's phase has it (run.mode reg / erw_reg; erw_reg's warmup only with
    reg.warmup_class_token).

    The NT-Xent negative set is the global batch (``alignment.negatives_scope: global``) or one micro-batch on
    one device (``local``: ``train.micro_batch_size``, else the global batch / ``world_size``). Returns totals
    (matmul FLOPs; ``*_with_elementwise`` adds the estimates), the split model / encoder / alignment, and the
    component breakdown.
    """
    name, overrides = _config_model(config)
    batch = config.train.global_batch_size
    a = config.alignment
    local = config.train.micro_batch_size or max(batch // world_size, 1)
    group = batch if a.negatives_scope == "global" else local  # global: every query meets the global batch
    b = step_breakdown(
        name, phase, batch, encoders=config.encoder.names, resolution=config.encoder.resolution,
        warmup_depth=config.erw.warmup_depth, projector_dim=config.model.projector_dim, objective=a.objective,
        negatives=a.negatives, symmetric=a.symmetric, alignment_group=group,
        class_token=config.class_token_in(phase), projector=a.projector,
        projector_kernel_size=a.projector_kernel_size, manifold=a.manifold_weight > 0, **overrides,
    )
    model = FlopBreakdown("model", batch, {k: v for k, v in b.components.items() if k.startswith(("sit.", "proj"))})
    return {
        "phase": phase,
        "global_batch": batch,
        "total": b.training(),
        "total_with_elementwise": b.training(True),
        "model_forward": model.forward(),
        "model_training": model.training(),
        "encoder_forward": b.select("encoder").forward(),
        "alignment_training": b.select("alignment").training(),
        "breakdown": b,
    }


def gflops_per_step(config: Config, phase_name: str, world_size: int = 1) -> float:
    """GFLOP per training step (matmul FLOPs, forward + backward, encoder forward) for the trainer's summary."""
    return step_flops(config, phase_name, world_size)["total"] / 1e9


# ------------------------------------------------------------------------------------------------ cost splits


@dataclass(frozen=True)
class BudgetSplit:
    """A training schedule: ``warmup`` ERW Phase-1 steps then ``full`` steps (REPA: label 'REPA', warmup 0)."""

    label: str
    warmup: int
    full: int


DEFAULT_SPLITS: tuple[BudgetSplit, ...] = (
    BudgetSplit("0K+100K", 0, 100_000),
    BudgetSplit("10K+90K", 10_000, 90_000),
    BudgetSplit("20K+80K", 20_000, 80_000),
    BudgetSplit("50K+50K", 50_000, 50_000),
    BudgetSplit("100K+100K", 100_000, 100_000),
    BudgetSplit("REPA 100K", 0, 100_000),
)


def split_totals(
    per_step: Mapping[str, float], splits: Iterable[BudgetSplit] = DEFAULT_SPLITS
) -> list[dict[str, Any]]:
    """Total FLOPs of each split from per-step costs {'warmup': …, 'full': …} (REPA rows use 'repa' if given)."""
    rows = []
    for s in splits:
        full_cost = per_step.get("repa", per_step["full"]) if s.label.startswith("REPA") else per_step["full"]
        warm = s.warmup * per_step["warmup"]
        full = s.full * full_cost
        rows.append({"label": s.label, "warmup_steps": s.warmup, "full_steps": s.full, "warmup_flops": warm,
                     "full_flops": full, "total_flops": warm + full})
    return rows


def relative_error(value: float, reference: float) -> float:
    return abs(value - reference) / abs(reference) if reference else math.inf
