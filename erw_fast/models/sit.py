"""SiT: a DiT-style transformer with adaLN-Zero blocks on VAE latents, plus the alignment projectors (REPA's MLP
or iREPA's conv, ``models/projectors.py``).

Read top to bottom: blocks → the shared trunk (embedders, blocks, projectors) → the full model → the
Phase-1 (L2R, "latent-to-representation") model that ERW's warmup builds → named configurations.
State-dict keys and shapes equal the reference REPA/ERW implementation, so released checkpoints load strictly.

The class-token option (``cls_token_dim``, REG: Representation Entanglement for Generation) adds one token in
front of the patch tokens: the teacher's (noisy) CLS feature, projected to the model width
(``cls_projectors2`` + ``wg_norm``), with a zero row in ``pos_embed``. Every block and projector then sees 1 + N
tokens, and the final layer predicts the class token's velocity from token 0 (``final_layer.linear_cls``). Key
names and order are REG's, so its checkpoints load strictly too.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from erw_fast.models.attention import Attention
from erw_fast.models.embeddings import LabelEmbedder, PatchEmbed, TimestepEmbedder, sincos_pos_embed_2d
from erw_fast.models.projectors import build_projector
from erw_fast.models.rope import Rope2D


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class Mlp(nn.Module):
    """fc1 → tanh-GELU → fc2 (key names of timm's Mlp)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SiTBlock(nn.Module):
    """adaLN-Zero block: the conditioning c yields shift/scale/gate for attention, then for the MLP."""

    def __init__(
        self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False,
        attn_backend: str = "sdpa",
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qk_norm=qk_norm, backend=attn_backend)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: nn.Module | None = None,
                logit_heads: Sequence[int] | None = None, skip_tokens: int = 0,
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``logit_heads``: also return those heads' attention logits (see ``Attention.forward``)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        attended = self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope, logit_heads, skip_tokens)
        if logit_heads is not None:
            attended, logits = attended
        x = x + gate_msa.unsqueeze(1) * attended
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x if logit_heads is None else (x, logits)


class FinalLayer(nn.Module):
    """adaLN (shift, scale) → Linear to p·p·C per token. No learned sigma.

    With a class token (``cls_dim``): the same adaLN and norm for all tokens, then ``linear`` on the patch tokens
    1.. and ``linear_cls`` (hidden → cls_dim) on token 0; returns (patches, class-token output).
    """

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, cls_dim: int | None = None) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.linear_cls = nn.Linear(hidden_size, cls_dim, bias=True) if cls_dim is not None else None
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        x = modulate(self.norm_final(x), shift, scale)
        if self.linear_cls is None:
            return self.linear(x)
        return self.linear(x[:, 1:]), self.linear_cls(x[:, 0])


