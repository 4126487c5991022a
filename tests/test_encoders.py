"""Tests for erw_fast.encoders: registry, REPA preprocessing, weight formats, frozen behaviour.

All weights are random (pretrained=False or checkpoints written to tmp_path); the large encoders are only
built on the meta device. Reference computations here are written independently of the package.
"""

from __future__ import annotations

import math
import urllib.error

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from erw_fast.encoders import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Encoder,
    EncoderWeightsError,
    check_token_count,
    convert_state_dict,
    get_encoder_spec,
    import_timm,
    list_encoders,
    load_encoder,
    load_encoders,
    parse_encoder_names,
    preprocess_raw_image,
)

ALL_NAMES = [
    "dinov2-vit-s",
    "dinov2-vit-b",
    "dinov2-vit-l",
    "dinov2-vit-g",
    "dinov2-vit-s-reg",
    "dinov2-vit-b-reg",
    "dinov2-vit-l-reg",
    "dinov2-vit-g-reg",
    "clip-vit-L",
    "mocov3-vit-b",
    "mocov3-vit-l",
    "mae-vit-l",
    "jepa-vit-h",
]
EMBED_DIMS = {"s": 384, "b": 768, "l": 1024, "g": 1536}
EXPECTED_DIM = {
    **{n: EMBED_DIMS[n.split("-")[2]] for n in ALL_NAMES if n.startswith("dinov2")},
    "clip-vit-L": 1024,
    "mocov3-vit-b": 768,
    "mocov3-vit-l": 1024,
    "mae-vit-l": 1024,
    "jepa-vit-h": 1280,
}
# Published parameter counts of the released models (approximate: different pos-embed grids / heads).
SHALLOW = {"depth": 4}  # model_kwargs for tests that exercise loading / behaviour rather than the full depth
PUBLISHED_PARAMS = {
    "dinov2-vit-s": 21e6,
    "dinov2-vit-b": 86e6,
    "dinov2-vit-l": 300e6,
    "dinov2-vit-g": 1.136e9,
    "clip-vit-L": 304e6,
    "mocov3-vit-b": 86e6,
    "mocov3-vit-l": 304e6,
    "mae-vit-l": 304e6,
    "jepa-vit-h": 632e6,
}


def _images(b: int, res: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, res, res), generator=g, dtype=torch.uint8)


