"""The frozen teacher of a run: its encoders, loaded from ``cfg.encoder``, and the alignment targets of a batch."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

from erw_fast.config import AlignmentConfig, Config, ConfigError
from erw_fast.objectives.target_norm import TargetNorm


class Teacher:
    """Frozen encoders; ``targets`` gives one (B, T, D) feature tensor per encoder for a slice of a batch
    (``with_cls``: T = 1 + patches, the CLS token first), normalised by ``target_norm`` (iREPA's spatial z-score
    of the patch tokens, or none).

    With precomputed features (``data.features``) no encoder is built: ``dims`` and ``patches`` (the width and patch
    count of the encoder that made them, from the registry) stand in for what a loaded encoder would tell."""

    def __init__(self, encoders: list[nn.Module] | None = None, target_norm: TargetNorm | None = None, *,
                 dims: list[int] | None = None, patches: int | None = None) -> None:
        self.encoders: list[nn.Module] = list(encoders or [])
        self.target_norm = target_norm or TargetNorm()
        self.dims, self.patches = list(dims or []), patches

    @property
    def z_dims(self) -> list[int]:
        """The projector widths the SiT needs: one per encoder (none for plain SiT)."""
        return [int(e.embed_dim) for e in self.encoders] if self.encoders else list(self.dims)

    def replace_with(self, other: Teacher) -> None:
        """Take ``other``'s encoders (or feature description) in place: the phases hold this object."""
        self.encoders, self.dims, self.patches = other.encoders, other.dims, other.patches

    def release(self) -> None:
        """Drop the encoders (their memory) once nothing calls them (the alignment stopped); the projector widths
        stay known, for the model and its export."""
        self.dims, self.encoders = self.z_dims, []

    @torch.no_grad()
    def targets(self, batch: dict[str, torch.Tensor], sl: slice, with_cls: bool = False) -> list[torch.Tensor]:
        if "features" in batch:  # precomputed teacher features (one encoder)
            features = [self._cached(batch["features"][sl], with_cls)]
        else:
            features = [encoder(batch["images"][sl].float(), with_cls=with_cls) for encoder in self.encoders]
        # The one place targets are normalised, online and precomputed alike; REG's CLS token is left as it is.
        return [self.target_norm(f, prefix_tokens=int(with_cls)) for f in features]

    def _cached(self, features: torch.Tensor, with_cls: bool) -> torch.Tensor:
        """Precomputed features: patch tokens, or the CLS token then the patch tokens (``erw-prepare
        --encoder-cls-token``), told apart by the token count."""
        patches = (self.encoders[0].num_patches() if self.encoders else self.patches if self.patches is not None
                   else features.shape[1] - int(with_cls))
        has_cls = features.shape[1] == patches + 1
        if with_cls and not has_cls:
            raise ValueError(f"the precomputed features hold {features.shape[1]} tokens, not the CLS token and "
                             f"{patches} patch tokens that REG needs: prepare the data with erw-prepare "
                             "--encoder-cls-token")
        return features if with_cls or not has_cls else features[:, 1:]

    def attention_logits(self, blocks: Sequence[int], heads: Sequence[int]
                         ) -> AbstractContextManager[list[torch.Tensor]]:
        """HASTE's teacher maps: while open, ``targets`` also appends the first encoder's attention logits of
        ``blocks`` (from 1) and ``heads`` over its patch tokens to the yielded list (``Encoder.attention_logits``)."""
        if not self.encoders:
            raise ValueError("attention distillation needs the online teacher: this run has no encoder")
        return self.encoders[0].attention_logits(blocks, heads)


class TeacherTargets(list):
    """The alignment targets (a list, one tensor per encoder) and, for HASTE, the teacher's attention logits of
    the distilled blocks (``attention``, in the order of the blocks)."""

    def __init__(self, features: Sequence[torch.Tensor], attention: list[torch.Tensor]) -> None:
        super().__init__(features)
        self.attention = attention


def target_norm(alignment: AlignmentConfig) -> TargetNorm:
    """The run's normalisation of the teacher's patch tokens (alignment.target_norm, alignment.zscore_alpha)."""
    return TargetNorm(alignment.target_norm, alignment.zscore_alpha)


def encoder_widths(config: Config) -> list[int]:
    """The projector widths of this run's encoders, from the encoder registry: known without loading them."""
    from erw_fast.encoders.registry import get_encoder_spec, parse_encoder_names

    return [get_encoder_spec(name).embed_dim for name in parse_encoder_names(config.encoder.names)]


def class_token_dim(config: Config) -> int | None:
    """The width of REG's class token for this run (the first encoder's; None when the run has no class token),
    from the encoder registry: known before any weights are loaded."""
    if not config.run.class_token:
        return None
    from erw_fast.encoders.registry import get_encoder_spec, parse_encoder_names

    return get_encoder_spec(parse_encoder_names(config.encoder.names)[0]).embed_dim