class _SiTTrunk(nn.Module):
    """What both ERW phases share: embedders, the first `num_blocks` blocks and the projectors.

    Attribute names are the reference's, so the full model and the Phase-1 model have identical keys for
    every shared tensor and weight transfer between them is a plain name match. With ``cls_token_dim`` the
    sequence is 1 + N tokens; the class token's embedder is registered by ``_add_class_token_embedder`` (after the
    final layer in the full model, where REG's state dict has it).
    """

    def __init__(
        self,
        *,
        input_size: int,
        patch_size: int,
        in_channels: int,
        hidden_size: int,
        depth: int,
        num_built_blocks: int,
        num_heads: int,
        mlp_ratio: float,
        class_dropout_prob: float,
        num_classes: int,
        z_dims: Sequence[int],
        projector_dim: int,
        encoder_depth: int,
        qk_norm: bool,
        use_rope: bool,
        attn_backend: str,
        cls_token_dim: int | None = None,
        projector: str = "mlp",
        projector_kernel_size: int = 1,
    ) -> None:
        super().__init__()
        if not 1 <= encoder_depth <= depth:
            raise ValueError(f"encoder_depth must be in [1, depth={depth}] (counted from 1), got {encoder_depth}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.out_channels = in_channels
        self.hidden_size, self.depth, self.num_heads = hidden_size, depth, num_heads
        self.num_classes = num_classes
        self.z_dims = list(z_dims)
        self.encoder_depth = encoder_depth
        self.use_rope = use_rope
        self.cls_token_dim = _check_cls_token_dim(cls_token_dim, self.z_dims)
        self.num_prefix_tokens = int(cls_token_dim is not None)  # the class token, in front of the patches

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_patches = self.x_embedder.num_patches
        # Frozen sin-cos table, kept as a parameter (requires_grad=False) because checkpoints store it; a class
        # token's row (row 0) stays zero.
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_prefix_tokens + num_patches, hidden_size),
                                      requires_grad=False)
        self.feat_rope = Rope2D(hidden_size // num_heads, self.x_embedder.grid_size) if use_rope else None
        if use_rope:
            self._register_load_state_dict_pre_hook(self._complete_rope_tables)
        self.blocks = nn.ModuleList(
            SiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm=qk_norm, attn_backend=attn_backend)
            for _ in range(num_built_blocks)
        )
        if projector == "conv" and cls_token_dim is not None:
            raise ValueError("the conv projector (iREPA) needs a square token grid; REG's class token has no grid "
                             "position: use the MLP projector with cls_token_dim")
        self.projector, self.projector_kernel_size = projector, projector_kernel_size
        self.projectors = nn.ModuleList(
            build_projector(hidden_size, projector_dim, z, projector, projector_kernel_size) for z in self.z_dims
        )

    def _add_class_token_embedder(self) -> None:
        """REG's class-token input: Linear(cls_token_dim → hidden), then an affine LayerNorm (eps 1e-6)."""
        if self.cls_token_dim is not None:
            self.cls_projectors2 = nn.Linear(self.cls_token_dim, self.hidden_size, bias=True)
            self.wg_norm = nn.LayerNorm(self.hidden_size, elementwise_affine=True, eps=1e-6)

    def _complete_rope_tables(self, state_dict: dict, prefix: str, *args: object) -> None:
        self.feat_rope.fill_missing(state_dict, prefix + "feat_rope.")

    @property
    def num_patches(self) -> int:
        return self.x_embedder.num_patches

    def set_attention_backend(self, backend: str) -> None:
        for block in self.blocks:
            block.attn.set_backend(backend)

    @property
    def attention_backend(self) -> str:
        return self.blocks[0].attn.backend if len(self.blocks) else "none"

    def _init_trunk(self) -> None:
        def basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(basic_init)
        grid = self.x_embedder.grid_size
        self.pos_embed.data.zero_()
        table = torch.from_numpy(sincos_pos_embed_2d(self.hidden_size, grid)).float()
        self.pos_embed.data[0, self.num_prefix_tokens :].copy_(table)
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # as an nn.Linear, not a conv
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:  # adaLN-Zero: every block starts as the identity
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)

    def embed(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, force_drop_ids: torch.Tensor | None = None,
        cls_token: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens (N, T, D) with position embedding, and the conditioning vector c = emb(t) + emb(y).

        A class-token model takes ``cls_token`` (N, cls_token_dim) and puts it in front: T = 1 + patches."""
        tokens = self.x_embedder(x)
        if self.cls_token_dim is not None:
            if cls_token is None:
                raise ValueError("this SiT has a class token (REG): pass cls_token=, shaped (N, "
                                 f"{self.cls_token_dim})")
            cls = self.wg_norm(self.cls_projectors2(cls_token))
            tokens = torch.cat([cls.unsqueeze(1), tokens], dim=1)
        elif cls_token is not None:
            raise ValueError("cls_token was given, but this SiT has no class token (build it with cls_token_dim=)")
        tokens = tokens + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, self.training, force_drop_ids)
        return tokens, c

    def project(self, hidden: torch.Tensor) -> list[torch.Tensor]:
        return [projector(hidden) for projector in self.projectors]

    def hidden_after(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, depth: int | None = None,
        cls_token: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden state after block `depth` (counted from 1; default: encoder_depth)."""
        depth = self.encoder_depth if depth is None else depth
        if not 0 <= depth <= len(self.blocks):
            raise ValueError(f"depth must be in [0, {len(self.blocks)}] for this model, got {depth}")
        h, c = self.embed(x, t, y, cls_token=cls_token)
        for block in self.blocks[:depth]:
            h = block(h, c, self.feat_rope)
        return h


class SiT(_SiTTrunk):
    """The full SiT. ``forward(x, t, y) -> (v, [z per encoder])``; with a class token (``cls_token_dim``, REG)
    ``forward(x, t, y, cls_token=c) -> (v, [z per encoder], class-token velocity)``, each z over 1 + N tokens.

    Accepts the reference constructor keywords: REPA's, REG's, and iREPA's ``projection_layer_type`` /
    ``proj_kwargs_kernel_size`` (its 'mlp' builds REPA's key layout here, not iREPA's ``projection_layer.*`` one).
    ``decoder_hidden_size`` exists only for compatibility: the reference builds the final layer at that width (768
    by default), which breaks SiT-S and any model whose hidden size is not 768 unless overridden; here it must equal
    ``hidden_size`` (or be left out).
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        z_dims: Sequence[int] = (768,),
        projector_dim: int = 2048,
        encoder_depth: int = 8,
        qk_norm: bool = False,
        use_rope: bool = False,
        attn_backend: str = "sdpa",
        decoder_hidden_size: int | None = None,
        cls_token_dim: int | None = None,
        projector: str = "mlp",
        projector_kernel_size: int = 1,
        **reference_only: object,
    ) -> None:
        projector, projector_kernel_size = _irepa_keywords(reference_only, projector, projector_kernel_size)
        _check_reference_only(reference_only)
        if decoder_hidden_size is not None and decoder_hidden_size != hidden_size:
            raise ValueError(
                f"decoder_hidden_size={decoder_hidden_size} differs from hidden_size={hidden_size}; SiT's final "
                "layer reads the last block directly, so they must match"
            )
        super().__init__(
            input_size=input_size, patch_size=patch_size, in_channels=in_channels, hidden_size=hidden_size,
            depth=depth, num_built_blocks=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
            class_dropout_prob=class_dropout_prob, num_classes=num_classes, z_dims=z_dims,
            projector_dim=projector_dim, encoder_depth=encoder_depth, qk_norm=qk_norm, use_rope=use_rope,
            attn_backend=attn_backend, cls_token_dim=cls_token_dim, projector=projector,
            projector_kernel_size=projector_kernel_size,
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, cls_token_dim)
        self._add_class_token_embedder()
        self.initialize_weights()

    def initialize_weights(self) -> None:
        self._init_trunk()
        final = self.final_layer
        for layer in (final.adaLN_modulation[-1], final.linear, final.linear_cls):
            if layer is not None:
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, p·p·C) → (N, C, H, W)."""
        c, p, h = self.out_channels, self.patch_size, self.x_embedder.grid_size
        x = x.reshape(x.shape[0], h, h, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, h * p)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, force_drop_ids: torch.Tensor | None = None,
        cls_token: torch.Tensor | None = None, attn_blocks: Sequence[int] | None = None,
        attn_heads: Sequence[int] | None = None, project: bool = True,
    ) -> tuple:
        """(v, zs), with a class token (v, zs, class-token velocity); with ``attn_blocks`` (blocks from 1) one more
        element last: those blocks' attention logits (q·scale)·kᵀ after QK-norm and RoPE, (N, heads, P, P) over
        the P patch tokens (a class token's row and column left out), of ``attn_heads`` (default: all), in the
        order of ``attn_blocks`` (HASTE's distillation). The other blocks keep their fused kernel untouched.
        ``project=False``: the projectors are skipped (``zs`` is empty), as after the alignment stopped."""
        h, c = self.embed(x, t, y, force_drop_ids, cls_token)
        capture = self._logit_capture(attn_blocks, attn_heads)
        maps: dict[int, torch.Tensor] = {}
        zs: list[torch.Tensor] = []
        for i, block in enumerate(self.blocks):
            if i in capture:
                h, maps[i] = block(h, c, self.feat_rope, capture[i], self.num_prefix_tokens)
            else:
                h = block(h, c, self.feat_rope)
            if project and i + 1 == self.encoder_depth:
                zs = self.project(h)
        if self.cls_token_dim is None:
            out: tuple = (self.unpatchify(self.final_layer(h, c)), zs)
        else:
            patches, cls_out = self.final_layer(h, c)
            out = (self.unpatchify(patches), zs, cls_out)
        return out if attn_blocks is None else (*out, [maps[b - 1] for b in attn_blocks])

    def _logit_capture(self, blocks: Sequence[int] | None, heads: Sequence[int] | None) -> dict[int, list[int]]:
        """{block index from 0: the heads whose logits it returns}, checked against the model."""
        if blocks is None:
            return {}
        heads = list(range(self.num_heads)) if heads is None else list(heads)
        if not heads or not all(0 <= h < self.num_heads for h in heads):
            raise ValueError(f"attn_heads {heads} must be non-empty and in [0, {self.num_heads})")
        if not all(1 <= b <= len(self.blocks) for b in blocks):
            raise ValueError(f"attn_blocks {list(blocks)} must be in [1, {len(self.blocks)}] (counted from 1)")
        return {b - 1: heads for b in blocks}