def _randomize_(module: nn.Module, seed: int = 0) -> None:
    """Give every parameter O(1) random values so outputs depend on all of them (LayerScale 1e-5 etc.)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if p.ndim == 1 and (name.endswith("weight") or name.endswith("gamma")):
                p.copy_(1.0 + 0.2 * r)  # norm scales, LayerScale
            elif p.ndim == 1:
                p.copy_(0.1 * r)  # biases
            elif name.endswith("weight"):
                p.copy_(r / math.sqrt(p[0].numel()))  # keep activations O(1)
            else:
                p.copy_(0.5 * r)  # cls / register tokens, position embeddings


# ---------------------------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------------------------
def test_registry_names_and_metadata():
    assert set(ALL_NAMES) <= set(list_encoders())
    for name in ALL_NAMES:
        spec = get_encoder_spec(name)
        assert spec.embed_dim == EXPECTED_DIM[name], name
        assert spec.num_patches(256) == 256 and spec.num_patches(512) == 1024, name
        if spec.family in ("dinov2", "clip", "jepa"):
            assert spec.input_size(256) == 224 and spec.patch_size == 14
        else:
            assert spec.input_size(256) == 256 and spec.patch_size == 16
        mean, std = (CLIP_MEAN, CLIP_STD) if spec.family == "clip" else (IMAGENET_MEAN, IMAGENET_STD)
        assert (spec.mean, spec.std) == (mean, std)
    b = get_encoder_spec("dinov2-vit-b")
    assert b.timm_name == "vit_base_patch14_dinov2.lvd142m"
    assert (b.hub_repo, b.hub_entry) == ("facebookresearch/dinov2", "dinov2_vitb14")
    breg = get_encoder_spec("dinov2-vit-b-reg")
    assert breg.timm_name == "vit_base_patch14_reg4_dinov2.lvd142m" and breg.hub_entry == "dinov2_vitb14_reg"
    assert get_encoder_spec("clip-vit-L").timm_name == "vit_large_patch14_clip_224.openai"
    assert get_encoder_spec("mae-vit-l").timm_name == "vit_large_patch16_224.mae"
    assert get_encoder_spec("jepa-vit-h").timm_name == "vit_huge_patch14_224"


def test_parse_names_aliases_and_unknown():
    assert parse_encoder_names("dinov2-vit-b, clip-vit-L") == ["dinov2-vit-b", "clip-vit-L"]
    assert parse_encoder_names(["dinov2-vit-b,mocov3-vit-b", "CLIP-VIT-l"]) == [
        "dinov2-vit-b",
        "mocov3-vit-b",
        "clip-vit-L",
    ]
    assert parse_encoder_names("dinov2reg-vit-b") == ["dinov2-vit-b-reg"]  # REPA's own spelling
    assert parse_encoder_names("None") == [] and parse_encoder_names(None) == []
    with pytest.raises(ValueError) as ei:
        get_encoder_spec("dinov2-vit-bb")
    msg = str(ei.value)
    assert "Did you mean 'dinov2-vit-b'" in msg and "jepa-vit-h" in msg and "clip-vit-L" in msg
    with pytest.raises(ValueError, match="unknown encoder"):
        load_encoders("dinov2-vit-b,resnet-50", pretrained=False, device="meta")


# ---------------------------------------------------------------------------------------------------------
# architectures (meta device: no memory, no init cost)
# ---------------------------------------------------------------------------------------------------------
def _expected_param_count(name: str, resolution: int = 256) -> int:
    """Count parameters from first principles for the ViT the spec describes."""
    s = get_encoder_spec(name)
    d, p = s.embed_dim, s.patch_size
    if s.mlp_hidden_dim is not None:  # SwiGLU: fc1 -> 2 * hidden (gate and value), fc2 hidden -> d
        h = s.mlp_hidden_dim
        mlp = d * 2 * h + 2 * h + h * d + d
    else:
        h = 4 * d
        mlp = d * h + h + h * d + d
    attn = d * 3 * d + 3 * d + d * d + d
    block = 2 * 2 * d + attn + mlp + (2 * d if s.layer_scale else 0)
    clip = s.family == "clip"
    patch_embed = 3 * p * p * d + (0 if clip else d)  # CLIP's conv1 has no bias
    grid = s.grid_size(resolution)
    # DINOv2-reg (timm no_embed_class): pos embed for patches only; otherwise one more for the CLS token.
    n_pos = grid * grid + (1 if s.class_token and s.num_register_tokens == 0 else 0)
    total = s.depth * block + patch_embed + n_pos * d
    total += d * int(s.class_token) + d * s.num_register_tokens
    total += 2 * d if s.final_norm else 0
    total += 2 * d if clip else 0  # ln_pre
    return total


@pytest.mark.parametrize("name", ALL_NAMES)
def test_architecture_on_meta(name):
    enc = load_encoder(name, resolution=256, pretrained=False, device="meta")
    spec = get_encoder_spec(name)
    n = sum(p.numel() for p in enc.parameters())
    assert n == _expected_param_count(name)
    assert abs(n - PUBLISHED_PARAMS[name.removesuffix("-reg")]) / n < 0.03
    assert enc.embed_dim == spec.embed_dim == EXPECTED_DIM[name]
    assert len(enc.model.blocks) == spec.depth and enc.model.blocks[0].attn.num_heads == spec.num_heads
    assert enc.model.num_prefix_tokens == int(spec.class_token) + spec.num_register_tokens
    out = enc(torch.empty(2, 3, 256, 256, dtype=torch.uint8, device="meta"))
    assert tuple(out.shape) == (2, 256, spec.embed_dim)
    assert enc.num_patches() == 256 and enc.num_patches(512) == 1024
    if spec.family == "clip":
        assert (
            isinstance(enc.model.norm, nn.Identity)
            and type(enc.model.blocks[0].mlp.act).__name__ == "QuickGELU"
        )
    if spec.family == "mae":
        assert isinstance(enc.model.norm, nn.Identity)


@pytest.mark.parametrize("name", ["dinov2-vit-l", "mocov3-vit-b", "jepa-vit-h", "clip-vit-L"])
def test_meta_shapes_at_512(name):
    enc = load_encoder(name, resolution=512, pretrained=False, device="meta")
    out = enc(torch.empty(1, 3, 512, 512, device="meta"))
    assert tuple(out.shape) == (1, 1024, EXPECTED_DIM[name])


# ---------------------------------------------------------------------------------------------------------
# real forwards (small / base sizes)
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["dinov2-vit-s", "dinov2-vit-s-reg",
                                  pytest.param("dinov2-vit-b", marks=pytest.mark.slow),
                                  pytest.param("mocov3-vit-b", marks=pytest.mark.slow)])
def test_forward_shapes_256(name):
    torch.manual_seed(0)
    enc = load_encoder(name, resolution=256, pretrained=False)
    out = enc(_images(2, 256))
    assert out.shape == (2, 256, EXPECTED_DIM[name]) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.slow
def test_forward_dinov2_b_512():
    torch.manual_seed(0)
    enc = load_encoder("dinov2-vit-b", resolution=512, pretrained=False)
    assert enc.model.pos_embed.shape == (1, 1 + 32 * 32, 768)
    out = enc(_images(1, 512))
    assert out.shape == (1, 1024, 768)
    with pytest.raises(ValueError, match="512px images"):
        enc(_images(1, 256))


# ---------------------------------------------------------------------------------------------------------
# preprocessing == REPA's formula (independent float64 computation)
# ---------------------------------------------------------------------------------------------------------
def _repa_reference(x: torch.Tensor, family: str, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    res = x.shape[-1]
    x = x.to(dtype) / 255.0
    imnet = (torch.tensor(IMAGENET_MEAN, dtype=dtype), torch.tensor(IMAGENET_STD, dtype=dtype))
    clip = (torch.tensor(CLIP_MEAN, dtype=dtype), torch.tensor(CLIP_STD, dtype=dtype))

    def norm(t, ms):
        return (t - ms[0].view(1, 3, 1, 1)) / ms[1].view(1, 3, 1, 1)

    if family == "clip":
        return norm(F.interpolate(x, 224 * (res // 256), mode="bicubic"), clip)
    if family in ("mocov3", "mae"):
        return norm(x, imnet)
    return F.interpolate(norm(x, imnet), 224 * (res // 256), mode="bicubic")  # dinov2, jepa


@pytest.mark.parametrize(
    "name", ["dinov2-vit-b", "dinov2-vit-b-reg", "clip-vit-L", "mocov3-vit-b", "mae-vit-l", "jepa-vit-h"]
)
@pytest.mark.parametrize("res", [256, 512])
def test_preprocess_matches_repa(name, res):
    x = _images(2, res, seed=res)
    family = get_encoder_spec(name).family
    ours = preprocess_raw_image(x, name)
    ref = _repa_reference(x, family)
    side = 224 * (res // 256) if family in ("dinov2", "clip", "jepa") else res
    assert ours.shape == (2, 3, side, side) and ours.dtype == torch.float32
    # CPU's fp32 bicubic kernel itself is only ~1e-4 accurate against fp64; same formula in fp32 is exact
    torch.testing.assert_close(ours.double(), ref, atol=3e-4, rtol=1e-5)
    torch.testing.assert_close(ours, _repa_reference(x, family, torch.float32), atol=0, rtol=0)
    # a float 0..255 input gives the same result; REPA's family-substring form is accepted too
    torch.testing.assert_close(preprocess_raw_image(x.float(), family), ours)


def test_preprocess_rejects_bad_sizes():
    with pytest.raises(ValueError, match="multiple of 256"):
        preprocess_raw_image(_images(1, 224), "dinov2-vit-b")
    with pytest.raises(ValueError, match="square"):
        preprocess_raw_image(torch.zeros(1, 3, 256, 512), "dinov2-vit-b")


# ---------------------------------------------------------------------------------------------------------
# local weights
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dinov2_s() -> Encoder:
    torch.manual_seed(1)
    enc = load_encoder("dinov2-vit-s", pretrained=False, model_kwargs=SHALLOW)  # shallow: fast on CPU
    _randomize_(enc)
    return enc


def test_roundtrip_pt_and_safetensors(tmp_path, dinov2_s):
    from safetensors.torch import save_file

    x = _images(2, 256, seed=3)
    ref = dinov2_s(x)
    pt = tmp_path / "dinov2_s.pt"
    torch.save(dinov2_s.model.state_dict(), pt)
    st = tmp_path / "dinov2_s.safetensors"
    save_file({k: v.contiguous() for k, v in dinov2_s.model.state_dict().items()}, st)
    whole = tmp_path / "encoder_module.pt"
    torch.save(dinov2_s.state_dict(), whole)  # Encoder.state_dict(): keys prefixed 'model.'
    for path in (pt, st, whole):
        enc = load_encoder("dinov2-vit-s", pretrained=True, weights_path=path, model_kwargs=SHALLOW)
        assert str(path) in enc.describe() and "256px" in enc.describe()
        assert all(not p.is_meta and p.dtype == torch.float32 for p in enc.parameters())
        torch.testing.assert_close(enc(x), ref, rtol=0, atol=0)
    (enc,) = load_encoders(
        ["dinov2-vit-s"], pretrained=True, weights_path={"dinov2-vit-s": st}, model_kwargs=SHALLOW
    )
    torch.testing.assert_close(enc(x), ref, rtol=0, atol=0)
    (enc,) = load_encoders("dinov2-vit-s", pretrained=True, weights_paths=[pt], model_kwargs=SHALLOW)
    torch.testing.assert_close(enc(x), ref, rtol=0, atol=0)


def _to_dinov2_original(timm_sd: dict, reg: bool, grid: int, seed: int = 0) -> dict:
    """Invert the DINOv2 key mapping: timm layout -> facebookresearch layout (pos embed at `grid`)."""
    g = torch.Generator().manual_seed(seed)
    d = timm_sd["cls_token"].shape[-1]
    out = {k: v.clone() for k, v in timm_sd.items() if k not in ("cls_token", "pos_embed", "reg_token")}
    pos_patches = torch.randn(1, grid * grid, d, generator=g) * 0.5
    pos_cls = torch.randn(1, 1, d, generator=g) * 0.5
    if reg:
        out["register_tokens"] = timm_sd["reg_token"].clone()
    out["cls_token"] = timm_sd["cls_token"].clone()
    out["pos_embed"] = torch.cat([pos_cls, pos_patches], dim=1)
    out["mask_token"] = torch.zeros(1, d)
    return out  # (ViT-g's SwiGLU w12/w3 names: see test_dinov2_giant_swiglu_keys_convert)


def _reference_dinov2_forward(sd: dict, x: torch.Tensor, heads: int) -> torch.Tensor:
    """DINOv2's forward_features()['x_norm_patchtokens'], written against the original key names."""
    p = sd["patch_embed.proj.weight"].shape[-1]
    t = (
        F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=p)
        .flatten(2)
        .transpose(1, 2)
    )
    t = torch.cat([sd["cls_token"].expand(t.shape[0], -1, -1), t], dim=1) + sd["pos_embed"]
    n_reg = 0
    if "register_tokens" in sd:
        n_reg = sd["register_tokens"].shape[1]
        t = torch.cat([t[:, :1], sd["register_tokens"].expand(t.shape[0], -1, -1), t[:, 1:]], dim=1)
    d = t.shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(depth):
        b = {k[len(f"blocks.{i}.") :]: v for k, v in sd.items() if k.startswith(f"blocks.{i}.")}
        h = F.layer_norm(t, (d,), b["norm1.weight"], b["norm1.bias"], eps=1e-6)
        qkv = F.linear(h, b["attn.qkv.weight"], b["attn.qkv.bias"]).view(t.shape[0], t.shape[1], 3, heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1) @ v
        a = F.linear(a.transpose(1, 2).reshape_as(t), b["attn.proj.weight"], b["attn.proj.bias"])
        t = t + b["ls1.gamma"] * a
        h = F.layer_norm(t, (d,), b["norm2.weight"], b["norm2.bias"], eps=1e-6)
        h = F.linear(
            F.gelu(F.linear(h, b["mlp.fc1.weight"], b["mlp.fc1.bias"])),
            b["mlp.fc2.weight"],
            b["mlp.fc2.bias"],
        )
        t = t + b["ls2.gamma"] * h
    t = F.layer_norm(t, (d,), sd["norm.weight"], sd["norm.bias"], eps=1e-6)
    return t[:, 1 + n_reg :]


