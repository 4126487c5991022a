"""Per-phase training losses: ERW Phase 1 (alignment only, clean latents at t = 0) and the diffusion loss
with weighted alignment of Phase 2 / REPA / plain SiT, and REG's class-token term on either."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from erw_fast.kernels._utils import check_temperature
from erw_fast.objectives.alignment import NEGATIVE_SETS, nt_xent_loss, repa_cosine_loss
from erw_fast.objectives.attention_distill import AttentionDistillation
from erw_fast.objectives.interpolants import Interpolant
from erw_fast.objectives.manifold import manifold_loss

ALIGNMENT_OBJECTIVES = ("cosine", "nt_xent")


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over all non-batch dimensions."""
    return x.mean(dim=tuple(range(1, x.dim())))


@dataclass(frozen=True)
class AlignmentObjective:
    """Which alignment loss to use and how. ``objective``: 'cosine' (REPA, the released ERW code) or
    'nt_xent' (the ERW paper's stated objective). ``manifold_weight`` w > 0 adds U-REPA's manifold loss: the
    alignment value is then objective + w · manifold, so it rides on the phase's alignment weight (λ)."""

    objective: str = "cosine"
    temperature: float = 0.1
    negatives: str = "batch"
    symmetric: bool = False
    backend: str = "auto"
    negatives_scope: str = "local"  # global: NT-Xent's candidates are keys the step passes in (``with_keys``)
    # The global batch's teacher features (one per encoder) and the row of this micro-batch's first sample.
    keys: tuple[torch.Tensor, ...] | None = field(default=None, compare=False, repr=False)
    key_offset: int = 0
    manifold_weight: float = 0.0
    projector: str = "mlp"  # the projector the alignment reads ('mlp', 'conv k=3'): said in the phase's log line

    def __post_init__(self) -> None:
        if self.objective not in ALIGNMENT_OBJECTIVES:
            raise ValueError(f"unknown alignment objective {self.objective!r}; choose one of {ALIGNMENT_OBJECTIVES}")
        if self.negatives not in NEGATIVE_SETS:
            raise ValueError(f"unknown negatives {self.negatives!r}; choose one of {NEGATIVE_SETS}")
        check_temperature(self.temperature)
        if self.negatives_scope not in ("global", "local"):
            raise ValueError(f"unknown negatives scope {self.negatives_scope!r}; choose global or local")
        if not self.manifold_weight >= 0:
            raise ValueError(f"manifold_weight must be ≥ 0, got {self.manifold_weight}")

    @property
    def wants_global_keys(self) -> bool:
        """NT-Xent over the global batch: the step gathers every rank's and micro-batch's teacher features."""
        return self.objective == "nt_xent" and self.negatives_scope == "global"

    def with_keys(self, keys: Sequence[torch.Tensor], offset: int) -> AlignmentObjective:
        """This objective for one micro-batch whose samples start at row ``offset`` of ``keys``."""
        return replace(self, keys=tuple(keys), key_offset=offset)

    def __call__(self, projs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.terms(projs, targets)[0]

    def terms(self, projs: Sequence[torch.Tensor],
              targets: Sequence[torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the alignment value, the unweighted manifold loss or None when manifold_weight is 0)."""
        align = self._objective(projs, targets)
        if not self.manifold_weight:
            return align, None
        if targets is None:  # global keys: this micro-batch's rows are its targets
            b = projs[0].shape[0]
            targets = [k[self.key_offset : self.key_offset + b] for k in self.keys]
        manifold = manifold_loss(projs, targets)
        return align + self.manifold_weight * manifold, manifold

    def _objective(self, projs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor] | None) -> torch.Tensor:
        if self.objective == "cosine":
            return repa_cosine_loss(projs, targets, backend=self.backend)
        if self.keys is not None:  # the positives are the keys at key_offset: targets are those rows
            return nt_xent_loss(projs, None, temperature=self.temperature, negatives=self.negatives,
                                symmetric=self.symmetric, backend=self.backend, keys=list(self.keys),
                                key_offset=self.key_offset)
        return nt_xent_loss(
            projs, targets, temperature=self.temperature, negatives=self.negatives,
            symmetric=self.symmetric, backend=self.backend,
        )


def legacy_warmup_cosine_loss(projs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> torch.Tensor:
    """The released ERW warmup loss, bug included: a mis-indented loop leaves only the *last* sample of the
    local batch in the sum, which is still divided by B (and by the number of encoders). Off by default; kept
    only to reproduce reference runs."""
    batch = projs[0].shape[0]
    total = projs[0].new_zeros((), dtype=torch.float32)
    for proj, target in zip(projs, targets, strict=True):
        q = F.normalize(proj[-1].float(), dim=-1)
        k = F.normalize(target[-1].float(), dim=-1)
        total = total + (-(q * k).sum(dim=-1)).mean()
    return total / (len(projs) * batch)


def phase1_loss(
    model: torch.nn.Module,
    latents: torch.Tensor,
    labels: torch.Tensor,
    encoder_features: Sequence[torch.Tensor],
    alignment: AlignmentObjective,
    legacy_warmup_loss: bool = False,
    force_drop_ids: torch.Tensor | None = None,
    cls_token: torch.Tensor | None = None,
    terms: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
    """ERW Phase 1: the Phase-1 model on clean latents at t = 0, trained on the alignment loss alone.

    ``force_drop_ids`` (1 = drop the label) replaces the model's own label-dropout draw. ``cls_token``: the
    clean class token of a class-token model (this project's extension of ERW's warmup to REG). ``terms``: return
    (the alignment value, U-REPA's unweighted manifold loss or None) as ``AlignmentObjective.terms``."""
    t = torch.zeros(latents.shape[0], device=latents.device, dtype=latents.dtype)
    extra = {} if cls_token is None else {"cls_token": cls_token}
    if force_drop_ids is None:
        projs = model(latents, t, labels, **extra)
    else:
        projs = model(latents, t, labels, force_drop_ids, **extra)
    if legacy_warmup_loss:
        legacy = legacy_warmup_cosine_loss(projs, encoder_features)
        return (legacy, None) if terms else legacy
    return alignment.terms(projs, encoder_features) if terms else alignment(projs, encoder_features)


@dataclass
class DiffusionLossOutput:
    loss: torch.Tensor  # what is back-propagated: diffusion + λ·alignment (+ REG's cls_weight·class-token loss)
    diffusion: torch.Tensor
    alignment: torch.Tensor | None
    cls: torch.Tensor | None = None  # REG: the class token's velocity MSE (unweighted)
    manifold: torch.Tensor | None = None  # U-REPA: the manifold loss (unweighted; inside ``alignment`` with its w)
    attn: torch.Tensor | None = None  # HASTE: the attention distillation loss (unweighted)


def diffusion_loss(
    model: torch.nn.Module,
    latents: torch.Tensor,
    labels: torch.Tensor,
    interpolant: Interpolant,
    *,
    time_weighting: str = "uniform",
    encoder_features: Sequence[torch.Tensor] | None = None,
    alignment: AlignmentObjective | None = None,
    alignment_weight: float = 0.0,
    generator: torch.Generator | None = None,
    t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    force_drop_ids: torch.Tensor | None = None,
    cls_token: torch.Tensor | None = None,
    cls_noise: torch.Tensor | None = None,
    cls_weight: float = 0.0,
    attention: AttentionDistillation | None = None,
    teacher_attention: Sequence[torch.Tensor] | None = None,
    attention_weight: float = 0.0,
    project: bool = True,
) -> DiffusionLossOutput:
    """v-prediction MSE at t drawn from ``time_weighting`` (+ λ·alignment when features are given).

    Used for ERW Phase 2 (λ from the schedule), REPA (constant λ) and plain SiT (no features). ``t``, ``noise``
    and ``force_drop_ids`` may be given (the trainer draws them per global batch); otherwise they are drawn here
    (t, noise from ``generator``) and by the model (label dropout).

    REG (``cls_token``, the teacher's clean CLS, (B, Dc)): it is noised with the same path and t as the latent
    (``cls_noise``, drawn after the latent noise when not given), the model predicts its velocity from token 0,
    and ``cls_weight`` · the per-sample mean over Dc of its squared error, averaged over the batch, is added.

    HASTE (``attention`` with the teacher's maps ``teacher_attention``): the model also returns the attention
    logits of the distilled blocks and heads, and ``attention_weight`` · their soft cross-entropy is added.

    ``project=False`` asks the model not to run its projectors (once the alignment weights are 0 for good)."""
    if t is None:
        t = interpolant.sample_time(
            latents.shape[0], time_weighting, device=latents.device, dtype=latents.dtype, generator=generator
        )
    if noise is None:
        noise = torch.randn(latents.shape, device=latents.device, dtype=latents.dtype, generator=generator)
    x_t, target = interpolant.interpolate(latents, noise, t)
    extra = () if force_drop_ids is None else (force_drop_ids,)
    maps = {} if attention is None else {"attn_blocks": attention.student_blocks,
                                         "attn_heads": attention.student_heads}
    if not project:  # only then: any model keeps working with the plain call
        maps["project"] = False
    if cls_token is None:
        prediction, projs, *student_attention = model(x_t, t, labels, *extra, **maps)
    else:
        if cls_noise is None:
            cls_noise = torch.randn(cls_token.shape, device=cls_token.device, dtype=cls_token.dtype,
                                    generator=generator)
        cls_t, cls_target = interpolant.interpolate(cls_token, cls_noise, t)
        prediction, projs, cls_prediction, *student_attention = model(x_t, t, labels, *extra, cls_token=cls_t,
                                                                       **maps)
    diffusion = mean_flat((prediction.float() - target.float()) ** 2).mean()
    loss, align, cls, manifold = diffusion, None, None, None
    if encoder_features is not None and alignment is not None:
        align, manifold = alignment.terms(projs, encoder_features)
        loss = loss + alignment_weight * align
    if cls_token is not None:
        cls = mean_flat((cls_prediction.float() - cls_target.float()) ** 2).mean()
        loss = loss + cls_weight * cls
    attn = None
    if attention is not None:
        if teacher_attention is None:
            raise ValueError("attention distillation needs the teacher's attention maps (teacher_attention=)")
        attn = attention(student_attention[0], teacher_attention)
        loss = loss + attention_weight * attn
    return DiffusionLossOutput(loss, diffusion, align, cls, manifold, attn)
