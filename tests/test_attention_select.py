"""Attention backend chosen by measurement: every available backend is timed at the run's shape, checked
against the explicit math attention, and the fastest correct one is used."""

import pytest
import torch
from _trainer_helpers import tiny_config

import erw_fast.models.attention as attention
from erw_fast.models import SiT
from erw_fast.models.attention_select import choose_attention_backend, measure_attention_backends, timing_table
from erw_fast.trainer import Trainer


def test_measures_every_available_backend_and_picks_the_fastest():
    timings = measure_attention_backends(2, 2, 16, 8, torch.float32, torch.device("cpu"), repeats=3, warmup=1,
                                         candidates=["sdpa", "math", "sdpa_cudnn"])
    by_name = {t.backend: t for t in timings}
    assert by_name["math"].max_abs_error == 0.0 and by_name["sdpa"].max_abs_error < 1e-5
    assert all(by_name[n].seconds > 0 for n in ("sdpa", "math"))
    if not torch.cuda.is_available():
        assert by_name["sdpa_cudnn"].seconds is None and by_name["sdpa_cudnn"].note == "not available here"
    chosen = choose_attention_backend(timings)
    assert by_name[chosen].seconds == min(t.seconds for t in timings if t.seconds is not None)
    assert "← chosen" in timing_table(timings, chosen).splitlines()[2 + list(by_name).index(chosen)]


def test_a_backend_that_disagrees_with_math_is_never_chosen(monkeypatch):
    monkeypatch.setitem(attention._KERNELS, "sdpa", lambda q, k, v: v)  # fast and wrong
    timings = measure_attention_backends(2, 2, 16, 8, torch.float32, torch.device("cpu"), repeats=2, warmup=0,
                                         candidates=["sdpa", "math"])
    wrong = next(t for t in timings if t.backend == "sdpa")
    assert wrong.seconds is None and wrong.note.startswith("disagrees with math") and wrong.max_abs_error > 1e-2
    assert choose_attention_backend(timings) == "math"
    with pytest.raises(RuntimeError, match="no attention backend ran correctly: sdpa: disagrees"):
        choose_attention_backend([wrong])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error")
def test_pinned_sdpa_kernels_need_cuda():
    with pytest.raises(RuntimeError, match="'sdpa_flash' was requested but is not available here \\(needs CUDA\\)"):
        SiT(input_size=8, patch_size=2, hidden_size=32, depth=1, num_heads=2, num_classes=4, encoder_depth=1,
            attn_backend="sdpa_flash")


@pytest.mark.slow
def test_trainer_resolves_measure_before_building_models(tmp_path, capsys):
    config = tiny_config(tmp_path, "measure", "model.attn_backend=measure", "train.total_steps=7")
    trainer = Trainer(config)
    trainer.run()
    out = capsys.readouterr().out
    assert "attention measured at batch 8 × 2 heads × 16 tokens × head dim 16, torch.float32" in out
    assert trainer.attn_backend in ("sdpa", "math") and trainer.model.attention_backend == trainer.attn_backend
