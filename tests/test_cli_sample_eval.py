"""erw-sample → erw-eval and erw-analyze end to end on a tiny demo checkpoint trained here (CPU, seconds)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _trainer_helpers import short_demo_run

from erw_fast.cli import analyze, evaluate, sample
from erw_fast.data import DemoShapesDataset
from erw_fast.data.demo import toy_decode
from erw_fast.evaluation import build_fid_inception
from erw_fast.sampling import euler_sampler

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow  # every test uses demo_run, a training run


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    config = short_demo_run(tmp_path_factory.mktemp("runs"))
    ckpt = config.run_dir / "reference" / "0000006.pt"
    assert ckpt.is_file()
    return config, ckpt


def _sample_args(ckpt, out_dir, *extra):
    return ["--ckpt", str(ckpt), "--out-dir", str(out_dir), "--num-samples", "16", "--batch-size", "6",
            "--num-steps", "4", "--vae", "toy", "--seed", "3", *extra]


def test_sample_then_evaluate_end_to_end(demo_run, tmp_path, capsys):
    config, ckpt = demo_run
    out_dir = tmp_path / "samples"
    assert sample.main(_sample_args(ckpt, out_dir, "--png", "--cfg-scale", "1.5", "--guidance-high", "0.7")) == 0
    with np.load(out_dir / "samples.npz") as f:
        images, labels = f["arr_0"], f["arr_1"]
    assert images.shape == (16, 64, 64, 3) and images.dtype == np.uint8  # the first N of 3 batches of 6
    assert labels.shape == (16,) and labels.min() >= 0 and labels.max() < 8
    assert sorted(p.name for p in (out_dir / "png").iterdir()) == [f"{i:06d}.png" for i in range(16)]

    protocol = json.loads((out_dir / "protocol.json").read_text())
    assert protocol["checkpoint"] == str(ckpt.resolve()) and protocol["checkpoint_step"] == 6
    assert protocol["weights"] == "ema" and protocol["num_samples"] == 16 and protocol["seed"] == 3
    assert protocol["sampler"] == {"mode": "ode", "num_steps": 4, "heun": False, "cfg_scale": 1.5,
                                   "guidance_low": 0.0, "guidance_high": 0.7, "path_type": "linear"}
    assert protocol["comparable"] and protocol["labels"] == "uniform random" and protocol["vae"]["spec"] == "toy"
    assert protocol["model"]["depth"] == 6 and protocol["model"]["hidden_size"] == 128
    assert protocol["precision"] == "fp32" and "torch" in protocol["versions"]

    # Independent replay of sample 0: the run's EMA model, the same seed stream (noise, then labels).
    model = sample_model(config, ckpt)
    g = torch.Generator().manual_seed(3)
    z = torch.randn(6, 4, 8, 8, generator=g)
    y = torch.randint(0, 8, (6,), generator=g)
    replay = toy_decode(euler_sampler(model, z, y, 4, cfg_scale=1.5, guidance_high=0.7).float(), 64)
    assert np.array_equal(images[:6], replay.permute(0, 2, 3, 1).numpy())
    assert np.array_equal(labels[:6], y.numpy())

    # Reference batch from held-out demo images, statistics from the same random Inception as --random-inception 0.
    ref_images = DemoShapesDataset(num_samples=16, num_classes=8, seed=11).images.permute(0, 2, 3, 1).numpy()
    extractor = build_fid_inception(pretrained=False, seed=0)
    feats = extractor(torch.from_numpy(ref_images).permute(0, 3, 1, 2))
    pool, spatial = feats.pool.double().numpy(), feats.spatial.double().numpy()
    np.savez(tmp_path / "ref.npz", arr_0=ref_images, mu=pool.mean(0), sigma=np.cov(pool, rowvar=False),
             mu_s=spatial.mean(0), sigma_s=np.cov(spatial, rowvar=False))

    capsys.readouterr()
    assert evaluate.main([str(out_dir / "samples.npz"), "--ref", str(tmp_path / "ref.npz"),
                          "--random-inception", "0", "--batch-size", "8"]) == 0
    assert "FID" in capsys.readouterr().out
    results = json.loads((out_dir / "samples.eval.json").read_text())
    assert results["protocol"] == protocol  # the sampling protocol travels with the numbers
    assert results["num_samples"] == 16 and results["num_reference"] == 16
    assert results["fid"] > 0 and results["sfid"] > 0 and results["inception_score"] >= 1.0
    assert 0.0 <= results["precision"] <= 1.0 and 0.0 <= results["recall"] <= 1.0
    assert results["inception"]["comparable"] is False



def sample_model(config, ckpt):
    from erw_fast.cli.loading import load_sit_checkpoint

    loaded = load_sit_checkpoint(ckpt)
    ema = torch.load(ckpt, weights_only=True)["ema"]
    for key, value in loaded.model.state_dict().items():  # the EMA weights, not the raw ones
        assert torch.equal(value, ema[key])
    return loaded.model


def test_trainer_checkpoint_sde_raw_balanced_labels_are_flagged(demo_run, tmp_path):
    config, _ = demo_run
    ckpt = config.run_dir / "checkpoints" / "step_0000006.pt"  # the trainer's own layout; --vae auto → toy
    out_dir = tmp_path / "sde"
    args = [a for a in _sample_args(ckpt, out_dir, "--mode", "sde", "--raw", "--balanced-labels") if a != "toy"]
    args.remove("--vae")
    assert sample.main(args) == 0
    protocol = json.loads((out_dir / "protocol.json").read_text())
    assert protocol["weights"] == "raw" and protocol["sampler"]["mode"] == "sde"
    assert protocol["checkpoint_step"] == 6 and protocol["vae"]["spec"] == "toy"
    assert protocol["comparable"] is False and "balanced" in protocol["labels"]
    with np.load(out_dir / "samples.npz") as f:
        assert np.array_equal(f["arr_1"], np.arange(16) % 8)


class Preempted(Exception):
    pass


def test_an_interrupted_sampling_run_resumes_to_the_same_samples(demo_run, tmp_path, monkeypatch, capsys):
    # SDE with uniform labels: every batch draws noise and labels from the rank's generator, so the resumed run
    # only matches if the generator state of the last finished batch comes back.
    import erw_fast.sampling as sampling

    _, ckpt = demo_run
    args = ["--mode", "sde", "--vae", "toy"]
    assert sample.main(_sample_args(ckpt, tmp_path / "whole", *args)) == 0
    real, calls = sampling.euler_maruyama_sampler, []

    def preempted_in_batch_2(*a, **kw):
        calls.append(len(calls))
        if len(calls) == 2:
            raise Preempted()
        return real(*a, **kw)

    with monkeypatch.context() as patch:
        patch.setattr(sampling, "euler_maruyama_sampler", preempted_in_batch_2)
        with pytest.raises(Preempted):
            sample.main(_sample_args(ckpt, tmp_path / "cut", *args))
    assert sample.main(_sample_args(ckpt, tmp_path / "cut", *args, "--num-steps", "5")) == 2  # other settings
    assert "'num_steps': 4} there, {'num_steps': 5} now" in capsys.readouterr().err
    with monkeypatch.context() as patch:
        patch.setattr(sampling, "euler_maruyama_sampler", lambda *a, **kw: calls.append(-1) or real(*a, **kw))
        assert sample.main(_sample_args(ckpt, tmp_path / "cut", *args)) == 0
    assert calls == [0, 1, -1, -1]  # batches 2 and 3 of 3 were drawn again, batch 1 was not
    assert "resuming at batch 2/3" in capsys.readouterr().err
    with np.load(tmp_path / "whole" / "samples.npz") as a, np.load(tmp_path / "cut" / "samples.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])
    assert not (tmp_path / "cut" / ".parts").exists()


def test_bad_inputs_give_clear_errors(demo_run, tmp_path, capsys):
    config, ckpt = demo_run
    assert sample.main(_sample_args(tmp_path / "missing.pt", tmp_path / "o")) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert sample.main([*_sample_args(ckpt, tmp_path / "o"), "--num-samples", "0"]) == 2
    assert "--num-samples must be positive" in capsys.readouterr().err
    assert sample.main([*_sample_args(ckpt, tmp_path / "o"), "--mode", "ddim"]) == 2
    assert "invalid choice: 'ddim'" in capsys.readouterr().err
    phase1 = config.run_dir / "checkpoints" / "phase1_0000002.pt"
    assert sample.main(_sample_args(phase1, tmp_path / "o")) == 2
    assert "Phase-1" in capsys.readouterr().err
    assert evaluate.main([str(tmp_path / "none.npz"), "--ref", str(tmp_path / "none.npz")]) == 2
    assert "batch file not found" in capsys.readouterr().err
    assert not (tmp_path / "o" / "samples.npz").exists()


def test_checkpoint_without_run_config_needs_the_architecture(demo_run, tmp_path):
    from erw_fast.cli.loading import load_sit_checkpoint

    config, ckpt = demo_run
    lone = tmp_path / "elsewhere" / "reference" / ckpt.name  # no config.yaml two levels up
    lone.parent.mkdir(parents=True)
    shutil.copy(ckpt, lone)
    # The export records the architecture: it alone rebuilds the demo's 128-wide, 4-head model.
    assert load_sit_checkpoint(lone).kwargs["num_heads"] == 4
    # An export that names only the model (written before exports recorded the architecture): args say SiT-S/2
    # (6 heads), but this model is 128 wide with 4 heads: refuse instead of guessing.
    state = torch.load(lone, weights_only=True)
    state["args"] = {"model": state["args"]["model"], "encoder_depth": state["args"]["encoder_depth"]}
    torch.save(state, lone)
    with pytest.raises(ValueError, match="--config"):
        load_sit_checkpoint(lone)
    loaded = load_sit_checkpoint(lone, config_path=config.run_dir / "config.yaml", ema=False)
    assert loaded.kwargs["num_heads"] == 4 and loaded.weights == "raw" and loaded.step == 6
    raw = torch.load(ckpt, weights_only=True)["model"]
    assert all(torch.equal(v, raw[k]) for k, v in loaded.model.state_dict().items())


def test_analyze_writes_per_layer_cknna_and_chart(demo_run, tmp_path):
    _, ckpt = demo_run
    out_dir = tmp_path / "analysis"
    assert analyze.main(["--ckpt", str(ckpt), "--out-dir", str(out_dir), "--num-samples", "48", "--t", "0.0", "0.5",
                         "--raw"]) == 0
    results = json.loads((out_dir / "cknna.json").read_text())
    assert results["depths"] == [1, 2, 3, 4, 5, 6] and results["topk"] == 10 and results["weights"] == "raw"
    scores = results["cknna"]["demo-vit-t"]
    assert set(scores) == {"0.0", "0.5"}
    assert all(len(v) == 6 and all(-1.0 <= s <= 1.0 for s in v) for v in scores.values())
    assert (out_dir / "cknna.png").stat().st_size > 1000

    # Held-out images from an ADM-style npz without labels: encoded with the toy codec, probed unconditionally.
    images = DemoShapesDataset(num_samples=24, num_classes=8, seed=12).images.permute(0, 2, 3, 1).numpy()
    np.savez(tmp_path / "held_out.npz", arr_0=images)
    assert analyze.main(["--ckpt", str(ckpt), "--out-dir", str(tmp_path / "npz"), "--images",
                         str(tmp_path / "held_out.npz"), "--t", "0.5", "--topk", "5"]) == 0
    results = json.loads((tmp_path / "npz" / "cknna.json").read_text())
    assert results["num_samples"] == 24 and len(results["cknna"]["demo-vit-t"]["0.5"]) == 6


@pytest.mark.skipif(sys.platform == "win32", reason="torchrun with gloo")
@pytest.mark.multiprocess
def test_torchrun_two_ranks_interleave_per_rank_seeds(demo_run, tmp_path):
    # Rank r seeds seed·W + r and owns global samples r, r + W, …; so with W = 2 and seed 0, the odd samples are
    # exactly what one process draws with seed 1 and the even ones what it draws with seed 0.
    _, ckpt = demo_run
    common = ["--ckpt", str(ckpt), "--num-samples", "8", "--batch-size", "4", "--num-steps", "2", "--vae", "toy"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "erw_fast.cli.sample", *common, "--out-dir", str(tmp_path / "ddp"), "--seed", "0", "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for seed in (0, 1):
        assert sample.main([*common, "--out-dir", str(tmp_path / f"single{seed}"), "--seed", str(seed)]) == 0
    with np.load(tmp_path / "ddp" / "samples.npz") as f:
        ddp = f["arr_0"]
    for seed in (0, 1):
        with np.load(tmp_path / f"single{seed}" / "samples.npz") as f:
            assert np.array_equal(ddp[seed::2], f["arr_0"][:4])
    protocol = json.loads((tmp_path / "ddp" / "protocol.json").read_text())
    assert protocol["world_size"] == 2 and not (tmp_path / "ddp" / ".parts").exists()


def test_sd_vae_codec_decodes_like_repa_generate(demo_run, tmp_path):
    # A randomly initialised diffusers AutoencoderKL saved locally stands in for sd-vae-ft-ema (no downloads here).
    from erw_fast.codecs import build_codec
    from erw_fast.data.vae import import_autoencoder_kl

    autoencoder_kl = import_autoencoder_kl()
    torch.manual_seed(0)
    vae = autoencoder_kl(
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=4, norm_num_groups=4, sample_size=16,
    ).eval()
    vae.save_pretrained(tmp_path / "vae")
    codec = build_codec(str(tmp_path / "vae"), image_size=16, latent_size=8)
    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        x = vae.decode(z / 0.18215).sample  # REPA: vae.decode(z / 0.18215), then (x + 1)/2 · 255, clamped, uint8
        expected = torch.clamp(255.0 * (x + 1) / 2, 0, 255).to(torch.uint8)
        images = codec.decode(z)
        assert torch.equal(images, expected)
        posterior = vae.encode(images.float() / 127.5 - 1).latent_dist.mean
    torch.testing.assert_close(codec.encode(images), 0.18215 * posterior)

    _, ckpt = demo_run
    args = [a for a in _sample_args(ckpt, tmp_path / "out") if a != "toy"]
    args[args.index("--vae") + 1 : args.index("--vae") + 1] = [str(tmp_path / "vae")]
    assert sample.main(args) == 0
    with np.load(tmp_path / "out" / "samples.npz") as f:
        assert f["arr_0"].shape == (16, 16, 16, 3)  # 8×8 latents, ×2 upsampling in this tiny VAE
    protocol = json.loads((tmp_path / "out" / "protocol.json").read_text())
    assert protocol["vae"]["spec"] == str(tmp_path / "vae")