@pytest.mark.parametrize("name", ["dinov2-vit-s", "dinov2-vit-s-reg"])
def test_dinov2_original_format(tmp_path, name):
    """A facebookresearch-format checkpoint at the released 518-px grid (37x37) loads, with the position
    embedding resampled exactly as REPA does (timm resample_abs_pos_embed to 16x16, CLS kept)."""
    timm = import_timm()
    torch.manual_seed(2)
    src = load_encoder(name, pretrained=False, model_kwargs={"depth": 2})
    _randomize_(src, seed=5)
    orig = _to_dinov2_original(src.model.state_dict(), reg=name.endswith("-reg"), grid=37)
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(orig, path)
    enc = load_encoder(name, pretrained=True, weights_path=path, model_kwargs={"depth": 2})

    # REPA: encoder.pos_embed.data = resample_abs_pos_embed(encoder.pos_embed.data, [16, 16])
    repa_sd = dict(orig)
    repa_sd["pos_embed"] = timm.layers.resample_abs_pos_embed(orig["pos_embed"], [16, 16])
    x = _images(2, 256, seed=7)
    ref = _reference_dinov2_forward(repa_sd, preprocess_raw_image(x, name), heads=6)
    torch.testing.assert_close(enc(x), ref, atol=2e-4, rtol=2e-4)


