"""The phases of a run. Each says what model it builds, what it computes per micro-batch, what it carries into the
next phase and what it logs; the trainer runs them in order and never asks which one it has.

- ``WarmupPhase``: ERW Phase 1, the L2R warmup. The embedders, the first L blocks and the projector on clean
  latents (t = 0), trained on the alignment loss alone; its weights seed the full model.
- ``DiffusionPhase``: the full SiT on x_t = α_t·x0 + σ_t·ε, v-prediction MSE + λ(s)·alignment. ERW Phase 2
  (λ decaying from c0), REPA (constant λ) or plain SiT (no teacher, no alignment).
- ``RegPhase``: a ``DiffusionPhase`` on a class-token SiT (REG): the teacher's CLS token, noised with the
  latent's t, is token 0; + cls_weight · its velocity MSE; alignment over [CLS, patches]. REPA + REG (constant λ)
  or ERW's Phase 2 with REG (λ decaying).
- ``RegWarmupPhase``: ERW's warmup on the class-token model (clean CLS at t = 0, 1 + N tokens aligned), this
  project's extension.
- ``DenoisePhase``: what follows a diffusion phase once every alignment weight is 0 for good (HASTE's
  ``denoise_only``): the same model, optimizer, EMA and step count, the diffusion loss alone; no teacher, no
  projector, no attention capture, no images.

One global step counter runs over the whole run: phase k covers steps [start, end).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from erw_fast.config import Config, ConfigError
from erw_fast.encoders.teacher import Teacher, TeacherTargets
from erw_fast.models import SiT, SiTPhase1, TransferReport, transfer_phase1_weights
from erw_fast.objectives import (
    AlignmentObjective,
    AttentionDistillation,
    ERWLambdaSchedule,
    Interpolant,
    WeightSchedule,
    diffusion_loss,
    erw_c0_preset,
    phase1_loss,
    weight_schedule,
)
from erw_fast.randomness import StepDraw

Losses = tuple[torch.Tensor, dict[str, torch.Tensor]]  # what is back-propagated, and the parts that are logged
Keys = tuple[list[torch.Tensor], int]  # the global batch's teacher features, and this micro-batch's first row


class Phase:
    """Steps [start, end) of a run, trained with one model and one loss."""

    name: str
    aligns: bool = True  # whether the teacher runs
    end_tag: str | None = None  # a checkpoint written under this tag when the phase completes
    monitored: bool = True  # the EMA monitors (samples, CKNNA, FID) run in this phase
    exported: bool = True  # a run that ends in this phase writes the reference-layout export
    class_token: bool = False  # REG: the model takes the first encoder's CLS token as token 0
    keeps_state: bool = False  # entered with the previous phase's optimizer state (after the alignment stopped)

    def __init__(self, start: int, end: int, teacher: Teacher, alignment: AlignmentObjective) -> None:
        self.start, self.end = start, end
        self.teacher = teacher
        self.alignment = alignment

    def build_model(self, sit_kwargs: dict[str, Any]) -> nn.Module:
        raise NotImplementedError

    def targets(self, batch: dict[str, torch.Tensor], sl: slice) -> list[torch.Tensor] | None:
        """The teacher's features of the micro-batch ``sl`` (None when this phase does not align); with a class
        token, [CLS, patch tokens] per encoder."""
        return self.teacher.targets(batch, sl, with_cls=self.class_token) if self.aligns else None

    def _model_kwargs(self, sit_kwargs: dict[str, Any]) -> dict[str, Any]:
        """The SiT's arguments: a class token has the first encoder's width (as REG builds it)."""
        if not self.class_token:
            return sit_kwargs
        return {**sit_kwargs, "cls_token_dim": sit_kwargs["z_dims"][0]}

    @property
    def global_keys(self) -> bool:
        """Whether the step must gather the whole global batch's teacher features (NT-Xent, global negatives)."""
        return self.aligns and self.alignment.wants_global_keys

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], sl: slice,
             targets: Sequence[torch.Tensor] | None, draw: StepDraw, step: int, keys: Keys | None = None) -> Losses:
        """What is back-propagated for the micro-batch ``sl``, and the logged parts."""
        raise NotImplementedError

    def _alignment(self, keys: Keys | None) -> AlignmentObjective:
        return self.alignment if keys is None else self.alignment.with_keys(*keys)

    def alignment_weight(self, step: int) -> float:
        """λ at ``step``, as logged (NaN where no λ weighs an alignment term)."""
        return float("nan")

    def attention_weight(self, step: int) -> float | None:
        """HASTE's attention-distillation weight at ``step`` (None: this phase has no such term)."""
        return None

    def carry_into(self, weights: dict[str, torch.Tensor], model: nn.Module) -> TransferReport | None:
        """Hand this phase's final weights to the next phase's freshly built ``model``."""
        return None

    def describe(self, device: torch.device) -> str:
        """The alignment objective and backend this phase runs (the NT-Xent kernels' form and tiles)."""
        a = self.alignment
        if not self.aligns:
            return f"alignment {a.objective}/-"
        text = f"alignment {a.objective}/{a.backend}"
        if a.objective == "nt_xent" and a.backend == "triton":
            from erw_fast.kernels.tiles import describe_tiles

            # The teacher's features are frozen: the one-sided loss takes the kernels' one-pass form.
            form = "two passes (symmetric)" if a.symmetric else "one pass, frozen teacher"
            text += f" ({form}; {describe_tiles(device)})"
        text += f", {a.projector} projector, target normalisation {self.teacher.target_norm.describe()}"
        if a.manifold_weight:
            text += f", + {a.manifold_weight:g}·U-REPA manifold loss"
        if self.class_token:
            text += ", REG class token (the first encoder's CLS)"
        return text


