"""Start-up log noise: the loader's worker count (resolved from the usable cores, said once), diffusers' accelerate
and dtype notices on a VAE load, and torch's deprecation FutureWarnings for the collectives DeepSpeed calls."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.distributed as dist

from erw_fast.data.loaders import resolve_num_workers, usable_cores


def test_num_workers_default_is_min_4_and_this_ranks_share_of_the_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(12)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert usable_cores() == 12
    assert resolve_num_workers(None) == (4, "4 loader workers (min(4, 12 usable cores / 1 rank(s) on this node))")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert resolve_num_workers(None)[0] == 1  # 12 cores // 8 ranks
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert resolve_num_workers(None)[0] == 2
    assert resolve_num_workers(6) == (6, "6 loader workers (data.num_workers, more than the 2 usable cores)")
    assert resolve_num_workers(None, loader_threads=3)[0] == 0  # threads in the training process instead


def test_the_dataloader_core_count_warning_is_left_to_the_data_line():
    from torch.utils.data import DataLoader

    from erw_fast.data.wds_loader import quiet_worker_count_warning  # applied when the module is imported

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        DataLoader(range(4), num_workers=usable_cores() + 3).check_worker_number_rationality()
        assert len(caught) == 2  # torch's own: the same warning twice per start
        quiet_worker_count_warning()
        DataLoader(range(4), num_workers=usable_cores() + 3).check_worker_number_rationality()
        warnings.warn("another UserWarning", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught[2:]] == ["another UserWarning"]


@pytest.mark.slow  # the diffusers import
def test_vae_load_prints_no_accelerate_or_cast_notice(tmp_path, capfd):
    from erw_fast.data.vae import import_autoencoder_kl, load_vae

    torch.manual_seed(0)
    import_autoencoder_kl()(down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                            block_out_channels=(8,), layers_per_block=1, latent_channels=4,
                            norm_num_groups=4).save_pretrained(tmp_path / "vae")
    capfd.readouterr()
    vae = load_vae(str(tmp_path / "vae"))
    err = capfd.readouterr().err
    assert "accelerate" not in err and "Casting directly" not in err, err
    assert next(vae.parameters()).dtype == torch.float32 and not vae.training


def test_deepspeeds_deprecated_collectives_warn_no_more(tmp_path):
    from erw_fast.engines.deepspeed_engine import quiet_deprecated_collectives

    if dist.is_initialized():
        pytest.skip("a process group is already up in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # everything shows ...
            quiet_deprecated_collectives()  # ... but what the engine module silences when it is imported
            out = torch.empty(4)
            dist.all_gather_into_tensor(out, torch.ones(4))
            warnings.warn("another FutureWarning", FutureWarning, stacklevel=1)  # not silenced: the filter is narrow
        assert torch.equal(out, torch.ones(4))
        messages = [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]
        assert messages == ["another FutureWarning"], messages
    finally:
        dist.destroy_process_group()