def test_dinov2_giant_swiglu_keys_convert():
    spec = get_encoder_spec("dinov2-vit-g")
    sd = {
        "mask_token": torch.zeros(1, 4),
        "cls_token": torch.zeros(1, 1, 4),
        "blocks.0.mlp.w12.weight": torch.zeros(16, 4),
        "blocks.0.mlp.w12.bias": torch.zeros(16),
        "blocks.0.mlp.w3.weight": torch.zeros(4, 8),
        "blocks.0.mlp.w3.bias": torch.zeros(4),
    }
    out = convert_state_dict({"teacher": sd}, spec)
    assert set(out) == {
        "cls_token",
        "blocks.0.mlp.fc1.weight",
        "blocks.0.mlp.fc1.bias",
        "blocks.0.mlp.fc2.weight",
        "blocks.0.mlp.fc2.bias",
    }


def _reference_clip_forward(sd: dict, x: torch.Tensor, heads: int) -> torch.Tensor:
    """REPA's UpdatedVisionTransformer.forward (no ln_post, no proj), on OpenAI key names, QuickGELU."""
    w = sd["visual.conv1.weight"].float()
    t = F.conv2d(x, w, stride=w.shape[-1]).flatten(2).transpose(1, 2)
    cls = sd["visual.class_embedding"].float().view(1, 1, -1).expand(t.shape[0], -1, -1)
    t = torch.cat([cls, t], dim=1) + sd["visual.positional_embedding"].float()
    d = t.shape[-1]
    t = F.layer_norm(t, (d,), sd["visual.ln_pre.weight"].float(), sd["visual.ln_pre.bias"].float())
    i = 0
    while f"visual.transformer.resblocks.{i}.ln_1.weight" in sd:
        b = {
            k.split(f"resblocks.{i}.", 1)[1]: v.float()
            for k, v in sd.items()
            if k.startswith(f"visual.transformer.resblocks.{i}.")
        }
        h = F.layer_norm(t, (d,), b["ln_1.weight"], b["ln_1.bias"])
        qkv = F.linear(h, b["attn.in_proj_weight"], b["attn.in_proj_bias"]).view(
            t.shape[0], t.shape[1], 3, heads, -1
        )
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1) @ v
        t = t + F.linear(a.transpose(1, 2).reshape_as(t), b["attn.out_proj.weight"], b["attn.out_proj.bias"])
        h = F.linear(
            F.layer_norm(t, (d,), b["ln_2.weight"], b["ln_2.bias"]), b["mlp.c_fc.weight"], b["mlp.c_fc.bias"]
        )
        h = h * torch.sigmoid(1.702 * h)
        t = t + F.linear(h, b["mlp.c_proj.weight"], b["mlp.c_proj.bias"])
        i += 1
    return t[:, 1:]


