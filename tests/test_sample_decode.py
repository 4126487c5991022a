"""erw-sample decodes with the VAE and latent scale the training latents were made with, and a finished run is
not redrawn. A tiny SiT export (no training) and a randomly initialised local diffusers VAE (no downloads)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from erw_fast.cli import sample
from erw_fast.codecs import SD_VAE_SCALE, choose_codec, latent_source, resolve_codec_name
from erw_fast.config import load_config
from erw_fast.data.shards import Manifest
from erw_fast.models import SiT
from erw_fast.sampling import euler_sampler

REPO = Path(__file__).resolve().parents[1]
ARCH = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=4,
            z_dims=[], class_dropout_prob=0.1, encoder_depth=1)


def _manifest(root: Path, vae: str, scale: float) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    Manifest(num_samples=0, num_classes=4, classes=list("abcd"), image_size=16, image_format="png",
             members=["cls", "moments.npy", "png"], samples_per_shard=8, moments_shape=[8, 8, 8],
             vae={"name": vae, "scaling_factor": scale, "latent_channels": 4, "latent_size": 8, "dtype": "float16"},
             flip_moments=False, shards=[]).save(root)
    return root


def _config(data_path: Path):
    return load_config(REPO / "configs" / "demo.yaml", ["data.kind=webdataset", f"data.path={data_path}"])


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    from erw_fast.data.vae import import_autoencoder_kl

    torch.manual_seed(0)
    vae = import_autoencoder_kl()(
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=4, norm_num_groups=4, sample_size=16,
    ).eval()
    path = tmp_path_factory.mktemp("vae") / "tiny-vae"
    vae.save_pretrained(path)
    return vae, path


def test_auto_follows_the_manifest_vae_and_scale(tmp_path):
    # SD family (one encoder, two decoders): auto → ema, REPA's decoder; the scale is the manifest's.
    choice = choose_codec("auto", _config(_manifest(tmp_path / "sd", "stabilityai/sd-vae-ft-mse", 0.18215)))
    assert (choice.name, choice.scale) == ("ema", 0.18215)
    # Another VAE: auto → that VAE, with its recorded scale; an explicit --vae keeps the recorded scale.
    other = _config(_manifest(tmp_path / "xl", "madebyollin/sdxl-vae-fp16-fix", 0.13025))
    assert (choose_codec("auto", other).name, choose_codec("auto", other).scale) == ("madebyollin/sdxl-vae-fp16-fix",
                                                                                       0.13025)
    assert choose_codec("mse", other).scale == 0.13025 and "0.13025" in choose_codec("mse", other).note
    # The export's args come first; nothing recorded → REPA's constant; demo runs → the toy codec.
    args = {"latent_vae": str(tmp_path), "latent_scale": 0.3}
    assert (choose_codec("auto", other, args).name, choose_codec("auto", other, args).scale) == (str(tmp_path), 0.3)
    assert choose_codec("ema").scale == SD_VAE_SCALE and "no scale recorded" in choose_codec("ema").note
    assert latent_source(_config(tmp_path / "missing")).scale is None
    # A local VAE path recorded by erw-prepare on another machine: said, not silently replaced by another VAE.
    gone = _config(_manifest(tmp_path / "local", "/prep-node/vae", 0.2))
    with pytest.raises(ValueError, match="made with the VAE /prep-node/vae .*local/manifest.json"):
        choose_codec("auto", gone)
    assert choose_codec("mse", gone).scale == 0.2
    assert resolve_codec_name("auto", "demo", None) == "toy"


def _export(tmp_path: Path, args: dict) -> tuple[Path, SiT]:
    torch.manual_seed(1)
    model = SiT(**ARCH).eval()
    sd = model.state_dict()
    ckpt = tmp_path / "run" / "reference" / "0000001.pt"
    ckpt.parent.mkdir(parents=True)
    arch_args = {k: v for k, v in ARCH.items() if k != "z_dims"}
    torch.save({"model": sd, "ema": sd, "args": {"model": None, **arch_args, **args}, "steps": 1}, ckpt)
    return ckpt, model


@pytest.mark.slow
def test_sample_decodes_with_the_recorded_scale_and_a_rerun_is_a_noop(tiny_vae, tmp_path, capsys, monkeypatch):
    vae, vae_path = tiny_vae
    scale = 0.5  # not 0.18215: a rerun decoding with the SD constant would differ
    ckpt, model = _export(tmp_path, {"latent_vae": str(vae_path), "latent_scale": scale})
    out = tmp_path / "out"
    argv = ["--ckpt", str(ckpt), "--out-dir", str(out), "--num-samples", "3", "--batch-size", "3",
            "--num-steps", "2", "--seed", "5"]
    assert sample.main(argv) == 0
    assert "latent scale 0.5, recorded in the checkpoint's args" in capsys.readouterr().err
    protocol = json.loads((out / "protocol.json").read_text())
    assert protocol["vae"]["spec"] == str(vae_path) and protocol["vae"]["latent_scale"] == scale

    g = torch.Generator().manual_seed(5)  # replay: noise, then labels, from the rank's generator
    z = torch.randn(3, 4, 8, 8, generator=g)
    y = torch.randint(0, 4, (3,), generator=g)
    with torch.no_grad():
        x = vae.decode(euler_sampler(model, z, y, 2).float() / scale).sample
    expected = torch.clamp(255.0 * (x + 1) / 2, 0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    with np.load(out / "samples.npz") as f:
        assert np.array_equal(f["arr_0"], expected)

    # A rerun draws nothing and keeps the files; other settings are refused; --overwrite draws again.
    import erw_fast.sampling as sampling

    calls = []
    monkeypatch.setattr(sampling, "euler_sampler", lambda *a, **k: calls.append(1) or euler_sampler(*a, **k))
    before = (out / "samples.npz").stat().st_mtime_ns
    assert sample.main(argv) == 0
    assert "already complete" in capsys.readouterr().err and not calls
    assert (out / "samples.npz").stat().st_mtime_ns == before
    assert sample.main([*argv, "--seed", "6"]) == 2
    assert "'seed': 5} there, {'seed': 6} now" in capsys.readouterr().err
    assert sample.main([*argv, "--overwrite"]) == 0 and calls


def test_the_manifest_names_a_local_vae_by_its_absolute_path(tmp_path, monkeypatch):
    """erw-prepare run with --vae ./vae: a sampler started from another directory must still find that VAE."""
    from types import SimpleNamespace

    from erw_fast.data.vae import vae_info

    (tmp_path / "vae").mkdir()
    monkeypatch.chdir(tmp_path)
    vae = SimpleNamespace(config=SimpleNamespace(scaling_factor=0.13025, latent_channels=4))
    assert vae_info(vae, "./vae")["name"] == str(tmp_path / "vae")
    assert vae_info(vae, "stabilityai/sd-vae-ft-ema")["name"] == "stabilityai/sd-vae-ft-ema"  # a hub name as given
