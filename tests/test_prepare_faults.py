"""erw-prepare on the inputs and events of a cluster: unreadable images in an ImageNet-style folder (left out and
recorded, or all listed up front), a VAE that cannot be had (nothing pinned), a plan no shard was finished under
(replaced), and a stop signal to the process group (its image workers ignore it; the rank stops between batches,
exits 128 + signal, and the rerun finishes the dataset)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from _shard_helpers import make_loader, tiny_vae
from PIL import Image

from erw_fast.cli.prepare import main as prepare_main
from erw_fast.data.prepare import PLAN_NAME, PrepareOptions, prepare, scan_image_folder
from erw_fast.data.shards import DataError, Manifest
from erw_fast.data.vae import import_autoencoder_kl

REPO = Path(__file__).resolve().parents[1]


def _folder(root: Path, per_class: int, size: int = 40, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for cls in ("a", "b", "c"):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size + 7, 3), dtype=np.uint8)).save(root / cls / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("vae")
    tiny_vae(import_autoencoder_kl()).save_pretrained(path)
    return path


def _args(src, out, vae_dir, *extra):
    return [str(src), str(out), "--vae", str(vae_dir), "--image-size", "32", "--samples-per-shard", "4",
            "--batch-size", "2", "--num-workers", "0", "--no-progress", *extra]


@pytest.mark.slow
def test_unreadable_images_are_skipped_and_recorded_or_listed_up_front(tmp_path, vae_dir, capsys):
    src = _folder(tmp_path / "src", per_class=4)
    (src / "b" / "001.png").write_bytes(b"")  # zero bytes: sample 5, in shard 1
    good = (src / "c" / "002.png").read_bytes()
    (src / "c" / "002.png").write_bytes(good[: len(good) // 2])  # truncated: sample 10, in shard 2
    out = tmp_path / "out"

    assert prepare_main(_args(src, out, vae_dir)) == 1  # stops at the first, naming it and the option
    err = capsys.readouterr().err
    assert "b/001.png" in err and "--on-error skip" in err
    assert sorted(p.name for p in (out / "shards").glob("*.json")) == ["shard-000000.json"]
    kept = (out / "shards" / "shard-000000.tar").stat().st_mtime_ns

    assert prepare_main(_args(src, out, vae_dir, "--on-error", "skip")) == 0  # the same plan: shard 0 is kept
    assert (out / "shards" / "shard-000000.tar").stat().st_mtime_ns == kept
    man = Manifest.load(out)
    assert man.num_samples == 12 and [(s["index"], s["path"]) for s in man.skipped] == [(5, "b/001.png"),
                                                                                         (10, "c/002.png")]
    loader = make_loader("webdataset", out, global_batch_size=12, seed=0, image_size=32, num_workers=0,
                         latent_size=4, latent_channels=4)
    drawn = {int(i) for _ in range(3) for i in next(loader)["indices"]}
    loader.close()
    assert drawn == set(range(12)) - {5, 10} and loader.skipped == 0  # never drawn, not counted as errors

    fresh = tmp_path / "checked"
    assert prepare_main(_args(src, fresh, vae_dir, "--check-images")) == 1
    err = capsys.readouterr().err
    assert "2 unreadable image(s)" in err and "b/001.png" in err and "c/002.png" in err and "Nothing was written" in err
    assert not (fresh / PLAN_NAME).exists() and not list((fresh / "shards").glob("*"))


@pytest.mark.slow
def test_the_plan_is_pinned_after_the_vae_loads_and_replaced_while_no_shard_is_finished(tmp_path, vae_dir, capsys):
    src = _folder(tmp_path / "src", per_class=2)
    out = tmp_path / "out"
    (tmp_path / "not-a-vae").mkdir()  # as a hub VAE the node cannot fetch: the load fails
    assert prepare_main(_args(src, out, tmp_path / "not-a-vae")) == 1
    assert "not-a-vae" in capsys.readouterr().err
    assert not (out / PLAN_NAME).exists()  # so the retry with another --vae is not refused
    assert prepare_main(_args(src, out, vae_dir, "--image-format", "jpg", "--max-shards", "0")) == 0
    assert (out / PLAN_NAME).exists() and not list((out / "shards").glob("*.json"))  # pinned, nothing finished
    capsys.readouterr()
    assert prepare_main(_args(src, out, vae_dir)) == 0  # other settings, no finished shard: the plan is replaced
    assert "replacing the plan" in capsys.readouterr().err and Manifest.load(out).image_format == "png"
    with pytest.raises(DataError, match="shard\\(s\\) are finished"):
        opts = PrepareOptions(image_size=32, samples_per_shard=4, image_format="jpg", num_workers=0, progress=False)
        prepare(scan_image_folder(src), out, opts, vae=tiny_vae(import_autoencoder_kl()), echo=lambda _: None)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_stop_signal_to_the_process_group_stops_erw_prepare_between_batches(tmp_path, vae_dir):
    src = _folder(tmp_path / "src", per_class=20, size=64)
    out = tmp_path / "out"
    args = [str(src), str(out), "--vae", str(vae_dir), "--image-size", "32", "--samples-per-shard", "4",
            "--batch-size", "2", "--num-workers", "2", "--no-progress"]
    proc = subprocess.Popen([sys.executable, "-m", "erw_fast.cli.prepare", *args], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while not list((out / "shards").glob("*.json")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-2000:]
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGTERM)  # erw-prepare and its two image workers
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert "SIGTERM received: stopped after" in output and "killed by signal" not in output, output[-3000:]
    finished = len(list((out / "shards").glob("*.json")))
    assert 1 <= finished < 15 and not list((out / "shards").glob("*.tmp"))
    assert prepare_main(args[:-3] + ["--num-workers", "0", "--no-progress"]) == 0
    assert Manifest.load(out).num_samples == 60
