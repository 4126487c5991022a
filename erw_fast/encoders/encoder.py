"""Frozen teacher encoders: build, load weights, run REPA's preprocessing, return patch tokens."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from erw_fast.models.attention import attention_logits

from .checkpoints import (
    EncoderWeightsError,
    adapt_pos_embed,
    check_keys,
    convert_state_dict,
    read_checkpoint,
    sha256_of,
)
from .preprocess import preprocess_raw_image
from .registry import BASE_RESOLUTION, EncoderSpec, check_resolution, get_encoder_spec, parse_encoder_names
from .timm_compat import import_timm

PathLike = str | os.PathLike[str]


def _timm_kwargs(
    spec: EncoderSpec, resolution: int, model_kwargs: Mapping[str, Any] | None
) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(spec.timm_kwargs)
    kwargs.update(
        num_classes=0,  # classification / projection heads are never used
        img_size=spec.input_size(resolution),  # patch grid 16·(res//256) per side, as REPA resamples to
        use_naflex=False,  # pin the classic VisionTransformer even if TIMM_USE_NAFLEXVIT is set
    )
    kwargs.update(model_kwargs or {})
    return kwargs


def build_encoder_model(
    spec: EncoderSpec | str,
    resolution: int = BASE_RESOLUTION,
    model_kwargs: Mapping[str, Any] | None = None,
) -> nn.Module:
    """The bare timm ViT for `spec` at `resolution` with random weights (on the current default device).

    `model_kwargs` override timm arguments (e.g. ``depth=2`` for fast tests); the final norm is replaced by
    an Identity for families whose REPA features are taken before it (CLIP, MAE).
    """
    spec = get_encoder_spec(spec) if isinstance(spec, str) else spec
    timm = import_timm()
    model = timm.create_model(
        spec.timm_name, pretrained=False, **_timm_kwargs(spec, resolution, model_kwargs)
    )
    if not spec.final_norm:
        model.norm = nn.Identity()
    return model


def _active_autocast_dtype(device_type: str) -> torch.dtype | None:
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except (RuntimeError, TypeError, ValueError):  # e.g. 'meta' has no autocast state
        pass
    return None


class Encoder(nn.Module):
    """A frozen encoder: ``forward(images in [0, 255], (B, 3, R, R)) -> (B, N, D)`` patch tokens.

    Always in eval mode (``train()`` is a no-op), parameters never require grad, forward runs under
    ``torch.no_grad()``. Inside autocast it computes (and returns) in the autocast dtype; outside it runs in
    the weights' dtype. Tokens exclude CLS / register tokens; N = (input_size / patch_size)^2.
    """

    def __init__(self, spec: EncoderSpec, model: nn.Module, resolution: int, weights_source: str) -> None:
        super().__init__()
        check_resolution(resolution, spec.base_resolution)
        self.spec = spec
        self.model = model
        self.resolution = resolution
        self.weights_source = weights_source
        self.requires_grad_(False)
        self.train(False)

    # -- metadata -------------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def embed_dim(self) -> int:
        return int(self.model.embed_dim)

    @property
    def patch_size(self) -> int:
        return self.spec.patch_size

    @property
    def input_size(self) -> int:
        return self.spec.input_size(self.resolution)

    def num_patches(self, resolution: int | None = None) -> int:
        """Patch tokens per image at `resolution` (default: the resolution this encoder was built for)."""
        return self.spec.num_patches(self.resolution if resolution is None else resolution)

    def describe(self) -> str:
        p = next(self.model.parameters(), None)
        where = "" if p is None else f", {str(p.dtype).replace('torch.', '')} on {p.device}"
        return (
            f"{self.name} ({self.spec.description}; timm {self.spec.timm_name}), "
            f"{self.resolution}px images -> "
            f"{self.input_size}px input / patch {self.patch_size} -> {self.num_patches()} tokens x "
            f"{self.embed_dim}; weights: {self.weights_source}{where}"
        )

    def __repr__(self) -> str:  # the full module tree of a ViT-g is not useful in logs
        return f"Encoder({self.describe()})"

    # -- behaviour ------------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> Encoder:
        # A teacher never leaves eval mode, even when a parent module calls .train().
        return super().train(False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        return preprocess_raw_image(images, self.spec)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, with_cls: bool = False) -> torch.Tensor:
        """Patch tokens (B, N, D); ``with_cls``: (B, 1 + N, D) with the CLS token first (REG's target and class
        token: DINOv2's ``x_norm_clstoken``, normalised like the patch tokens), register tokens left out."""
        if with_cls and not self.spec.class_token:
            raise ValueError(f"{self.name} has no CLS token (REG needs an encoder with one, e.g. dinov2-vit-b)")
        if (
            images.ndim != 4
            or images.shape[1] != 3
            or images.shape[-1] != self.resolution
            or images.shape[-2] != self.resolution
        ):
            raise ValueError(
                f"{self.name} was built for {self.resolution}px images: expected (B, 3, {self.resolution}, "
                f"{self.resolution}) in [0, 255], got {tuple(images.shape)}"
            )
        x = self.preprocess(images)
        autocast_dtype = _active_autocast_dtype(x.device.type)
        if autocast_dtype is None:
            weight = next(self.model.parameters())
            x = x.to(weight.dtype)
        features = self.model.forward_features(x)
        tokens = features[:, self.model.num_prefix_tokens :]
        if with_cls:
            tokens = torch.cat([features[:, :1], tokens], dim=1)
        if autocast_dtype is not None:
            # A final LayerNorm runs in fp32 under autocast; hand back the autocast dtype consistently.
            tokens = tokens.to(autocast_dtype)
        return tokens


    @contextmanager
    def attention_logits(self, blocks: Sequence[int], heads: Sequence[int]) -> Iterator[list[torch.Tensor]]:
        """While open, every forward appends to the yielded list, per block of ``blocks`` (from 1, in that
        order), the attention logits (q·scale)·kᵀ of ``heads`` over the patch tokens (CLS and register rows and
        columns left out), (B, len(heads), N, N), in the compute dtype: HASTE's teacher maps. Forward hooks on
        each block's ``attn.qkv`` read q and k from timm's own code path (its q_norm / k_norm applied); the
        block's output is unchanged and nothing else is kept."""
        attns = [self._attention_of(b) for b in blocks]
        heads = list(heads)
        if not heads or not all(0 <= h < attns[0].num_heads for h in heads):
            raise ValueError(f"{self.name}: heads {heads} must be non-empty and in [0, {attns[0].num_heads})")
        skip = int(self.model.num_prefix_tokens)
        found: list[torch.Tensor] = []
        pending: dict[int, torch.Tensor] = {}

        def hook(index: int, attn: nn.Module, module: nn.Module, args: object, qkv: torch.Tensor) -> None:
            B, T, _ = qkv.shape
            q, k, _v = qkv.reshape(B, T, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
            pending[index] = attention_logits(attn.q_norm(q), attn.k_norm(k), heads, skip)
            if len(pending) == len(attns):  # the last chosen block of this forward
                found.extend(pending.pop(i) for i in range(len(attns)))

        handles = [attn.qkv.register_forward_hook(partial(hook, i, attn)) for i, attn in enumerate(attns)]
        try:
            yield found
        finally:
            for handle in handles:
                handle.remove()

    def _attention_of(self, block: int) -> nn.Module:
        blocks = getattr(self.model, "blocks", None)
        if blocks is None or not 1 <= block <= len(blocks):
            depth = 0 if blocks is None else len(blocks)
            raise ValueError(f"{self.name} has {depth} blocks: attention block {block} (counted from 1) is not one")
        attn = getattr(blocks[block - 1], "attn", None)
        if not all(hasattr(attn, a) for a in ("qkv", "num_heads", "q_norm", "k_norm")):
            raise ValueError(f"{self.name}: block {block}'s attention is not timm's fused-qkv Attention; its "
                             "attention logits cannot be read")
        return attn


# -- loading -----------------------------------------------------------------------------------------------
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_HASH_PREFIX = re.compile(r"-([0-9a-f]{8,64})\.")


def published_sha256(url: str) -> str | None:
    """The sha256 (or the prefix of it) a release publishes in its download URL: OpenAI's ``…/<sha256>/file.pt``
    path segment, or torch.hub's ``name-<hex prefix>.ext`` file names. DINOv2, MoCo v3, MAE and I-JEPA publish
    none."""
    parts = urlparse(url).path.split("/")
    if len(parts) >= 2 and _SHA256_HEX.fullmatch(parts[-2]):
        return parts[-2]
    # torch.hub's own pattern is "-([a-f0-9]*)\." (check_hash); at least 8 digits here, so that I-JEPA's
    # "IN1K-vit.h.14-300e.pth.tar" is not read as the hash "300e".
    match = _HASH_PREFIX.search(parts[-1])
    return match.group(1) if match else None


def corrupt_hub_files(hub_id: str, cache_dir: str | None = None) -> list[str]:
    """Cached weight files of Hugging Face repository ``hub_id`` whose content is not the sha256 the hub publishes
    for them: the cache stores an LFS file as ``blobs/<its sha256>``, so the name is the published hash."""
    from huggingface_hub import try_to_load_from_cache

    bad = []
    names = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors", "open_clip_pytorch_model.bin")
    for name in names:
        found = try_to_load_from_cache(hub_id, name, cache_dir=cache_dir)
        if not isinstance(found, str):
            continue
        blob = os.path.basename(os.path.realpath(found))
        if _SHA256_HEX.fullmatch(blob) and sha256_of(found) != blob:
            bad.append(found)
    return bad


def _fetch_pretrained(
    spec: EncoderSpec, resolution: int, model_kwargs: Mapping[str, Any] | None, trust_torchscript: bool = False
) -> tuple[Mapping[str, Any], str]:
    """Reference weights: the original release file via the torch.hub cache, else timm's HF hub; checked against
    the sha256 the release publishes, where it publishes one.

    Returns (raw checkpoint, description of the source).
    """
    hint = "pass weights_path=<local checkpoint file>, or pretrained=False for random weights"
    if spec.weights_url:
        # Same file torch.hub.load('facebookresearch/dinov2', ...) and REPA's ckpts/ use, kept in the
        # torch.hub cache, so a copy placed there works offline.
        cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(spec.weights_url))
        expected = published_sha256(spec.weights_url)
        if not os.path.isfile(cached):
            try:
                os.makedirs(os.path.dirname(cached), exist_ok=True)
                # hash_prefix: torch.hub hashes while downloading and keeps nothing that differs
                torch.hub.download_url_to_file(spec.weights_url, cached, hash_prefix=expected, progress=False)
            except Exception as exc:
                raise EncoderWeightsError(
                    f"could not download pretrained weights for encoder '{spec.name}' from "
                    f"{spec.weights_url} ({type(exc).__name__}: {exc}). No network here? {hint} "
                    f"(or put the file at {cached})."
                ) from exc
        elif expected and not sha256_of(cached).startswith(expected):
            raise EncoderWeightsError(f"{cached} is not the file its release publishes (sha256 {expected}…): damaged "
                                      "or replaced; delete it to download it again")
        check = "sha256 verified" if expected else "the release publishes no hash"
        return read_checkpoint(cached, trust_torchscript), f"{spec.weights_url} (cached at {cached}; {check})"
    timm = import_timm()
    try:
        with torch.device("cpu"):
            ref = timm.create_model(
                spec.timm_name, pretrained=True, **_timm_kwargs(spec, resolution, model_kwargs)
            )
    except Exception as exc:
        raise EncoderWeightsError(
            f"could not fetch pretrained weights for encoder '{spec.name}' through timm "
            f"('{spec.timm_name}', Hugging Face hub) ({type(exc).__name__}: {exc}). No network here? {hint}."
        ) from exc
    hub_id = (getattr(ref, "pretrained_cfg", None) or {}).get("hf_hub_id")
    bad = corrupt_hub_files(hub_id) if hub_id else []
    if bad:
        raise EncoderWeightsError(f"{bad[0]} is not the file the Hugging Face hub publishes for {hub_id} (its sha256 "
                                  "differs): damaged or replaced; delete it to download it again")
    check = ", sha256 verified" if hub_id else ""
    return ref.state_dict(), f"timm pretrained '{spec.timm_name}' (Hugging Face hub{check})"


def load_encoder(
    name: str,
    resolution: int = BASE_RESOLUTION,
    pretrained: bool = True,
    weights_path: PathLike | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    *,
    model_kwargs: Mapping[str, Any] | None = None,
    trust_torchscript: bool = False,
) -> Encoder:
    """Build the frozen encoder `name` for `resolution`-px images.

    pretrained=False: random weights (tests, offline machines; ``device="meta"`` builds shapes only).
    pretrained=True: `weights_path` (timm or original-release format, .safetensors or a weights-only torch
    checkpoint; a TorchScript archive only if a known release or `trust_torchscript`) if given, else the
    reference download. Loading is strict except for dropped heads.
    """
    spec = get_encoder_spec(name)
    check_resolution(resolution, spec.base_resolution)
    device = torch.device(device) if device is not None else torch.device("cpu")
    if weights_path is not None and not pretrained:
        raise ValueError(
            f"weights_path={os.fspath(weights_path)!r} given with pretrained=False for '{spec.name}'"
        )

    if not pretrained:
        with torch.device(device):
            model = build_encoder_model(spec, resolution, model_kwargs)
        if dtype is not None:
            model = model.to(dtype=dtype)
        return Encoder(spec, model, resolution, "random init (pretrained=False)")

    if device.type == "meta":
        raise ValueError("device='meta' only builds shapes: use pretrained=False")
    if weights_path is not None:
        source = f"local file {os.fspath(weights_path)}"
        raw = read_checkpoint(weights_path, trust_torchscript)
    else:
        raw, source = _fetch_pretrained(spec, resolution, model_kwargs, trust_torchscript)

    # Build on the meta device and adopt the checkpoint tensors (assign=True): skips random init, which
    # takes tens of seconds for ViT-g / ViT-H on CPU.
    with torch.device("meta"):
        model = build_encoder_model(spec, resolution, model_kwargs)
    try:
        sd = adapt_pos_embed(convert_state_dict(raw, spec), model)
        check_keys(sd, model)
        model.load_state_dict(sd, strict=True, assign=True)
    except Exception as exc:
        raise EncoderWeightsError(
            f"weights from {source} do not fit encoder '{spec.name}' ({spec.timm_name} at "
            f"{resolution}px): {exc}"
        ) from exc
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:  # pragma: no cover - would mean a timm module keeps state outside its state dict
        raise EncoderWeightsError(f"weights from {source} left {leftover[:5]} uninitialised in '{spec.name}'")
    # Checkpoints may be fp16 (OpenAI CLIP): default to fp32 weights unless a dtype is requested.
    model = model.to(device=device, dtype=dtype or torch.float32)
    return Encoder(spec, model, resolution, source)


def load_encoders(
    names: str | Sequence[str] | None,
    resolution: int = BASE_RESOLUTION,
    pretrained: bool = True,
    weights_path: PathLike | Sequence[PathLike | None] | Mapping[str, PathLike] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    *,
    model_kwargs: Mapping[str, Any] | None = None,
    weights_paths: Sequence[PathLike | None] | Mapping[str, PathLike] | None = None,
    trust_torchscript: bool = False,
) -> list[Encoder]:
    """Load every encoder in a REPA ``enc_type`` string (``"dinov2-vit-b,clip-vit-L"``) or list.

    `weights_path` is one path (single encoder), a sequence aligned with the names, or a name -> path map;
    `weights_paths` is accepted as another spelling (the trainer's config field).
    """
    if weights_paths is not None:
        if weights_path is not None:
            raise ValueError("pass weights_path or weights_paths, not both")
        weights_path = weights_paths
    canon = parse_encoder_names(names)
    if isinstance(weights_path, Mapping):
        by_name = {get_encoder_spec(k).name: v for k, v in weights_path.items()}
        unknown = set(by_name) - set(canon)
        if unknown:
            raise ValueError(f"weights_path given for encoders not requested: {sorted(unknown)}")
        paths: list[PathLike | None] = [by_name.get(n) for n in canon]
    elif weights_path is None or isinstance(weights_path, (str, os.PathLike)):
        if weights_path is not None and len(canon) != 1:
            raise ValueError(
                f"one weights_path for {len(canon)} encoders {canon}: pass a list or a name->path map"
            )
        paths = [weights_path] * len(canon)
    else:
        paths = list(weights_path)
        if len(paths) != len(canon):
            raise ValueError(f"{len(paths)} weights paths for {len(canon)} encoders {canon}")
    return [
        load_encoder(n, resolution, pretrained, p, device, dtype, model_kwargs=model_kwargs,
                     trust_torchscript=trust_torchscript)
        for n, p in zip(canon, paths, strict=True)
    ]


def check_token_count(
    encoder_tokens: int,
    sit_tokens: int,
    encoder_name: str = "encoder",
    *,
    resolution: int | None = None,
    sit_patch_size: int | None = None,
    vae_downsample: int = 8,
) -> None:
    """Raise a ValueError if the encoder's patch-token count differs from the SiT's token count.

    REPA aligns token i of the SiT with patch i of the encoder, so both grids must be identical. Pass the
    image `resolution` and `sit_patch_size` to get the arithmetic of both sides in the message.
    """
    if encoder_tokens == sit_tokens:
        return
    enc_detail = ""
    sit_detail = ""
    hint = ""
    try:
        spec: EncoderSpec | None = get_encoder_spec(encoder_name)
    except ValueError:
        spec = None
    if resolution is not None:
        if spec is not None and resolution % spec.base_resolution == 0 and resolution >= spec.base_resolution:
            g = spec.grid_size(resolution)
            enc_detail = (
                f" ({resolution}px images -> {spec.input_size(resolution)}px encoder input / patch "
                f"{spec.patch_size} = {g}x{g})"
            )
        latent = resolution // vae_downsample
        if sit_patch_size is not None:
            g = latent // sit_patch_size
            sit_detail = (
                f" ({resolution}px / VAE x{vae_downsample} = {latent}x{latent} latent / patch "
                f"{sit_patch_size} = {g}x{g})"
            )
        side = int(round(encoder_tokens**0.5))
        if side * side == encoder_tokens and side and latent % side == 0:
            hint = (
                f"; a SiT patch size of {latent // side} would give {encoder_tokens} tokens at {resolution}px"
            )
    raise ValueError(
        f"token-count mismatch: encoder '{encoder_name}' yields {encoder_tokens} patch tokens{enc_detail} "
        f"but the SiT yields {sit_tokens} tokens{sit_detail}; REPA/ERW alignment needs them equal{hint}"
    )