class SiTPhase1(_SiTTrunk):
    """ERW Phase 1 (L2R): embedders, the first ``warmup_depth`` blocks and the projectors — nothing else.

    The late blocks and the final layer are never allocated. The projectors read the last built block.
    ``forward(x, t, y) -> [z per encoder]``; ERW runs it on clean latents at t = 0. With ``cls_token_dim`` (this
    project's extension: ERW's warmup on a REG model) it takes the clean class token too and projects 1 + N tokens.
    """

    def __init__(
        self,
        warmup_depth: int,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        z_dims: Sequence[int] = (768,),
        projector_dim: int = 2048,
        qk_norm: bool = False,
        use_rope: bool = False,
        attn_backend: str = "sdpa",
        encoder_depth: int | None = None,
        decoder_hidden_size: int | None = None,
        cls_token_dim: int | None = None,
        projector: str = "mlp",
        projector_kernel_size: int = 1,
        **reference_only: object,
    ) -> None:
        projector, projector_kernel_size = _irepa_keywords(reference_only, projector, projector_kernel_size)
        _check_reference_only(reference_only)
        if not 1 <= warmup_depth <= depth:
            raise ValueError(f"warmup depth L must be in [1, depth={depth}], got {warmup_depth}")
        if encoder_depth is not None and encoder_depth != warmup_depth:
            raise ValueError(
                f"the Phase-1 projector reads the last warmed block: encoder_depth={encoder_depth} must equal "
                f"the warmup depth L={warmup_depth} (Phase 2 may align at another depth)"
            )
        super().__init__(
            input_size=input_size, patch_size=patch_size, in_channels=in_channels, hidden_size=hidden_size,
            depth=depth, num_built_blocks=warmup_depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
            class_dropout_prob=class_dropout_prob, num_classes=num_classes, z_dims=z_dims,
            projector_dim=projector_dim, encoder_depth=warmup_depth, qk_norm=qk_norm, use_rope=use_rope,
            attn_backend=attn_backend, cls_token_dim=cls_token_dim, projector=projector,
            projector_kernel_size=projector_kernel_size,
        )
        self.warmup_depth = warmup_depth
        self._add_class_token_embedder()
        self._init_trunk()

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, force_drop_ids: torch.Tensor | None = None,
        cls_token: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        h, c = self.embed(x, t, y, force_drop_ids, cls_token)
        for block in self.blocks:
            h = block(h, c, self.feat_rope)
        return self.project(h)


