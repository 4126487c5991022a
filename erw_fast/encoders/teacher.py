"""The frozen teacher of a run: its encoders, loaded from ``cfg.encoder``, and the alignment targets of a batch."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from erw_fast.config import Config, ConfigError


class Teacher:
    """Frozen encoders; ``targets`` gives one (B, T, D) feature tensor per encoder for a slice of a batch."""

    def __init__(self, encoders: list[nn.Module] | None = None) -> None:
        self.encoders: list[nn.Module] = list(encoders or [])

    @property
    def z_dims(self) -> list[int]:
        """The projector widths the SiT needs: one per encoder (none for plain SiT)."""
        return [int(e.embed_dim) for e in self.encoders]

    @torch.no_grad()
    def targets(self, batch: dict[str, torch.Tensor], sl: slice) -> list[torch.Tensor]:
        if "features" in batch:  # precomputed teacher features (one encoder)
            return [batch["features"][sl]]
        return [encoder(batch["images"][sl].float()) for encoder in self.encoders]


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