class WarmupPhase(Phase):
    """ERW Phase 1 (L2R warmup): weight · alignment loss, at t = 0, on the first ``depth`` blocks; no RoPE unless
    asked for (the reference's warmup model never has it)."""

    name = "warmup"
    end_tag = "phase1"
    monitored = False  # no final layer: nothing to sample
    exported = False

    def __init__(self, start: int, end: int, teacher: Teacher, alignment: AlignmentObjective, *, depth: int,
                 reuse_projector: bool, legacy_loss: bool, weight: float, rope: bool) -> None:
        super().__init__(start, end, teacher, alignment)
        self.depth, self.reuse_projector, self.legacy_loss = depth, reuse_projector, legacy_loss
        self.weight, self.rope = weight, rope

    def build_model(self, sit_kwargs: dict[str, Any]) -> nn.Module:
        return SiTPhase1(self.depth, **{**self._model_kwargs(sit_kwargs), "use_rope": self.rope})

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], sl: slice,
             targets: Sequence[torch.Tensor] | None, draw: StepDraw, step: int, keys: Keys | None = None) -> Losses:
        assert targets is not None
        cls_token = targets[0][:, 0] if self.class_token else None  # the clean CLS: t = 0
        align, manifold = phase1_loss(model, batch["latents"][sl], batch["labels"][sl], targets,
                                      self._alignment(keys), legacy_warmup_loss=self.legacy_loss,
                                      force_drop_ids=draw.drop_labels, cls_token=cls_token, terms=True)
        loss = self.weight * align
        parts = {"loss": loss, "loss_align": align}
        if manifold is not None:
            parts["loss_manifold"] = manifold
        return loss, parts

    def carry_into(self, weights: dict[str, torch.Tensor], model: nn.Module) -> TransferReport:
        return transfer_phase1_weights(weights, model, include_projectors=self.reuse_projector)


class RegWarmupPhase(WarmupPhase):
    """ERW's warmup on REG's class-token model — this project's extension, in neither released code: the clean
    latents and the teacher's clean CLS token at t = 0, the alignment over all 1 + N tokens (token 0 with the
    CLS); the class-token embedder is carried into Phase 2 with the rest."""

    class_token = True

    def describe(self, device: torch.device) -> str:
        return super().describe(device) + ", clean at t = 0 (this project's extension)"