# Keywords the reference constructor takes that change nothing here (its loss/path live elsewhere).
_REFERENCE_NOOP_KWARGS = {"path_type", "use_cfg", "fused_attn"}


def _irepa_keywords(kwargs: dict[str, object], projector: str, kernel_size: int) -> tuple[str, int]:
    """iREPA's constructor names for the projector (``projection_layer_type``, ``proj_kwargs_kernel_size``), taken
    out of ``kwargs``. As in iREPA's SiT, a conv named that way without a kernel has kernel 3."""
    if "projection_layer_type" not in kwargs and "proj_kwargs_kernel_size" not in kwargs:
        return projector, kernel_size
    kind = str(kwargs.pop("projection_layer_type", projector))
    kernel = int(str(kwargs.pop("proj_kwargs_kernel_size", 3)))
    return kind, kernel


def _check_reference_only(kwargs: dict[str, object]) -> None:
    unknown = set(kwargs) - _REFERENCE_NOOP_KWARGS
    if unknown:
        raise TypeError(f"unexpected SiT keyword argument(s): {sorted(unknown)}")


def _check_cls_token_dim(cls_token_dim: int | None, z_dims: Sequence[int]) -> int | None:
    """REG's class token is the first encoder's CLS feature: its width is z_dims[0] (REG's constructor silently
    replaces its cls_token_dim argument by it; here a different value is an error)."""
    if cls_token_dim is None:
        return None
    if cls_token_dim < 1:
        raise ValueError(f"cls_token_dim must be a positive width, got {cls_token_dim}")
    if z_dims and cls_token_dim != z_dims[0]:
        raise ValueError(f"cls_token_dim={cls_token_dim} differs from the first encoder's width z_dims[0]="
                         f"{z_dims[0]}: REG's class token is that encoder's CLS feature")
    return cls_token_dim


