"""Training objectives: interpolants, alignment losses (REPA cosine, NT-Xent), λ schedules, phase losses."""

from erw_fast.objectives.alignment import (
    ALIGNMENT_BACKENDS,
    NEGATIVE_SETS,
    nt_xent_loss,
    repa_cosine_loss,
    resolve_alignment_backend,
)
from erw_fast.objectives.attention_distill import AttentionDistillation, soft_cross_entropy
from erw_fast.objectives.interpolants import PATH_TYPES, TIME_WEIGHTINGS, Interpolant
from erw_fast.objectives.losses import (
    ALIGNMENT_OBJECTIVES,
    AlignmentObjective,
    DiffusionLossOutput,
    diffusion_loss,
    legacy_warmup_cosine_loss,
    mean_flat,
    phase1_loss,
)
from erw_fast.objectives.schedule import (
    ERW_C0_PRESETS,
    SCHEDULE_KINDS,
    ConstantLambda,
    CosineToZero,
    ERWLambdaSchedule,
    HardStop,
    WeightSchedule,
    erw_c0_preset,
    weight_schedule,
)

__all__ = [
    "ALIGNMENT_BACKENDS",
    "ALIGNMENT_OBJECTIVES",
    "ERW_C0_PRESETS",
    "NEGATIVE_SETS",
    "SCHEDULE_KINDS",
    "PATH_TYPES",
    "TIME_WEIGHTINGS",
    "AlignmentObjective",
    "AttentionDistillation",
    "ConstantLambda",
    "CosineToZero",
    "DiffusionLossOutput",
    "ERWLambdaSchedule",
    "HardStop",
    "Interpolant",
    "WeightSchedule",
    "diffusion_loss",
    "erw_c0_preset",
    "legacy_warmup_cosine_loss",
    "mean_flat",
    "nt_xent_loss",
    "phase1_loss",
    "repa_cosine_loss",
    "soft_cross_entropy",
    "resolve_alignment_backend",
    "weight_schedule",
]