class DiffusionPhase(Phase):
    """The full SiT: diffusion loss + λ(step)·alignment (``lam`` None: plain SiT, no alignment), + HASTE's
    attn_lam(step)·attention distillation (``attn``: which blocks and heads; None: off)."""

    def __init__(self, name: str, start: int, end: int, teacher: Teacher, alignment: AlignmentObjective, *,
                 interpolant: Interpolant, encoder_depth: int, lam: WeightSchedule | None,
                 attn: AttentionDistillation | None = None, attn_lam: WeightSchedule | None = None) -> None:
        super().__init__(start, end, teacher, alignment)
        self.name, self.aligns = name, lam is not None
        self.interpolant, self.encoder_depth, self.lam = interpolant, encoder_depth, lam
        if (attn is None) != (attn_lam is None) or (attn is not None and lam is None):
            raise ValueError("attention distillation needs both attn and attn_lam, and a phase that runs the teacher")
        if attn is not None and alignment.wants_global_keys:  # the gathered keys carry no attention maps
            raise ValueError("attention distillation takes the teacher's maps per micro-batch: use NT-Xent's local "
                             "negatives scope")
        self.attn, self.attn_lam = attn, attn_lam

    def targets(self, batch: dict[str, torch.Tensor], sl: slice) -> list[torch.Tensor] | None:
        if self.attn is None:
            return super().targets(batch, sl)
        with self.teacher.attention_logits(self.attn.teacher_blocks, self.attn.teacher_heads) as maps:
            features = super().targets(batch, sl)
        if not maps:
            raise ValueError("attention distillation: the teacher produced no attention maps (precomputed "
                             "features cannot give them; HASTE needs the online teacher)")
        return TeacherTargets(features, maps)

    def build_model(self, sit_kwargs: dict[str, Any]) -> nn.Module:
        return SiT(encoder_depth=self.encoder_depth, **self._model_kwargs(sit_kwargs))

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], sl: slice,
             targets: Sequence[torch.Tensor] | None, draw: StepDraw, step: int, keys: Keys | None = None) -> Losses:
        latents = batch["latents"][sl]
        out = diffusion_loss(
            model, latents, batch["labels"][sl], self.interpolant, encoder_features=targets,
            alignment=self._alignment(keys) if self.aligns else None, alignment_weight=self.alignment_weight(step),
            t=draw.t.to(latents.dtype), noise=draw.noise.to(latents.dtype), force_drop_ids=draw.drop_labels,
            **self._class_token_inputs(targets, draw, latents.dtype), **self._attention_inputs(targets, step),
        )
        parts = {"loss": out.loss, "loss_diffusion": out.diffusion}
        if out.alignment is not None:
            parts["loss_align"] = out.alignment
        if out.manifold is not None:
            parts["loss_manifold"] = out.manifold
        if out.cls is not None:
            parts["loss_cls"] = out.cls
        if out.attn is not None:
            parts["loss_attn"] = out.attn
        return out.loss, parts

    def _attention_inputs(self, targets: Sequence[torch.Tensor] | None, step: int) -> dict[str, Any]:
        """HASTE's inputs to the loss; none once its weight is 0 (the student's maps are then not computed)."""
        weight = self.attention_weight(step)
        if not weight:
            return {}
        assert isinstance(targets, TeacherTargets), "HASTE's teacher maps come with the targets"
        return {"attention": self.attn, "teacher_attention": targets.attention, "attention_weight": weight}

    def attention_weight(self, step: int) -> float | None:
        return self.attn_lam(step) if self.attn_lam is not None else None

    def describe(self, device: torch.device) -> str:
        text = super().describe(device)
        if self.attn is not None:
            a, stop = self.attn, self.attn_lam.zero_from
            text += (f", HASTE attention distillation (SiT blocks {list(a.student_blocks)} ↔ teacher blocks "
                     f"{list(a.teacher_blocks)}, {len(a.student_heads)} heads, weight {self.attn_lam(self.start)}"
                     + (f", off from step {stop})" if stop is not None else ")"))
        return text

    def _class_token_inputs(self, targets: Sequence[torch.Tensor] | None, draw: StepDraw,
                            dtype: torch.dtype) -> dict[str, Any]:
        return {}

    def alignment_weight(self, step: int) -> float:
        return self.lam(step) if self.lam is not None else float("nan")


