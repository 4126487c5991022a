"""Registry of the frozen teacher encoders REPA / ERW align SiT tokens with.

Names follow REPA's ``--enc-type`` strings (``dinov2-vit-b``, ``clip-vit-L``, ``mocov3-vit-b``, ...), several
may be given comma-separated. Every entry is built as a timm ``VisionTransformer``; the spec records what
REPA's own loader (``utils.load_encoders`` in sihyun-yu/REPA) does for that family: input size, mean/std,
whether the final norm is applied, and where the weights come from.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
# OpenAI CLIP's own normalisation (REPA's CLIP_DEFAULT_MEAN / CLIP_DEFAULT_STD).
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

Family = Literal["dinov2", "clip", "mocov3", "mae", "jepa", "demo"]
# REPA's preprocess_raw_image differs per family in whether (and in which order) it resizes:
#   clip:          x/255 -> bicubic resize -> normalise
#   dinov2 / jepa: x/255 -> normalise -> bicubic resize
#   mocov3 / mae:  x/255 -> normalise (they run at the image resolution)
PreprocessOrder = Literal["resize_then_normalize", "normalize_then_resize", "normalize"]

BASE_RESOLUTION = 256  # image resolution at which REPA's encoder input sizes are defined


@dataclass(frozen=True)
class EncoderSpec:
    """Static description of one registered encoder (no weights, no timm import)."""

    name: str
    family: Family
    timm_name: str  # timm architecture (with pretrained tag where timm hosts the weights)
    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int
    base_input_size: int  # encoder input side for 256-px images (scaled by resolution // 256)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    preprocess: PreprocessOrder
    final_norm: bool = True  # REPA uses the final LayerNorm's output (False: last block output)
    num_register_tokens: int = 0
    class_token: bool = True
    mlp_hidden_dim: int | None = None  # None: 4 * embed_dim (SwiGLU for ViT-g: per branch)
    layer_scale: bool = False
    timm_kwargs: tuple[tuple[str, Any], ...] = field(default_factory=tuple)
    hub_repo: str | None = None  # torch.hub repository REPA loads from
    hub_entry: str | None = None  # torch.hub entry point REPA calls
    weights_url: str | None = None  # original checkpoint (torch.hub.load_state_dict_from_url)
    description: str = ""
    base_resolution: int = BASE_RESOLUTION  # image side at which `base_input_size` applies

    def input_size(self, resolution: int = BASE_RESOLUTION) -> int:
        """Side of the image fed to the ViT for `resolution`-px training images (REPA: 224·(res//256))."""
        check_resolution(resolution, self.base_resolution)
        return self.base_input_size * (resolution // self.base_resolution)

    def grid_size(self, resolution: int = BASE_RESOLUTION) -> int:
        return self.input_size(resolution) // self.patch_size

    def num_patches(self, resolution: int = BASE_RESOLUTION) -> int:
        """Number of patch tokens returned (no CLS / register tokens)."""
        return self.grid_size(resolution) ** 2

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token) + self.num_register_tokens


def check_resolution(resolution: int, base: int = BASE_RESOLUTION) -> None:
    if not isinstance(resolution, int) or resolution < base or resolution % base:
        raise ValueError(
            f"image resolution must be a positive multiple of {base} (REPA sizes encoder "
            f"inputs as 224*(res//256) or 256*(res//256)), got {resolution!r}"
        )


# Standard ViT sizes: letter -> (timm size word, embed_dim, depth, num_heads).
_VIT_SIZES = {
    "t": ("tiny", 192, 12, 3),
    "s": ("small", 384, 12, 6),
    "b": ("base", 768, 12, 12),
    "l": ("large", 1024, 24, 16),
    "h": ("huge", 1280, 32, 16),
    "g": ("giant", 1536, 40, 24),
}


def _vit(size: str, patch_size: int) -> dict[str, Any]:
    """The shape fields of a standard ViT-{size}/{patch_size}."""
    _, dim, depth, heads = _VIT_SIZES[size]
    return dict(embed_dim=dim, depth=depth, num_heads=heads, patch_size=patch_size)


_DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vit{c}14/dinov2_vit{c}14{reg}_pretrain.pth"
# config letter -> MLP hidden width (None: 4 * embed_dim; ViT-g is SwiGLU, (int(4*1536*2/3)+7)//8*8 = 4096)
_DINOV2_SIZES = {"s": None, "b": None, "l": None, "g": 4096}


def _dinov2_specs() -> list[EncoderSpec]:
    specs = []
    for c, hidden in _DINOV2_SIZES.items():
        word = _VIT_SIZES[c][0]
        for reg in (False, True):
            specs.append(
                EncoderSpec(
                    name=f"dinov2-vit-{c}" + ("-reg" if reg else ""),
                    family="dinov2",
                    timm_name=f"vit_{word}_patch14{'_reg4' if reg else ''}_dinov2.lvd142m",
                    **_vit(c, 14),
                    base_input_size=224,
                    mean=IMAGENET_MEAN,
                    std=IMAGENET_STD,
                    preprocess="normalize_then_resize",
                    num_register_tokens=4 if reg else 0,
                    mlp_hidden_dim=hidden,
                    layer_scale=True,
                    hub_repo="facebookresearch/dinov2",
                    hub_entry=f"dinov2_vit{c}14" + ("_reg" if reg else ""),
                    weights_url=_DINOV2_URL.format(c=c, reg="_reg4" if reg else ""),
                    description=f"DINOv2 ViT-{c.upper()}/14" + (" with 4 registers" if reg else ""),
                )
            )
    return specs


def _mocov3_spec(c: str) -> EncoderSpec:
    word = _VIT_SIZES[c][0]
    return EncoderSpec(
        name=f"mocov3-vit-{c}",
        family="mocov3",
        timm_name=f"vit_{word}_patch16_224",  # same layout as MoCo v3's timm-based VisionTransformerMoCo
        **_vit(c, 16),
        base_input_size=256,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        preprocess="normalize",
        weights_url=f"https://dl.fbaipublicfiles.com/moco-v3/vit-{c}-300ep/vit-{c}-300ep.pth.tar",
        description=f"MoCo v3 ViT-{c.upper()}/16 (300 ep)",
    )


def _build_registry() -> dict[str, EncoderSpec]:
    specs = _dinov2_specs() + [
        EncoderSpec(
            name="clip-vit-L",
            family="clip",
            # timm hosts the OpenAI weights under the GELU-act model name; OpenAI CLIP is QuickGELU, so the
            # activation is overridden (timm's own note: "natively QuickGELU").
            timm_name="vit_large_patch14_clip_224.openai",
            **_vit("l", 14),
            base_input_size=224,
            mean=CLIP_MEAN,
            std=CLIP_STD,
            preprocess="resize_then_normalize",
            # REPA's UpdatedVisionTransformer returns the transformer output without ln_post / proj.
            final_norm=False,
            timm_kwargs=(("act_layer", "quick_gelu"),),
            description="OpenAI CLIP ViT-L/14 image tower",
        ),
        _mocov3_spec("b"),
        _mocov3_spec("l"),
        EncoderSpec(
            name="mae-vit-l",
            family="mae",
            timm_name="vit_large_patch16_224.mae",
            **_vit("l", 16),
            base_input_size=256,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            preprocess="normalize",
            # REPA's mae_vit.forward_features returns the last block output without the final norm.
            final_norm=False,
            weights_url="https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_large.pth",
            description="MAE ViT-L/16 (pre-trained encoder)",
        ),
        EncoderSpec(
            name="jepa-vit-h",
            family="jepa",
            timm_name="vit_huge_patch14_224",
            **_vit("h", 14),
            base_input_size=224,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            preprocess="normalize_then_resize",
            class_token=False,
            timm_kwargs=(("class_token", False), ("global_pool", "")),
            weights_url="https://dl.fbaipublicfiles.com/ijepa/IN1K-vit.h.14-300e.pth.tar",
            description="I-JEPA ViT-H/14 (IN-1k, 300 ep)",
        ),
        EncoderSpec(
            # Not a released encoder: the embedded demo's and the tests' teacher, random weights only. A 2-block
            # ViT-Ti/16 on 64-px images (16 patch tokens) that runs through the same timm / preprocessing path.
            name="demo-vit-t",
            family="demo",
            timm_name="vit_tiny_patch16_224",
            **(_vit("t", 16) | {"depth": 2}),
            base_input_size=64,
            base_resolution=64,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            preprocess="normalize",
            timm_kwargs=(("depth", 2),),
            description="demo/test teacher: 2-block ViT-Ti/16 at 64 px (random weights)",
        ),
    ]
    return {s.name: s for s in specs}


ENCODER_SPECS: dict[str, EncoderSpec] = _build_registry()

# Other spellings that resolve to a registered name. REPA itself selects DINOv2 registers with an encoder
# type containing "reg" (it splits the name into exactly three dash-separated parts: `dinov2reg-vit-b`).
ENCODER_ALIASES: dict[str, str] = {
    **{f"dinov2reg-vit-{c}": f"dinov2-vit-{c}-reg" for c in _DINOV2_SIZES},
    **{f"dinov2_vit{c}14": f"dinov2-vit-{c}" for c in _DINOV2_SIZES},
    **{f"dinov2_vit{c}14_reg": f"dinov2-vit-{c}-reg" for c in _DINOV2_SIZES},
    "ijepa-vit-h": "jepa-vit-h",
}
_LOOKUP: dict[str, str] = {k.lower(): v for k, v in ENCODER_ALIASES.items()}
_LOOKUP.update({k.lower(): k for k in ENCODER_SPECS})


def list_encoders() -> list[str]:
    """Registered encoder names (canonical spelling)."""
    return list(ENCODER_SPECS)


def get_encoder_spec(name: str) -> EncoderSpec:
    """Spec for `name` (case-insensitive, aliases accepted). Unknown names raise a ValueError with hints."""
    key = name.strip().lower()
    if key in _LOOKUP:
        return ENCODER_SPECS[_LOOKUP[key]]
    close = difflib.get_close_matches(key, list(_LOOKUP), n=3, cutoff=0.6)
    hint = ""
    if close:
        hint = " Did you mean " + " or ".join(repr(_LOOKUP[c]) for c in dict.fromkeys(close)) + "?"
    raise ValueError(f"unknown encoder {name!r}.{hint} Known encoders: {', '.join(list_encoders())}")


def parse_encoder_names(names: str | Sequence[str] | None) -> list[str]:
    """Split REPA-style ``"a,b"`` strings (or lists of them) into canonical names.

    ``None`` / ``"none"`` (REPA's "no encoder") give an empty list.
    """
    if names is None:
        return []
    items = [names] if isinstance(names, str) else list(names)
    out: list[str] = []
    for item in items:
        for part in str(item).split(","):
            part = part.strip()
            if not part or part.lower() == "none":
                continue
            out.append(get_encoder_spec(part).name)
    return out
