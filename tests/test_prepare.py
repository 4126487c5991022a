"""Preprocessing: ADM centre crop vs a from-scratch emulation of Pillow's resampler, source listings, the full
image → shard path with a real (tiny, random) diffusers AutoencoderKL, kill/resume, ranks, refusal."""

from __future__ import annotations

import hashlib
import io
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from _shard_helpers import make_loader as shard_loader
from _shard_helpers import tiny_vae
from PIL import Image

from erw_fast.cli.prepare import main as prepare_main
from erw_fast.data.images import center_crop_arr, load_rgb
from erw_fast.data.prepare import PrepareOptions, prepare, read_file_list, scan_image_folder
from erw_fast.data.shards import DataError, Manifest, ShardSet
from erw_fast.data.vae import import_autoencoder_kl

TESTS = Path(__file__).resolve().parent

# ----------------------------------------------------------------------------------------------------- ADM crop
# Pillow's ImagingResample, re-derived from its C source (libImaging/Resample.c): separable passes (horizontal
# first), filter support scaled by the downscale factor, weights normalised, then quantised to 22-bit fixed point;
# each output = clip((Σ w·x + 2²¹) >> 22). Written independently of PIL, it must agree with PIL bit for bit.


def _box(x):
    return 1.0 if -0.5 < x <= 0.5 else 0.0


def _bicubic(x, a=-0.5):
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


def _weights(n_in, n_out, filt, support):
    scale = n_in / n_out
    fscale = max(scale, 1.0)
    support *= fscale
    w = np.zeros((n_out, n_in), dtype=np.int64)
    for o in range(n_out):
        center = (o + 0.5) * scale
        lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), n_in)
        vals = [filt((x - center + 0.5) / fscale) for x in range(lo, hi)]
        total = sum(vals)
        for x, v in zip(range(lo, hi), vals, strict=True):
            v = v / total if total else v
            w[o, x] = int(v * (1 << 22) + (0.5 if v >= 0 else -0.5))
    return w


def _resize(arr, width, height, filt, support):
    x = arr.astype(np.int64)
    if width != x.shape[1]:  # horizontal pass first, rounded and clipped to 8 bits, as Pillow does
        x = np.einsum("ow,hwc->hoc", _weights(x.shape[1], width, filt, support), x)
        x = np.clip((x + (1 << 21)) >> 22, 0, 255)
    if height != x.shape[0]:
        x = np.einsum("oh,hwc->owc", _weights(x.shape[0], height, filt, support), x)
        x = np.clip((x + (1 << 21)) >> 22, 0, 255)
    return x.astype(np.uint8)


def _adm_reference(arr, size):
    while min(arr.shape[:2]) >= 2 * size:
        arr = _resize(arr, arr.shape[1] // 2, arr.shape[0] // 2, _box, 0.5)
    scale = size / min(arr.shape[:2])
    arr = _resize(arr, round(arr.shape[1] * scale), round(arr.shape[0] * scale), _bicubic, 2.0)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top : top + size, left : left + size]


@pytest.mark.parametrize("h,w,size", [(375, 500, 64), pytest.param(771, 1023, 128, marks=pytest.mark.slow),
                                      (300, 256, 256), (97, 131, 32), (150, 200, 256), (513, 512, 256)])