def test_clip_openai_format(tmp_path):
    torch.manual_seed(3)
    src = load_encoder("clip-vit-L", pretrained=False, model_kwargs={"depth": 2})
    _randomize_(src, seed=9)
    sd = src.model.state_dict()
    swaps = [
        ("patch_embed.proj.", "conv1."),
        ("norm_pre.", "ln_pre."),
        ("blocks.", "transformer.resblocks."),
        (".norm1.", ".ln_1."),
        (".norm2.", ".ln_2."),
        (".attn.qkv.weight", ".attn.in_proj_weight"),
        (".attn.qkv.bias", ".attn.in_proj_bias"),
        (".attn.proj.", ".attn.out_proj."),
        (".mlp.fc1.", ".mlp.c_fc."),
        (".mlp.fc2.", ".mlp.c_proj."),
    ]
    openai = {}
    for k, v in sd.items():
        if k == "cls_token":
            openai["visual.class_embedding"] = v.reshape(-1)
        elif k == "pos_embed":
            openai["visual.positional_embedding"] = v[0]
        else:
            for a, b in swaps:
                k = k.replace(a, b)
            openai["visual." + k] = v
    d = sd["cls_token"].shape[-1]
    openai.update(
        {
            "visual.ln_post.weight": torch.ones(d),
            "visual.ln_post.bias": torch.zeros(d),
            "visual.proj": torch.randn(d, 768),
            "logit_scale": torch.tensor(4.6),
            "token_embedding.weight": torch.randn(10, 768),
            "transformer.resblocks.0.attn.in_proj_weight": torch.randn(3 * 768, 768),
        }
    )
    openai = {k: v.half() for k, v in openai.items()}  # OpenAI releases fp16 weights
    path = tmp_path / "ViT-L-14.pt"
    torch.save(openai, path)
    enc = load_encoder("clip-vit-L", pretrained=True, weights_path=path, model_kwargs={"depth": 2})
    assert next(enc.parameters()).dtype == torch.float32
    x = _images(2, 256, seed=11)
    ref = _reference_clip_forward(openai, preprocess_raw_image(x, "clip-vit-L"), heads=16)
    torch.testing.assert_close(enc(x), ref, atol=2e-4, rtol=2e-4)