class RegPhase(DiffusionPhase):
    """REG: the diffusion phase on a class-token SiT. The first encoder's CLS token is noised with the latent's
    t and its own noise (the step draw's ``cls_noise``), enters as token 0, and cls_weight · the MSE of its
    predicted velocity joins the loss; the alignment target is [CLS, patch tokens] over all 1 + N projector
    tokens. λ: REPA's constant (run.mode reg) or ERW's schedule (Phase 2 of erw_reg)."""

    class_token = True

    def __init__(self, name: str, start: int, end: int, teacher: Teacher, alignment: AlignmentObjective, *,
                 interpolant: Interpolant, encoder_depth: int, lam: WeightSchedule,
                 cls_weight: float, attn: AttentionDistillation | None = None,
                 attn_lam: WeightSchedule | None = None) -> None:
        super().__init__(name, start, end, teacher, alignment, interpolant=interpolant, encoder_depth=encoder_depth,
                         lam=lam, attn=attn, attn_lam=attn_lam)
        self.cls_weight = cls_weight

    def _class_token_inputs(self, targets: Sequence[torch.Tensor] | None, draw: StepDraw,
                            dtype: torch.dtype) -> dict[str, Any]:
        assert targets is not None and draw.cls_noise is not None, "REG needs the teacher and the class-token noise"
        return {"cls_token": targets[0][:, 0].to(dtype), "cls_noise": draw.cls_noise.to(dtype),
                "cls_weight": self.cls_weight}


class DenoisePhase(DiffusionPhase):
    """The rest of the run once every alignment weight of the diffusion phase ``after`` is 0 for good (HASTE's
    ``denoise_only``, from its early-stop point on): the same SiT, the diffusion loss alone. The trainer carries
    the model, optimizer state, EMA and skip counters over through the checkpoint at ``start`` (as a resume
    does), and the loader stops reading images. The projectors stay in the model (and its checkpoints and
    exports) but are not run: they get no gradient (AdamW skips them, DDP is told to ignore them) and the EMA
    keeps following their frozen weights."""

    name = "denoise"
    keeps_state = True  # the hand-over keeps the optimizer state (ERW's phase switch drops it)

    def __init__(self, start: int, end: int, teacher: Teacher, alignment: AlignmentObjective, *,
                 interpolant: Interpolant, encoder_depth: int, after: str) -> None:
        super().__init__("denoise", start, end, teacher, alignment, interpolant=interpolant,
                         encoder_depth=encoder_depth, lam=None)
        self.after = after  # the aligned phase it continues

    def build_model(self, sit_kwargs: dict[str, Any]) -> nn.Module:
        model = super().build_model(sit_kwargs)
        # Parameters that get no gradient from here on: the engine tells DDP not to wait for them.
        model.unused_parameters = [n for n, _ in model.named_parameters() if n.startswith("projectors.")]
        return model

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], sl: slice,
             targets: Sequence[torch.Tensor] | None, draw: StepDraw, step: int, keys: Keys | None = None) -> Losses:
        latents = batch["latents"][sl]
        out = diffusion_loss(model, latents, batch["labels"][sl], self.interpolant, t=draw.t.to(latents.dtype),
                             noise=draw.noise.to(latents.dtype), force_drop_ids=draw.drop_labels, project=False)
        return out.loss, {"loss": out.loss, "loss_diffusion": out.diffusion}

    def alignment_weight(self, step: int) -> float:
        return 0.0

    def describe(self, device: torch.device) -> str:
        return (f"alignment stopped after phase {self.after}: diffusion loss only (teacher, projector, attention "
                "capture and image decode switched off)")


def alignment_schedule(config: Config, start: int, erw: ERWLambdaSchedule | None) -> WeightSchedule:
    """λ of the diffusion phase that begins at ``start`` from ``alignment.schedule/weight/stop_step``; ``erw``:
    ERW's decay in its Phase 2 (None in the other modes). auto: erw in ERW's Phase 2, constant otherwise."""
    a = config.alignment
    kind = a.schedule if a.schedule != "auto" else ("erw" if erw is not None else "constant")
    try:
        return weight_schedule(kind, a.weight, start=start, stop_step=a.stop_step, erw=erw)
    except ValueError as error:
        raise ConfigError(f"alignment.schedule={a.schedule}: {error}") from None