def test_center_crop_matches_fixed_point_reference(h, w, size):
    rng = np.random.default_rng(h * w)
    smooth = np.array(Image.fromarray(rng.integers(0, 256, (h // 8 + 2, w // 8 + 2, 3), dtype=np.uint8))
                      .resize((w, h), Image.Resampling.BILINEAR))
    img = np.clip(smooth.astype(int) + rng.integers(-40, 40, smooth.shape), 0, 255).astype(np.uint8)
    got = center_crop_arr(Image.fromarray(img), size)
    assert got.shape == (size, size, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, _adm_reference(img, size))


# ----------------------------------------------------------------------------------------------------- sources


def _make_folder(root: Path, per_class: int = 6, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for cls in ["n02_b", "n01_a", "n03_c"]:  # created unsorted; classes are sorted names
        d = root / cls
        (d / "sub").mkdir(parents=True)
        for i in range(per_class):
            h, w = (int(v) for v in rng.integers(24, 90, 2))
            img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            target = d / "sub" if i == per_class - 1 else d  # nested files count too
            if i % 3 == 0:
                img.convert("L").save(target / f"img{i}.png")  # greyscale → converted to RGB
            elif i % 3 == 1:
                img.save(target / f"img{i}.JPEG", quality=90)
            else:
                img.convert("RGBA").save(target / f"img{i}.png")
        (d / "notes.txt").write_text("not an image")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imagenet")
    _make_folder(root)
    return root


@pytest.fixture(scope="module")
def autoencoder_kl() -> type:
    return import_autoencoder_kl()


def test_scan_image_folder_matches_torchvision(folder):
    listing = scan_image_folder(folder)
    assert listing.classes == ["n01_a", "n02_b", "n03_c"] and len(listing) == 18
    from erw_fast.encoders.timm_compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    tv = pytest.importorskip("torchvision.datasets")
    ref = tv.ImageFolder(str(folder))
    assert ref.classes == listing.classes
    assert [(os.path.relpath(p, folder), y) for p, y in ref.samples] == list(zip(listing.paths, listing.labels,
                                                                              strict=True))


def test_read_file_list(tmp_path):
    (tmp_path / "list.csv").write_text("path,label\n# a comment\na/x.jpg,3\n\nb/y z.png,0\n")
    listing = read_file_list(tmp_path / "list.csv")
    assert listing.paths == ["a/x.jpg", "b/y z.png"] and listing.labels == [3, 0]
    assert listing.classes == ["0", "1", "2", "3"] and listing.root == str(tmp_path)
    (tmp_path / "list.txt").write_text("/abs/x.jpg 1\nrel.png   0\n")
    assert read_file_list(tmp_path / "list.txt", num_classes=10).classes[-1] == "9"
    (tmp_path / "bad.txt").write_text("x.jpg 1\ny.jpg one\n")
    with pytest.raises(DataError, match="bad.txt:2: label 'one'"):
        read_file_list(tmp_path / "bad.txt")


# ----------------------------------------------------------------------------------------------------- end to end


@pytest.mark.multiprocess
def test_prepare_end_to_end(folder, autoencoder_kl, tmp_path):
    from erw_fast.encoders import load_encoder

    vae = tiny_vae(autoencoder_kl)
    torch.manual_seed(1)
    encoder = load_encoder("demo-vit-t", resolution=64, pretrained=False)
    opts = PrepareOptions(image_size=64, samples_per_shard=7, flip_moments=True, encoder="demo-vit-t",
                          num_workers=2, batch_size=4, vae="tiny-random", progress=False)
    listing = scan_image_folder(folder)
    result = prepare(listing, tmp_path, opts, vae=vae, encoder=encoder, echo=lambda _: None)
    assert result.complete and result.written == ["shard-000000", "shard-000001", "shard-000002"]

    man = Manifest.load(tmp_path)
    assert (man.num_samples, man.num_classes, man.classes) == (18, 3, listing.classes)
    assert [s.num_samples for s in man.shards] == [7, 7, 4]
    assert man.vae == {"name": "tiny-random", "scaling_factor": 0.18215, "latent_channels": 4, "latent_size": 8,
                       "dtype": "float16"}
    assert man.moments_shape == [8, 8, 8] and man.features == {
        "encoder": "demo-vit-t", "shape": [16, 192], "dtype": "float16", "resolution": 64, "pretrained": False,
        "weights": "random init (pretrained=False)"}
    for s in man.shards:
        assert hashlib.sha256((tmp_path / s.tar).read_bytes()).hexdigest() == s.sha256
    assert (tmp_path / "sources.tsv").read_text().splitlines()[5] == f"00000005\t0\t{listing.paths[5]}"

    shards = ShardSet(tmp_path, verify="checksum")
    members = ["cls", "moments.npy", "moments_flip.npy", "png", "features.npy"]
    for i in range(man.num_samples):
        got = shards.read(i, members)
        crop = center_crop_arr(load_rgb(os.path.join(folder, listing.paths[i])), 64)
        assert int(got["cls"]) == listing.labels[i]
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(got["png"]))), crop)
        x = torch.from_numpy(crop).permute(2, 0, 1)[None].float() / 127.5 - 1  # REPA's VAE input
        with torch.no_grad():
            for key, inp in (("moments.npy", x), ("moments_flip.npy", x.flip(-1))):
                dist = vae.encode(inp).latent_dist
                ref = torch.cat([dist.mean, dist.std], 1)[0]
                torch.testing.assert_close(torch.from_numpy(got[key].astype(np.float32)), ref, rtol=2e-3, atol=1e-4)
            feats = encoder(torch.from_numpy(crop).permute(2, 0, 1)[None])[0]
        torch.testing.assert_close(torch.from_numpy(got["features.npy"].astype(np.float32)), feats,
                                   rtol=2e-3, atol=2e-3)

    loader = shard_loader("webdataset", tmp_path, global_batch_size=6, seed=0, image_size=64, flip=True,
                          features=True, num_workers=0, latent_scale=0.18215, latent_size=8, latent_channels=4)
    batch = next(loader)
    assert batch["latents"].shape == (6, 4, 8, 8) and batch["images"].shape == (6, 3, 64, 64)
    assert batch["features"].shape == (6, 16, 192)
    loader.close()


# ----------------------------------------------------------------------------------------------------- resume


_CHILD = textwrap.dedent("""
    import os, signal, sys
    from erw_fast.data.shards import ShardWriter
    calls = [0]
    original = ShardWriter.add
    def add(self, key, members):  # SIGKILL mid-shard: no cleanup, no finally blocks
        calls[0] += 1
        if calls[0] == int(os.environ["KILL_AT"]):
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, key, members)
    ShardWriter.add = add
    from erw_fast.cli.prepare import main
    sys.exit(main(sys.argv[1:]))
""")


def _args(src, out, vae_dir):
    return [str(src), str(out), "--vae", str(vae_dir), "--image-size", "32", "--samples-per-shard", "4",
            "--batch-size", "3", "--num-workers", "0", "--flip-moments", "--image-format", "jpg", "--no-progress"]


def _snapshot(out, k):
    files = [out / "shards" / f"shard-{k:06d}.{ext}" for ext in ("tar", "idx", "json")]
    return [(f.stat().st_mtime_ns, hashlib.sha256(f.read_bytes()).hexdigest()) for f in files]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_prepare_resumes_after_kill(folder, autoencoder_kl, tmp_path):
    vae_dir = tmp_path / "vae"
    tiny_vae(autoencoder_kl).save_pretrained(vae_dir)  # also exercises loading a VAE from a local directory
    out = tmp_path / "out"
    env = {**os.environ, "KILL_AT": "10"}  # shards 0 and 1 (8 samples) finished, shard 2 half written
    proc = subprocess.run([sys.executable, "-c", _CHILD, *_args(folder, out, vae_dir)], env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    done = sorted(p.name for p in (out / "shards").glob("*.json"))
    assert done == ["shard-000000.json", "shard-000001.json"]
    assert (out / "shards" / "shard-000002.tar.tmp").exists() and not (out / "shards" / "shard-000002.tar").exists()
    assert not (out / "manifest.json").exists()
    before = [_snapshot(out, k) for k in (0, 1)]

    assert prepare_main(_args(folder, out, vae_dir)) == 0
    assert [_snapshot(out, k) for k in (0, 1)] == before  # finished shards were not rewritten
    man = Manifest.load(out)
    assert man.num_samples == 18 and len(man.shards) == 5 and man.image_format == "jpg"
    assert not list((out / "shards").glob("*.tmp"))

    ref = tmp_path / "ref"  # an uninterrupted run produces byte-identical shards
    assert prepare_main(_args(folder, ref, vae_dir)) == 0
    assert [s.sha256 for s in Manifest.load(ref).shards] == [s.sha256 for s in man.shards]

    again = [_snapshot(out, k) for k in range(5)]
    assert prepare_main(_args(folder, out, vae_dir)) == 0  # a finished dataset: nothing is rewritten
    assert [_snapshot(out, k) for k in range(5)] == again


def test_prepare_ranks_chunks_and_settings_guard(folder, autoencoder_kl, tmp_path):
    vae = tiny_vae(autoencoder_kl)
    listing = scan_image_folder(folder)
    base = dict(image_size=32, samples_per_shard=4, num_workers=0, batch_size=4, progress=False, vae="tiny")
    quiet = dict(vae=vae, echo=lambda _: None)
    r1 = prepare(listing, tmp_path / "a", PrepareOptions(**base, rank=1, world_size=2), **quiet)
    assert r1.written == ["shard-000001", "shard-000003"] and not r1.complete
    r0 = prepare(listing, tmp_path / "a", PrepareOptions(**base, rank=0, world_size=2, max_shards=2), **quiet)
    assert r0.written == ["shard-000000", "shard-000002"] and not r0.complete
    r0 = prepare(listing, tmp_path / "a", PrepareOptions(**base, rank=0, world_size=2), **quiet)
    assert r0.written == ["shard-000004"] and r0.skipped == ["shard-000000", "shard-000002"] and r0.complete
    single = prepare(listing, tmp_path / "b", PrepareOptions(**base), **quiet)
    assert single.complete
    assert [s.sha256 for s in Manifest.load(tmp_path / "a").shards] == [
        s.sha256 for s in Manifest.load(tmp_path / "b").shards]

    with pytest.raises(DataError, match="different settings.*settings.image_format: was 'png', now 'raw'"):
        prepare(listing, tmp_path / "a", PrepareOptions(**{**base, "image_format": "raw"}), **quiet)


def test_prepare_cli_rejects_bad_input(tmp_path, capsys):
    assert prepare_main([str(tmp_path / "missing"), str(tmp_path / "out")]) == 1
    assert "error" in capsys.readouterr().err
    assert prepare_main([str(tmp_path / "out")]) == 2  # neither a folder nor --list