def features_mismatch(config: Config, features: dict[str, Any], where: str) -> str | None:
    """Why the precomputed ``features`` (a manifest's record) did not come from the configured teacher, or None.
    Compared: the encoder (canonical name), the resolution and pretrained-or-random, each where recorded."""
    from erw_fast.encoders.registry import get_encoder_spec, parse_encoder_names

    enc = config.encoder
    names = parse_encoder_names(enc.names)
    try:
        made_by = get_encoder_spec(str(features.get("encoder"))).name
    except ValueError:
        made_by = str(features.get("encoder"))
    if len(names) != 1 or get_encoder_spec(names[0]).name != made_by:
        return f"encoder.names={list(enc.names)}, but the features in {where} are {made_by}'s"
    resolution = features.get("resolution")
    if resolution is not None and int(resolution) != enc.resolution:
        return f"encoder.resolution={enc.resolution}, but the features in {where} were computed at {resolution} px"
    pretrained = features.get("pretrained")
    if pretrained is not None and bool(pretrained) != enc.pretrained:
        made = "pretrained weights" if pretrained else "random weights"
        return f"encoder.pretrained={str(enc.pretrained).lower()}, but the features in {where} come from {made}"
    return None


def _feature_teacher(config: Config, log: Callable[[str], None]) -> Teacher:
    """``data.features``: no encoder is built or loaded; width and patch count from the registry, the manifest's
    record checked against ``encoder.*`` (preflight says the same before anything is built)."""
    from erw_fast.data.shards import Manifest
    from erw_fast.encoders.registry import get_encoder_spec, parse_encoder_names

    man = Manifest.load(config.data.path)
    where = f"{config.data.path}/manifest.json"
    if man.features is None:
        raise ConfigError(f"data.features: true, but {where} records no precomputed features")
    if (why := features_mismatch(config, man.features, where)) is not None:
        raise ConfigError(why)
    spec = get_encoder_spec(parse_encoder_names(config.encoder.names)[0])
    dim = int(man.features["shape"][-1])
    if dim != spec.embed_dim:
        raise ConfigError(f"data.features: the features in {where} are {dim} wide, {spec.name} is {spec.embed_dim}")
    log(f"encoder: none loaded, precomputed {spec.name} features from {where} (width {dim}, "
        f"weights: {man.features.get('weights', 'not recorded')})"
        + ("; the CKNNA monitor compares with these features" if config.logging.cknna_every else ""))
    return Teacher(target_norm=target_norm(config.alignment), dims=[dim],
                   patches=spec.num_patches(config.encoder.resolution))


def load_teacher(config: Config, device: torch.device, sit_tokens: int,
                 log: Callable[[str], None] = print) -> Teacher:
    """The run's encoders (none for plain SiT), checked against the data's image size and the SiT's token count;
    with precomputed features (``data.features``) no encoder at all."""
    if config.run.mode == "sit":
        return Teacher()
    if config.data.features:
        return _feature_teacher(config, log)
    from erw_fast.encoders import check_token_count, load_encoders

    enc = config.encoder
    if enc.resolution != config.data.image_size:
        raise ConfigError(
            f"encoder.resolution ({enc.resolution}) must equal the image size the data provides "
            f"(data.image_size = {config.data.image_size})"
        )
    # Randomly initialised encoders (pretrained: false) must be identical on every rank and after a resume, so
    # they are drawn from a fixed seed, outside the training RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.run.seed + 7919)
        encoders = load_encoders(
            enc.names, resolution=enc.resolution, pretrained=enc.pretrained,
            weights_paths=enc.weights_paths or None, device=device, trust_torchscript=enc.trust_torchscript,
            dtype=torch.bfloat16 if enc.dtype == "bf16" else torch.float32,
        )
    if enc.compile:
        from erw_fast.compile import compile_model

        t = config.train
        for encoder in encoders:
            compile_model(encoder.model, "blocks", t.compile_mode, t.compile_backend)
    for encoder in encoders:
        log(f"encoder: {encoder!r}")
        check_token_count(encoder.num_patches(), sit_tokens, encoder.name)
    return Teacher(encoders, target_norm(config.alignment))


def feature_patches(config: Config) -> int | None:
    """With precomputed features: the patch count of the encoder that made them (tells a CLS token apart)."""
    if not config.data.features or config.run.mode == "sit":
        return None
    from erw_fast.encoders.registry import get_encoder_spec, parse_encoder_names

    return get_encoder_spec(parse_encoder_names(config.encoder.names)[0]).num_patches(config.encoder.resolution)
