"""The frozen teacher of a run: its encoders, loaded from ``cfg.encoder``, and the alignment targets of a batch."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from erw_fast.config import Config, ConfigError


class Teacher:
    """Frozen encoders; ``targets`` gives one (B, T, D) feature tensor per encoder for a slice of a batch
    (``with_cls``: T = 1 + patches, the CLS token first)."""

    def __init__(self, encoders: list[nn.Module] | None = None) -> None:
        self.encoders: list[nn.Module] = list(encoders or [])
        self._released_z_dims: list[int] = []

    @property
    def z_dims(self) -> list[int]:
        """The projector widths the SiT needs: one per encoder (none for plain SiT)."""
        return [int(e.embed_dim) for e in self.encoders] or list(self._released_z_dims)

    def release(self) -> None:
        """Drop the encoders (their memory) once nothing calls them (the alignment stopped); the projector widths
        stay known, for the model and its export."""
        self._released_z_dims, self.encoders = self.z_dims, []

    @torch.no_grad()
    def targets(self, batch: dict[str, torch.Tensor], sl: slice, with_cls: bool = False) -> list[torch.Tensor]:
        if "features" in batch:  # precomputed teacher features (one encoder)
            return [self._cached(batch["features"][sl], with_cls)]
        return [encoder(batch["images"][sl].float(), with_cls=with_cls) for encoder in self.encoders]

    def _cached(self, features: torch.Tensor, with_cls: bool) -> torch.Tensor:
        """Precomputed features: patch tokens, or the CLS token then the patch tokens (``erw-prepare
        --encoder-cls-token``), told apart by the token count."""
        patches = self.encoders[0].num_patches() if self.encoders else features.shape[1] - int(with_cls)
        has_cls = features.shape[1] == patches + 1
        if with_cls and not has_cls:
            raise ValueError(f"the precomputed features hold {features.shape[1]} tokens, not the CLS token and "
                             f"{patches} patch tokens that REG needs: prepare the data with erw-prepare "
                             "--encoder-cls-token")
        return features if with_cls or not has_cls else features[:, 1:]


def class_token_dim(config: Config) -> int | None:
    """The width of REG's class token for this run (the first encoder's; None when the run has no class token),
    from the encoder registry: known before any weights are loaded."""
    if not config.run.class_token:
        return None
    from erw_fast.encoders.registry import get_encoder_spec, parse_encoder_names

    return get_encoder_spec(parse_encoder_names(config.encoder.names)[0]).embed_dim


def load_teacher(config: Config, device: torch.device, sit_tokens: int,
                 log: Callable[[str], None] = print) -> Teacher:
    """The run's encoders (none for plain SiT), checked against the data's image size and the SiT's token count."""
    if config.run.mode == "sit":
        return Teacher()
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
    return Teacher(encoders)
