"""SiT family, Phase-1 model, weight transfer, attention backends, RoPE and input validation."""

import cmath
import math

import pytest
import torch

from erw_fast.models import (
    SIT_CONFIGS,
    SiT,
    available_attention_backends,
    build_sit,
    build_sit_phase1,
    parse_model_name,
    transfer_phase1_weights,
)
from erw_fast.models.rope import Rope2D

SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}


def analytic_param_count(size: str, patch: int, z_dims=(768,), projector_dim=2048, num_classes=1000,
                         input_size=32, channels=4) -> int:
    """Hand-counted parameters of the reference architecture (frozen pos_embed included)."""
    depth, d, _ = SIZES[size]
    tokens = (input_size // patch) ** 2
    patch_out = patch * patch * channels
    block = (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d) + (6 * d * d + 6 * d)
    embedders = (channels * patch * patch * d + d) + (256 * d + d + d * d + d) + (num_classes + 1) * d
    final = (2 * d * d + 2 * d) + (d * patch_out + patch_out)
    projectors = sum(d * projector_dim + projector_dim + projector_dim**2 + projector_dim
                     + projector_dim * z + z for z in z_dims)
    return depth * block + embedders + tokens * d + final + projectors


@pytest.mark.parametrize("name", SIT_CONFIGS)
def test_named_config_parameter_counts(name):
    size, patch = parse_model_name(name)
    with torch.device("meta"):
        model = build_sit(name)
    assert sum(p.numel() for p in model.state_dict().values()) == analytic_param_count(size, patch)
    depth, hidden, heads = SIZES[size]
    assert (len(model.blocks), model.hidden_size, model.num_heads, model.patch_size) == (depth, hidden, heads, patch)


def test_sit_s2_runs_and_predicts_latent_shape():
    """The reference builds S/2's final layer at width 768 and crashes; ours works."""
    model = build_sit("SiT-S/2", input_size=8, encoder_depth=4).eval()
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        v, zs = model(x, torch.rand(2), torch.tensor([1, 1000]))
    assert v.shape == x.shape and zs[0].shape == (2, 16, 768)


def tiny(**overrides) -> dict:
    config = dict(input_size=8, patch_size=2, hidden_size=64, depth=6, num_heads=4, num_classes=10,
                  z_dims=[32, 48], projector_dim=96, encoder_depth=3)
    config.update(overrides)
    return config


@pytest.mark.slow
def test_phase1_model_allocates_only_early_layers():
    phase1 = build_sit_phase1("SiT-XL/2", warmup_depth=4, input_size=8, num_classes=10)
    keys = phase1.state_dict().keys()
    assert len(phase1.blocks) == 4
    assert not any(k.startswith(("blocks.4.", "final_layer")) for k in keys)
    assert not hasattr(phase1, "final_layer")
    full = build_sit("SiT-XL/2", input_size=8, num_classes=10)
    assert set(keys) < set(full.state_dict().keys())


@pytest.mark.parametrize("use_rope", [False, True])
def test_transfer_reproduces_phase1_hidden_state(use_rope):
    torch.manual_seed(0)
    warmup_depth = 2
    phase1 = build_sit_phase1("SiT-S/2", warmup_depth, **tiny(use_rope=use_rope, encoder_depth=None)).eval()
    with torch.no_grad():  # make every weight non-trivial (adaLN-Zero init is the identity)
        for p in phase1.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    full = SiT(**tiny(use_rope=use_rope)).eval()
    report = transfer_phase1_weights(phase1, full)
    assert "blocks.1.attn.qkv.weight" in report.copied and "projectors.0.0.weight" in report.copied
    assert "blocks.2.attn.qkv.weight" in report.fresh and "final_layer.linear.weight" in report.fresh
    assert set(report.copied) | set(report.fresh) == set(full.state_dict())

    x, y = torch.randn(3, 4, 8, 8), torch.tensor([0, 3, 9])
    t0 = torch.zeros(3)
    with torch.no_grad():
        expected = phase1.hidden_after(x, t0, y)
        got = full.hidden_after(x, t0, y, depth=warmup_depth)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        zs_phase1 = phase1(x, t0, y)
        zs_full = full.project(got)
    for a, b in zip(zs_phase1, zs_full, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_transfer_can_keep_a_fresh_projector():
    phase1 = build_sit_phase1("SiT-S/2", 2, **tiny(encoder_depth=None))
    full = SiT(**tiny())
    before = full.projectors[0][0].weight.clone()
    report = transfer_phase1_weights(phase1.state_dict(), full, include_projectors=False)
    torch.testing.assert_close(full.projectors[0][0].weight, before)
    assert all(k.startswith("projectors.") for k in report.skipped) and report.skipped
    assert "projectors.0.0.weight" in report.fresh


def test_transfer_shape_mismatch_is_a_clear_error():
    phase1 = build_sit_phase1("SiT-S/2", 2, **tiny(encoder_depth=None, z_dims=[32, 64]))
    full = SiT(**tiny())
    expected = r"projectors\.1\.4\.weight: Phase-1 shape \(64, 96\) vs full-model \(48, 96\)"
    with pytest.raises(ValueError, match=expected):
        transfer_phase1_weights(phase1, full)


@pytest.mark.parametrize(
    "builder, message",
    [
        (lambda: build_sit("SiT-XXL/2"), "unknown model 'SiT-XXL/2'"),
        (lambda: build_sit("SiT-B/3"), "unknown model 'SiT-B/3'"),
        (lambda: SiT(**tiny(encoder_depth=7)), "encoder_depth must be in \\[1, depth=6\\]"),
        (lambda: SiT(**tiny(encoder_depth=0)), "encoder_depth must be in"),
        (lambda: build_sit_phase1("SiT-S/2", 7, **tiny(encoder_depth=None)), r"warmup depth L must be in \[1, depth=6"),
        (lambda: build_sit_phase1("SiT-S/2", 2, **tiny(encoder_depth=3)), "encoder_depth=3 must equal"),
        (lambda: SiT(**tiny(hidden_size=66)), "not divisible by num_heads"),
        (lambda: SiT(**tiny(decoder_hidden_size=768)), "decoder_hidden_size=768 differs"),
        (lambda: SiT(**tiny(input_size=9)), "input_size 9 is not divisible by patch_size 2"),
        (lambda: SiT(**tiny(), not_a_kwarg=1), "not_a_kwarg"),
        (lambda: SiT(**tiny(attn_backend="cudnn")), "unknown attention backend 'cudnn'"),
    ],
)
def test_bad_inputs_raise_clear_errors(builder, message):
    with pytest.raises((ValueError, TypeError, RuntimeError), match=message):
        builder()


@pytest.mark.parametrize("backend", ["flash_attn", "xformers"])
def test_missing_attention_backend_is_a_clear_error(backend):
    if available_attention_backends()[backend]:
        pytest.skip(f"{backend} is installed here")
    with pytest.raises(RuntimeError, match=f"attention backend '{backend}' was requested but is not available"):
        SiT(**tiny(attn_backend=backend))


def test_reference_keywords_are_accepted():
    model = SiT(**tiny(), path_type="linear", use_cfg=True, fused_attn=True, decoder_hidden_size=64)
    assert model.attention_backend == "sdpa"


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("qk_norm, use_rope", [(False, False), (True, True)])
def test_sdpa_and_math_backends_agree(dtype, tol, qk_norm, use_rope):
    torch.manual_seed(1)
    model = SiT(**tiny(qk_norm=qk_norm, use_rope=use_rope)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    model = model.to(dtype)
    x, t, y = torch.randn(2, 4, 8, 8, dtype=dtype), torch.rand(2, dtype=dtype), torch.tensor([1, 10])
    outputs = {}
    for backend in ("sdpa", "math"):
        model.set_attention_backend(backend)
        with torch.no_grad():
            outputs[backend] = model(x, t, y)
    v_sdpa, v_math = outputs["sdpa"][0].float(), outputs["math"][0].float()
    assert ((v_sdpa - v_math).abs().max() / v_math.abs().max()).item() < tol


def test_qk_norm_adds_reference_keys():
    keys = SiT(**tiny(qk_norm=True)).state_dict().keys()
    assert {"blocks.0.attn.q_norm.weight", "blocks.0.attn.k_norm.bias"} <= set(keys)


def test_rope_matches_complex_rotation_and_is_relative():
    """Independent reference: each adjacent pair (x0, x1) is the complex number x0 + i·x1 multiplied by
    e^{i·pos·θ^(−2j/d_half)}, rows on the first half of the head, columns on the second."""
    head_dim, grid = 8, 3
    rope = Rope2D(head_dim, grid)
    x = torch.randn(1, 1, grid * grid, head_dim, dtype=torch.float64)
    got = rope.to(torch.float64)(x)
    half = head_dim // 2
    for token in range(grid * grid):
        row, col = divmod(token, grid)
        for j in range(head_dim // 2):
            axis_pos = row if j < half // 2 else col
            freq_index = j % (half // 2)
            angle = axis_pos * 10000.0 ** (-(2 * freq_index) / half)
            z = complex(x[0, 0, token, 2 * j], x[0, 0, token, 2 * j + 1]) * cmath.exp(1j * angle)
            assert math.isclose(got[0, 0, token, 2 * j].item(), z.real, abs_tol=1e-6)
            assert math.isclose(got[0, 0, token, 2 * j + 1].item(), z.imag, abs_tol=1e-6)
    # q·k after RoPE depends only on the offset between the two tokens.
    q, k = torch.randn(head_dim, dtype=torch.float64), torch.randn(head_dim, dtype=torch.float64)
    def score(tq: int, tk: int) -> float:
        qs = q.expand(1, 1, grid * grid, head_dim)
        ks = k.expand(1, 1, grid * grid, head_dim)
        return (rope(qs)[0, 0, tq] @ rope(ks)[0, 0, tk]).item()
    # The angle table is built in fp32, hence the tolerance.
    assert math.isclose(score(0, 4), score(4, 8), rel_tol=1e-6)  # both offsets (+1, +1)


def test_label_dropout_uses_null_class_only_in_training():
    model = SiT(**tiny(class_dropout_prob=1.0))
    y = torch.tensor([1, 2])
    emb_null = model.y_embedder.embedding_table.weight[10]
    model.train()
    torch.testing.assert_close(model.y_embedder(y, train=True), emb_null.expand(2, -1))
    model.eval()
    torch.testing.assert_close(model.y_embedder(y, train=False), model.y_embedder.embedding_table.weight[[1, 2]])