# ----------------------------------------------------------------------------------------------------------
# Named configurations
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SiTSize:
    depth: int
    hidden_size: int
    num_heads: int


SIT_SIZES: dict[str, SiTSize] = {
    "S": SiTSize(12, 384, 6),
    "B": SiTSize(12, 768, 12),
    "L": SiTSize(24, 1024, 16),
    "XL": SiTSize(28, 1152, 16),
}
SIT_PATCH_SIZES = (2, 4, 8)
SIT_CONFIGS: tuple[str, ...] = tuple(f"SiT-{s}/{p}" for s in SIT_SIZES for p in SIT_PATCH_SIZES)

_NAME = re.compile(r"^SiT-(S|B|L|XL)/(\d+)$")


def parse_model_name(name: str) -> tuple[str, int]:
    """'SiT-XL/2' → ('XL', 2); anything else is a clear error listing the valid names."""
    match = _NAME.match(name)
    if not match or int(match.group(2)) not in SIT_PATCH_SIZES:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(SIT_CONFIGS)}")
    return match.group(1), int(match.group(2))


def sit_config(name: str, **overrides: object) -> dict[str, object]:
    size, patch = parse_model_name(name)
    spec = SIT_SIZES[size]
    config: dict[str, object] = {
        "depth": spec.depth, "hidden_size": spec.hidden_size, "num_heads": spec.num_heads, "patch_size": patch,
    }
    config.update(overrides)
    return config


def build_sit(name: str, **overrides: object) -> SiT:
    """Build a named SiT ('SiT-XL/2', …); keyword overrides go to the constructor."""
    return SiT(**sit_config(name, **overrides))


def build_sit_phase1(name: str, warmup_depth: int, **overrides: object) -> SiTPhase1:
    """Build the ERW Phase-1 model of a named SiT with the first ``warmup_depth`` blocks."""
    return SiTPhase1(warmup_depth, **sit_config(name, **overrides))