def test_mocov3_checkpoint_format(tmp_path):
    """MoCo v3 training checkpoint: state_dict/module.base_encoder.*, 224-px (14x14) sin-cos pos embed that
    REPA resamples to 16x16; heads, momentum encoder and predictor are dropped."""
    timm = import_timm()
    torch.manual_seed(4)
    src = load_encoder("mocov3-vit-b", pretrained=False, model_kwargs={"depth": 2})
    sd = src.model.state_dict()
    pos14 = torch.randn(1, 1 + 14 * 14, 768)
    ckpt_sd = {f"module.base_encoder.{k}": v for k, v in sd.items() if k != "pos_embed"}
    ckpt_sd["module.base_encoder.pos_embed"] = pos14
    ckpt_sd["module.base_encoder.head.0.weight"] = torch.randn(4096, 768)
    ckpt_sd.update({f"module.momentum_encoder.{k}": torch.randn_like(v) for k, v in sd.items()})
    ckpt_sd["module.predictor.0.weight"] = torch.randn(4096, 256)
    path = tmp_path / "vit-b-300ep.pth.tar"
    torch.save({"epoch": 300, "arch": "vit_base", "state_dict": ckpt_sd, "optimizer": {"state": {}}}, path)
    enc = load_encoder("mocov3-vit-b", pretrained=True, weights_path=path, model_kwargs={"depth": 2})
    loaded = enc.model.state_dict()
    torch.testing.assert_close(loaded["pos_embed"], timm.layers.resample_abs_pos_embed(pos14, [16, 16]))
    for k, v in sd.items():
        if k != "pos_embed":
            assert torch.equal(loaded[k], v), k
    # the released checkpoints' naming slip in blocks 13/14 is repaired (REPA's fix_mocov3_state_dict)
    fixed = convert_state_dict(
        {
            "state_dict": {
                "module.base_encoder.blocks.13.norm13.weight": torch.zeros(1),
                "module.base_encoder.blocks.13.mlp.fc13.weight": torch.zeros(1),
                "module.base_encoder.blocks.14.norm14.weight": torch.zeros(1),
                "module.base_encoder.blocks.14.mlp.fc14.weight": torch.zeros(1),
            }
        },
        get_encoder_spec("mocov3-vit-b"),
    )
    assert set(fixed) == {
        "blocks.13.norm1.weight",
        "blocks.13.mlp.fc1.weight",
        "blocks.14.norm2.weight",
        "blocks.14.mlp.fc2.weight",
    }


