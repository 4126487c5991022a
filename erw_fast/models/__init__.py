"""SiT models: the full model, the ERW Phase-1 model, attention backends and the Phase-1 → Phase-2 transfer."""

from erw_fast.models.attention import (
    ATTENTION_BACKENDS,
    available_attention_backends,
    describe_attention_backend,
    resolve_attention_backend,
)
from erw_fast.models.projectors import PROJECTOR_KINDS, ConvProjector, build_projector
from erw_fast.models.sit import (
    SIT_CONFIGS,
    SIT_SIZES,
    SiT,
    SiTPhase1,
    build_sit,
    build_sit_phase1,
    parse_model_name,
    sit_config,
)
from erw_fast.models.transfer import TransferReport, transfer_phase1_weights

__all__ = [
    "ATTENTION_BACKENDS",
    "PROJECTOR_KINDS",
    "SIT_CONFIGS",
    "SIT_SIZES",
    "ConvProjector",
    "SiT",
    "SiTPhase1",
    "TransferReport",
    "available_attention_backends",
    "build_projector",
    "build_sit",
    "build_sit_phase1",
    "describe_attention_backend",
    "parse_model_name",
    "resolve_attention_backend",
    "sit_config",
    "transfer_phase1_weights",
]
