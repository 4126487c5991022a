"""Frozen teacher encoders for REPA / ERW alignment (DINOv2, CLIP, MoCo v3, MAE, I-JEPA).

timm is imported lazily (first build), so importing this package is cheap.
"""

from .checkpoints import EncoderWeightsError, convert_state_dict, read_checkpoint
from .encoder import Encoder, build_encoder_model, check_token_count, load_encoder, load_encoders
from .preprocess import preprocess_raw_image
from .registry import (
    CLIP_MEAN,
    CLIP_STD,
    ENCODER_ALIASES,
    ENCODER_SPECS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    EncoderSpec,
    get_encoder_spec,
    list_encoders,
    parse_encoder_names,
)
from .timm_compat import import_timm

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "ENCODER_ALIASES",
    "ENCODER_SPECS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Encoder",
    "EncoderSpec",
    "EncoderWeightsError",
    "build_encoder_model",
    "check_token_count",
    "convert_state_dict",
    "get_encoder_spec",
    "import_timm",
    "list_encoders",
    "load_encoder",
    "load_encoders",
    "parse_encoder_names",
    "preprocess_raw_image",
    "read_checkpoint",
]