@pytest.mark.slow
def test_mae_and_jepa_checkpoint_formats(tmp_path):
    timm = import_timm()
    torch.manual_seed(5)
    mae = load_encoder("mae-vit-l", pretrained=False, model_kwargs={"depth": 2})
    sd = {k: v for k, v in mae.model.state_dict().items() if k != "pos_embed"}
    pos14 = torch.randn(1, 1 + 14 * 14, 1024)
    model_sd = {
        **sd,
        "pos_embed": pos14,
        "norm.weight": torch.ones(1024),
        "norm.bias": torch.zeros(1024),
        "decoder_embed.weight": torch.randn(512, 1024),
    }
    torch.save({"model": model_sd}, tmp_path / "mae.pth")
    enc = load_encoder("mae-vit-l", weights_path=tmp_path / "mae.pth", model_kwargs={"depth": 2})
    torch.testing.assert_close(enc.model.pos_embed.data, timm.layers.resample_abs_pos_embed(pos14, [16, 16]))
    assert torch.equal(enc.model.blocks[1].mlp.fc2.weight, sd["blocks.1.mlp.fc2.weight"])

    jepa = load_encoder("jepa-vit-h", pretrained=False, model_kwargs={"depth": 2})
    jsd = jepa.model.state_dict()
    ckpt = {
        "encoder": {f"module.{k}": v for k, v in jsd.items()},
        "target_encoder": {f"module.{k}": torch.zeros_like(v) for k, v in jsd.items()},
        "predictor": {"module.mask_token": torch.zeros(1, 1, 16)},
        "epoch": 300,
    }
    torch.save(ckpt, tmp_path / "ijepa.pth.tar")
    enc = load_encoder("jepa-vit-h", weights_path=tmp_path / "ijepa.pth.tar", model_kwargs={"depth": 2})
    x = _images(1, 256, seed=13)
    torch.testing.assert_close(enc(x), jepa(x), rtol=0, atol=0)  # REPA reads the context 'encoder'


def test_bad_files_name_the_file(tmp_path, dinov2_s):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"this is not a checkpoint")
    with pytest.raises(EncoderWeightsError, match="corrupt.pt"):
        load_encoder("dinov2-vit-s", weights_path=corrupt)
    bad_st = tmp_path / "corrupt.safetensors"
    bad_st.write_bytes(b"\x00" * 16)
    with pytest.raises(EncoderWeightsError, match="corrupt.safetensors"):
        load_encoder("dinov2-vit-s", weights_path=bad_st)
    small = tmp_path / "dinov2_small.pt"
    torch.save(dinov2_s.model.state_dict(), small)
    with pytest.raises(EncoderWeightsError, match=r"dinov2_small\.pt.*dinov2-vit-b.*shape mismatch"):
        load_encoder("dinov2-vit-b", weights_path=small, model_kwargs=SHALLOW)
    partial = tmp_path / "partial.pt"
    torch.save({k: v for k, v in dinov2_s.model.state_dict().items() if "blocks.3." not in k}, partial)
    with pytest.raises(EncoderWeightsError, match=r"partial\.pt.*missing .*blocks\.3\."):
        load_encoder("dinov2-vit-s", weights_path=partial, model_kwargs=SHALLOW)
    with pytest.raises(EncoderWeightsError, match="not found"):
        load_encoder("dinov2-vit-s", weights_path=tmp_path / "nope.pt")
    with pytest.raises(ValueError, match="pretrained=False"):
        load_encoder("dinov2-vit-s", pretrained=False, weights_path=small)