def stop_point(phase: DiffusionPhase) -> int | None:
    """The first step from which every alignment term of ``phase`` is 0 for good (the max of the terms'
    ``zero_from``; None when one never reaches 0). The terms: λ and HASTE's attention weight ``attn_lam``."""
    terms = [w for w in (phase.lam, phase.attn_lam) if w is not None]
    ends = [w.zero_from for w in terms]
    if not terms or any(e is None for e in ends):
        return None
    return max(ends)


def with_stop(phase: DiffusionPhase) -> list[Phase]:
    """``phase``, cut at its stop point E and followed by a ``DenoisePhase`` over [E, end) when its alignment
    terms are 0 for good from a step inside it. Not for REG: its class token is the teacher's CLS at every
    step, so the teacher keeps running (λ is 0 all the same). A weight that is 0 from the phase's first step
    changes nothing either (the phase runs as it always did; run.mode sit trains without a teacher)."""
    e = stop_point(phase)
    if e is None or phase.class_token or not phase.start < e < phase.end:
        return [phase]
    denoise = DenoisePhase(e, phase.end, phase.teacher, phase.alignment, interpolant=phase.interpolant,
                           encoder_depth=phase.encoder_depth, after=phase.name)
    phase.end = e
    return [phase, denoise]


def plan_phases(config: Config, teacher: Teacher, alignment_backend: str) -> list[Phase]:
    """The run's phases in order: ERW (erw, erw_reg) = warmup then full; REPA, REG and plain SiT are one phase."""
    c = config
    a = c.alignment
    alignment = AlignmentObjective(a.objective, a.temperature, a.negatives, a.symmetric, alignment_backend,
                                   a.negatives_scope, manifold_weight=a.manifold_weight,
                                   projector=f"conv k={a.projector_kernel_size}" if a.projector == "conv" else "mlp")
    total = c.train.total_steps

    def full(name: str, start: int, lam: WeightSchedule | None) -> list[Phase]:
        common = dict(interpolant=Interpolant(c.diffusion.path_type), encoder_depth=a.encoder_depth, lam=lam,
                      **_haste_term(c, start))
        if c.run.class_token:
            phase = RegPhase(name, start, total, teacher, alignment, cls_weight=c.reg.cls_weight, **common)
        else:
            phase = DiffusionPhase(name, start, total, teacher, alignment, **common)
        return with_stop(phase)

    if c.run.warmup:
        e = c.erw
        c0 = e.c0 if e.c0 is not None else erw_c0_preset(c.model.name)
        kind = RegWarmupPhase if c.reg.warmup_class_token else WarmupPhase
        warmup = kind(0, e.warmup_steps, teacher, alignment, depth=e.warmup_depth,
                      reuse_projector=e.reuse_projector, legacy_loss=e.legacy_warmup_loss,
                      weight=e.warmup_loss_weight, rope=e.warmup_rope)
        erw = ERWLambdaSchedule(c0, e.warmup_steps, total, e.half_life)
        return [warmup, *full("full", e.warmup_steps, alignment_schedule(c, e.warmup_steps, erw))]
    if c.run.mode in ("repa", "reg"):
        return full(c.run.mode, 0, alignment_schedule(c, 0, None))
    return full("sit", 0, None)


def _haste_term(c: Config, start: int) -> dict[str, Any]:
    """HASTE's attention distillation for the diffusion phase beginning at ``start`` (ERW: Phase 2 only): the
    block pairs, the student heads (default: the first H_teacher) and its weight over the steps."""
    h = c.haste
    if not h.attn_weight > 0:
        return {}
    from erw_fast.encoders.registry import get_encoder_spec, parse_encoder_names

    teacher_heads = get_encoder_spec(parse_encoder_names(c.encoder.names)[0]).num_heads
    heads = h.student_heads if h.student_heads is not None else range(teacher_heads)
    attn = AttentionDistillation(tuple(h.student_blocks), tuple(h.teacher_blocks), tuple(heads))
    return {"attn": attn, "attn_lam": weight_schedule(h.schedule, h.attn_weight, start=start, stop_step=h.stop_step)}