def test_pretrained_without_path_offline_is_clear(monkeypatch, tmp_path):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(EncoderWeightsError) as ei:
        load_encoder("dinov2-vit-b", pretrained=True)
    msg = str(ei.value)
    assert "dinov2_vitb14_pretrain.pth" in msg and "weights_path" in msg and "pretrained=False" in msg


def test_pretrained_download_path_uses_release_file(monkeypatch, tmp_path, dinov2_s):
    """pretrained=True without a path fetches the facebookresearch release file (simulated offline)."""
    orig = _to_dinov2_original(dinov2_s.model.state_dict(), reg=False, grid=37)
    fetched = []

    def fake_download(url, dst, hash_prefix=None, progress=True):
        fetched.append(url)
        torch.save(orig, dst)

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    enc = load_encoder("dinov2-vit-s", pretrained=True, model_kwargs=SHALLOW)
    assert fetched == ["https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth"]
    assert "dinov2_vits14_pretrain.pth" in enc.describe()
    load_encoder("dinov2-vit-s", pretrained=True, model_kwargs=SHALLOW)  # second call: from the cache
    assert len(fetched) == 1


# ---------------------------------------------------------------------------------------------------------
# frozen behaviour, dtypes
# ---------------------------------------------------------------------------------------------------------
def test_frozen_eval_and_autocast(dinov2_s):
    enc = dinov2_s
    assert all(not p.requires_grad for p in enc.parameters())
    parent = nn.ModuleDict({"enc": enc, "lin": nn.Linear(2, 2)})
    parent.train()
    assert parent.training and not enc.training and not any(m.training for m in enc.modules())
    enc.train(True)
    assert not enc.training
    x = _images(2, 256, seed=17)
    out = enc(x)
    assert not out.requires_grad
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_bf16 = enc(x)
    assert out_bf16.dtype == torch.bfloat16 and out_bf16.shape == out.shape
    assert torch.nn.functional.cosine_similarity(out_bf16.float(), out, dim=-1).mean() > 0.98


def test_dtype_argument_casts_weights():
    torch.manual_seed(6)
    enc = load_encoder("dinov2-vit-s", pretrained=False, dtype=torch.bfloat16, model_kwargs={"depth": 1})
    assert all(p.dtype == torch.bfloat16 for p in enc.parameters())
    out = enc(_images(1, 256))
    assert out.dtype == torch.bfloat16 and out.shape == (1, 256, 384)


def test_describe_and_repr(dinov2_s):
    text = dinov2_s.describe()
    assert "dinov2-vit-s" in text and "random init" in text and "256px" in text and "256 tokens" in text
    assert repr(dinov2_s).startswith("Encoder(dinov2-vit-s")


# ---------------------------------------------------------------------------------------------------------
# token counts
# ---------------------------------------------------------------------------------------------------------
def test_check_token_count():
    check_token_count(256, 256, "dinov2-vit-b", resolution=256, sit_patch_size=2)
    with pytest.raises(ValueError) as ei:
        check_token_count(256, 1024, "dinov2-vit-b", resolution=256, sit_patch_size=1)
    msg = str(ei.value)
    assert "256" in msg and "1024" in msg and "224px" in msg and "patch 14" in msg and "patch 1" in msg
    assert "SiT patch size of 2" in msg
    with pytest.raises(ValueError, match="yields 256 patch tokens.*576"):
        check_token_count(256, 576, "my-encoder")


def test_import_timm_is_idempotent():
    t1 = import_timm()
    t2 = import_timm()
    assert t1 is t2 and hasattr(t1, "create_model")
