"""Loader throughput on this machine's CPU: latent shards (webdataset / DALI-CPU loaders) vs REPA's per-file layout.

    python benchmarks/bench_loader.py                        # 4096 samples of 256 px under /tmp/erw_bench_loader
    python benchmarks/bench_loader.py --quick                # a small smoke run (CI)

What is measured: the host side of each loader, i.e. the CPU work a training process spends to produce a batch
of 256: reads, decodes, batch assembly, DataLoader/DALI transport. Latent sampling is excluded for every layout
(it runs on the GPU in training, ~free; see ``erw_fast.data.latents``). Each case's files are read once right
before it is measured, so data comes from the page cache: this is CPU cost, not disk speed.

Layouts (same synthetic samples in each):
    shards     ``erw-prepare`` format: 1000-sample tars + index; moments float16 (8, 32, 32); images as png
               (level 1), jpg (q95) or raw uint8; features float16 (256, 768) (DINOv2-B/14 tokens at 256 px)
    per-file   REPA's layout, read as REPA's ``CustomDataset`` does: one uncompressed PNG (``compress_level=0``,
               as ``dataset_tools.py convert`` writes) and one float32 ``.npy`` of moments per sample, labels from
               ``dataset.json``; features as one ``.npy`` per sample; torch DataLoader with default collation
Modes: latents+labels, latents+image (decoded to uint8), latents+features.
``workers=0`` runs everything in the measuring process: samples/s per CPU core. ``workers=N``: N worker processes.
``threads=N``: the shard loader's N loader threads in the measuring process (``data.loader_threads``).

Writes ``<out>/loader_<host>.json`` (machine, versions, settings, dataset sizes, raw timings) and ``.md`` (table).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from erw_fast.config import DataConfig
from erw_fast.data.images import IMAGE_MEMBER, encode_image
from erw_fast.data.loaders import build_loader
from erw_fast.data.shards import (
    MEMBER_FEATURES,
    MEMBER_LABEL,
    MEMBER_MOMENTS,
    SHARD_DIR,
    Manifest,
    ShardEntry,
    ShardWriter,
    npy_bytes,
    sample_key,
    shard_name,
)
from erw_fast.envinfo import cpu_name, device_name, module_version

SIZE, LATENT, FEATURES = 256, 32, (256, 768)
NUM_CLASSES = 1000


def synth_image(rng: np.random.Generator) -> np.ndarray:
    """Photo-like statistics (smooth multi-scale structure + sensor noise): PNG/JPEG sizes near ImageNet's."""
    out = np.full((SIZE, SIZE, 3), 128.0, np.float32)
    for res, amp in ((4, 90), (16, 40), (64, 20)):
        low = rng.normal(0, amp, (res, res, 3)).astype(np.float32)
        up = [Image.fromarray(low[..., c], mode="F").resize((SIZE, SIZE), Image.Resampling.BICUBIC) for c in range(3)]
        out += np.stack([np.asarray(u) for u in up], -1)
    out += rng.normal(0, 5, out.shape)
    return np.clip(out, 0, 255).astype(np.uint8)


def generate(root: Path, n: int, per_shard: int) -> dict[str, Any]:
    """Write the shard datasets (png, jpg, raw; png also with features) and the per-file reference layout."""
    marker = root / "complete.json"
    if marker.is_file() and json.loads(marker.read_text())["num_samples"] == n:
        return json.loads(marker.read_text())
    rng = np.random.default_rng(0)
    labels = rng.integers(0, NUM_CLASSES, n)
    layouts = {"png": False, "jpg": False, "raw": False, "png_features": True}
    writers: dict[str, ShardWriter | None] = dict.fromkeys(layouts)
    entries: dict[str, list[ShardEntry]] = {k: [] for k in layouts}
    ref_labels = []
    for sub in ("images", "vae-sd", "features"):
        (root / "perfile" / sub).mkdir(parents=True, exist_ok=True)
    for k in layouts:
        (root / k / SHARD_DIR).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for i in range(n):
        img = synth_image(rng)
        mean = rng.normal(0, 5, (4, LATENT, LATENT))
        std = rng.uniform(0.01, 0.2, (4, LATENT, LATENT))
        moments = np.concatenate([mean, std]).astype(np.float16)
        feats = rng.normal(0, 1, FEATURES).astype(np.float16)
        sid = i // per_shard
        for k, with_features in layouts.items():
            fmt = k.split("_")[0]
            if i % per_shard == 0:
                name = shard_name(sid)
                writers[k] = ShardWriter(root / k / SHARD_DIR / f"{name}.tar", root / k / SHARD_DIR / f"{name}.idx")
            members = [(MEMBER_LABEL, str(int(labels[i])).encode()), (MEMBER_MOMENTS, npy_bytes(moments)),
                       (IMAGE_MEMBER[fmt], encode_image(img, fmt))]
            if with_features:
                members.append((MEMBER_FEATURES, npy_bytes(feats)))
            writers[k].add(sample_key(i), members)
            if i % per_shard == per_shard - 1 or i == n - 1:
                info = writers[k].commit()
                name = shard_name(sid)
                entries[k].append(ShardEntry(name, f"{SHARD_DIR}/{name}.tar", f"{SHARD_DIR}/{name}.idx",
                                             sid * per_shard, info.num_samples, info.bytes, info.sha256))
        # REPA's per-file layout: 00000/img00000000.png (uncompressed PNG) + float32 mean||std .npy
        d = f"{i // 1000:05d}"
        for sub in ("images", "vae-sd", "features"):
            (root / "perfile" / sub / d).mkdir(exist_ok=True)
        Image.fromarray(img).save(root / "perfile" / "images" / d / f"img{i:08d}.png", compress_level=0)
        np.save(root / "perfile" / "vae-sd" / d / f"img-mean-std-{i:08d}.npy", moments.astype(np.float32))
        np.save(root / "perfile" / "features" / d / f"feat-{i:08d}.npy", feats)
        ref_labels.append([f"{d}/img-mean-std-{i:08d}.npy", int(labels[i])])
        if (i + 1) % 512 == 0:
            print(f"  generated {i + 1}/{n} samples ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    (root / "perfile" / "vae-sd" / "dataset.json").write_text(json.dumps({"labels": ref_labels}))
    for k, with_features in layouts.items():
        fmt = k.split("_")[0]
        members = [MEMBER_LABEL, MEMBER_MOMENTS, IMAGE_MEMBER[fmt]] + ([MEMBER_FEATURES] if with_features else [])
        features = {"encoder": "synthetic", "shape": list(FEATURES), "dtype": "float16"} if with_features else None
        Manifest(num_samples=n, num_classes=NUM_CLASSES, classes=[str(c) for c in range(NUM_CLASSES)],
                 image_size=SIZE, image_format=fmt, members=members, samples_per_shard=per_shard,
                 moments_shape=[8, LATENT, LATENT],
                 vae={"name": "synthetic", "scaling_factor": 0.18215, "latent_channels": 4, "latent_size": LATENT,
                      "dtype": "float16"},
                 flip_moments=False, shards=entries[k], features=features,
                 image_encoding={"png": {"png_compress_level": 1}, "jpg": {"jpeg_quality": 95}}.get(fmt, {}),
                 ).save(root / k)
    info = {"num_samples": n, "bytes_per_sample": _sizes(root, n)}
    marker.write_text(json.dumps(info, indent=1))
    return info


def _sizes(root: Path, n: int) -> dict[str, float]:
    """Average stored bytes per sample of each field."""
    out: dict[str, float] = {}
    for k in ("png", "jpg", "raw", "png_features"):
        from erw_fast.data.shards import ShardSet

        s = ShardSet(root / k, verify="none")
        for j, m in enumerate(s.members):
            out[f"shards/{k}/{m}"] = float(s.sizes[:, j].mean())
    pf = root / "perfile"
    for sub, pat in (("images", "*.png"), ("vae-sd", "*.npy"), ("features", "*.npy")):
        files = list((pf / sub).rglob(pat))
        out[f"perfile/{sub}"] = float(np.mean([f.stat().st_size for f in files]))
    return out


# ----------------------------------------------------------------------------------------------------- per-file reader


class PerFileDataset(torch.utils.data.Dataset):
    """REPA's CustomDataset access pattern: listing + dataset.json labels, PIL for PNGs, np.load for features."""

    def __init__(self, root: Path, image: bool, features: bool) -> None:
        self.images_dir, self.vae_dir, self.feat_dir = root / "images", root / "vae-sd", root / "features"
        self.image_fnames = sorted(str(p.relative_to(self.images_dir)) for p in self.images_dir.rglob("*.png"))
        self.moment_fnames = sorted(str(p.relative_to(self.vae_dir)) for p in self.vae_dir.rglob("*.npy"))
        self.feat_fnames = sorted(str(p.relative_to(self.feat_dir)) for p in self.feat_dir.rglob("*.npy"))
        labels = dict(json.loads((self.vae_dir / "dataset.json").read_text())["labels"])
        self.labels = np.array([labels[f] for f in self.moment_fnames], dtype=np.int64)
        self.image, self.features = image, features

    def __len__(self) -> int:
        return len(self.moment_fnames)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, ...]:
        out = [torch.from_numpy(np.load(self.vae_dir / self.moment_fnames[idx])), torch.tensor(self.labels[idx])]
        if self.image:
            with open(self.images_dir / self.image_fnames[idx], "rb") as f:
                image = np.array(Image.open(f))
            out.append(torch.from_numpy(image.reshape(*image.shape[:2], -1).transpose(2, 0, 1)))
        if self.features:
            out.append(torch.from_numpy(np.load(self.feat_dir / self.feat_fnames[idx])))
        return tuple(out)


def _perfile_iter(root: Path, image: bool, features: bool, workers: int, batch: int):
    ds = PerFileDataset(root, image, features)
    # REPA: DataLoader(shuffle=True, drop_last=True); an explicit generator keeps the order reproducible here
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, drop_last=True, num_workers=workers,
                                         generator=torch.Generator().manual_seed(0),
                                         persistent_workers=workers > 0, prefetch_factor=2 if workers else None)
    while True:
        yield from loader


# ----------------------------------------------------------------------------------------------------- timing


def warm(paths: list[Path]) -> float:
    """Read files once so the measurement sees the page cache (this VM keeps only a few GB cached)."""
    t0 = time.perf_counter()
    for path in paths:
        with open(path, "rb") as f:
            while f.read(1 << 24):
                pass
    return time.perf_counter() - t0


def _descendants(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids = [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
        for k in kids:
            out += [k, *_descendants(k)]
    return out


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and its live descendants (DataLoader / DALI workers)."""
    total = time.process_time()
    tick = os.sysconf("SC_CLK_TCK")
    for pid in _descendants(os.getpid()):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            pass
    return total


def measure(next_batch, batch: int, seconds: float, repeats: int, warmup: int = 2,
            sync: bool = False) -> list[dict[str, float]]:
    """Wall time and CPU time (all processes of the loader) per repeat; CPU time is robust to other load.
    ``sync``: wait for the GPU after each batch, so GPU decoding is inside the measured time."""
    for _ in range(warmup):
        next_batch()
    runs = []
    for _ in range(repeats):
        n, c0, t0 = 0, cpu_seconds(), time.perf_counter()
        while True:
            next_batch()
            if sync:
                torch.cuda.synchronize()
            n += 1
            dt = time.perf_counter() - t0
            if dt >= seconds and n >= 3:
                break
        runs.append({"batches": n, "samples": n * batch, "seconds": dt, "cpu_seconds": cpu_seconds() - c0,
                     "loadavg_1min": os.getloadavg()[0]})
    return runs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="/tmp/erw_bench_loader")
    p.add_argument("--num-samples", type=int, default=4096)
    p.add_argument("--per-shard", type=int, default=1000)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--seconds", type=float, default=4.0, help="per repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", default="0,2", help="comma-separated worker counts")
    p.add_argument("--threads", default="2",
                   help="comma-separated loader-thread counts for the shard loader (data.loader_threads; '' for none)")
    p.add_argument("--out", help="default: benchmarks/results (with --quick: the data directory)")
    p.add_argument("--quick", action="store_true", help="tiny smoke run (not a measurement)")
    p.add_argument("--device", default="cpu",
                   help="the loaders' target device: cuda makes DALI decode on the GPU (nvJPEG, device='mixed') and "
                        "the webdataset loader copy pinned batches; batches are synchronised before each timing ends")
    args = p.parse_args(argv)
    if args.quick:
        args.num_samples, args.per_shard, args.batch, args.seconds, args.repeats = 64, 16, 16, 0.05, 1
        args.workers = "0"
    if args.out is None:
        args.out = args.data if args.quick else str(Path(__file__).resolve().parent / "results")
    torch.set_num_threads(1)
    device = torch.device(args.device)
    root = Path(args.data)
    info = generate(root, args.num_samples, args.per_shard)
    sizes = info["bytes_per_sample"]
    workers = [int(w) for w in args.workers.split(",")]
    threads = [int(t) for t in args.threads.split(",") if t.strip()]

    s = "shards/{}/{}".format
    cases: list[dict[str, Any]] = []
    for mode, ds, images, features, payload in (
        ("latents+labels", "png", False, False, sizes[s("png", "cls")] + sizes[s("png", "moments.npy")]),
        ("latents+image", "png", True, False, sizes[s("png", "cls")] + sizes[s("png", "moments.npy")]
         + sizes[s("png", "png")]),
        ("latents+image", "jpg", True, False, sizes[s("jpg", "cls")] + sizes[s("jpg", "moments.npy")]
         + sizes[s("jpg", "jpg")]),
        ("latents+image", "raw", True, False, sizes[s("raw", "cls")] + sizes[s("raw", "moments.npy")]
         + sizes[s("raw", "img.npy")]),
        ("latents+features", "png_features", False, True, sizes[s("png_features", "cls")]
         + sizes[s("png_features", "moments.npy")] + sizes[s("png_features", "features.npy")]),
    ):
        kinds = ["webdataset"] + (["dali"] if images and ds in ("png", "jpg") else [])
        for kind in kinds:
            for w in workers:
                cases.append({"layout": f"shards ({ds.split('_')[0]})", "loader": kind, "mode": mode, "workers": w,
                              "threads": 0, "payload_bytes": payload, "dataset": ds, "images": images,
                              "features": features})
            for t in threads if kind == "webdataset" else []:
                cases.append({"layout": f"shards ({ds.split('_')[0]})", "loader": "webdataset (threads)", "mode": mode,
                              "workers": 0, "threads": t, "payload_bytes": payload, "dataset": ds, "images": images,
                              "features": features})
    for mode, image, features, payload in (
        ("latents+labels", False, False, sizes["perfile/vae-sd"]),
        ("latents+image", True, False, sizes["perfile/vae-sd"] + sizes["perfile/images"]),
        ("latents+features", False, True, sizes["perfile/vae-sd"] + sizes["perfile/features"]),
    ):
        for w in workers:
            cases.append({"layout": "per-file (REPA)", "loader": "torch", "mode": mode, "workers": w, "threads": 0,
                          "payload_bytes": payload, "image": image, "features": features})

    for case in cases:
        w = case["workers"]
        if case["layout"].startswith("per-file"):
            subs = ["vae-sd"] + (["images"] if case["image"] else []) + (["features"] if case["features"] else [])
            warm([f for sub in subs for f in (root / "perfile" / sub).rglob("*") if f.is_file()])
        else:
            warm(sorted((root / case["dataset"] / SHARD_DIR).glob("*.tar")))
        if case["layout"].startswith("per-file"):
            it = _perfile_iter(root / "perfile", case["image"], case["features"], w, args.batch)
            step = lambda it=it: next(it)  # noqa: E731
            closer = None
        else:
            data = DataConfig(kind=case["loader"].split()[0], path=str(root / case["dataset"]), image_size=SIZE,
                              num_workers=w, loader_threads=case["threads"], features=case["features"],
                              dali_threads=max(1, w), verify="none", device_prefetch=False)
            loader = build_loader(data, global_batch_size=args.batch, seed=0, images=case["images"], device=device)
            step, closer = loader.next_host, loader.close
            case["decode"] = ("GPU (DALI mixed)" if device.type == "cuda" and case["loader"] == "dali" and
                              case["images"] else "CPU")
        runs = measure(step, args.batch, args.seconds, args.repeats, sync=device.type == "cuda")
        if closer:
            closer()
        case["runs"] = runs
        case["samples_per_s"] = statistics.median(r["samples"] / r["seconds"] for r in runs)
        case["samples_per_cpu_s"] = statistics.median(r["samples"] / max(r["cpu_seconds"], 1e-9) for r in runs)
        case["mb_per_s"] = case["samples_per_s"] * case["payload_bytes"] / 1e6
        case["samples_per_s_per_worker"] = case["samples_per_s"] / max(1, w, case["threads"])
        print(f"{case['layout']:18s} {case['loader']:10s} {case['mode']:17s} workers={w} threads={case['threads']}: "
              f"{case['samples_per_s']:9.0f} samples/s  {case['samples_per_cpu_s']:9.0f} per CPU-s  "
              f"{case['mb_per_s']:8.1f} MB/s  load {runs[-1]['loadavg_1min']:.2f}", file=sys.stderr, flush=True)

    report = {
        "benchmark": "bench_loader",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": _machine(),
        "versions": _versions(),
        "settings": {"num_samples": args.num_samples, "samples_per_shard": args.per_shard, "batch": args.batch,
                     "image_size": SIZE, "moments": "float16 (8, 32, 32) in shards; float32 in per-file (REPA)",
                     "features": f"float16 {FEATURES}", "seconds_per_repeat": args.seconds, "repeats": args.repeats,
                     "workers": workers, "loader_threads": threads, "torch_threads": 1,
                     "page_cache": "warm (each case's files are read once right before it is measured)",
                     "quick": args.quick, "excluded": "latent sampling (on the GPU in training)",
                     "device": str(device),
                     "gpu": device_name(device) if device.type == "cuda" else None},
        "bytes_per_sample": sizes,
        "cases": [{k: v for k, v in c.items() if k not in ("images", "image", "features", "dataset")} | {
            "images": c.get("images", c.get("image")), "features": c["features"]} for c in cases],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "loader_quick" if args.quick else f"loader_{socket.gethostname().split('.')[0]}"
    if device.type == "cuda" and not args.quick:
        stem += "_gpu"
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / f"{stem}.md").write_text(markdown(report))
    print(f"wrote {out / stem}.json and .md", file=sys.stderr)
    return 0


def _machine() -> dict[str, Any]:
    mem = None
    try:
        mem = int(Path("/proc/meminfo").read_text().split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return {"cpu_model": cpu_name(), "logical_cpus": os.cpu_count(), "memory_mib": mem, "platform": platform.platform(),
            "python": platform.python_version()}


def _versions() -> dict[str, str]:
    """The loader's libraries under their distribution names; DALI only where it is installed."""
    modules = {"torch": "torch", "numpy": "numpy", "pillow": "PIL", "webdataset": "webdataset",
               "nvidia-dali": "nvidia.dali"}
    found = {name: module_version(module, import_missing=True) for name, module in modules.items()}
    return {name: version for name, version in found.items() if version is not None}


def markdown(report: dict[str, Any]) -> str:
    m, st = report["machine"], report["settings"]
    ref = {(c["mode"], c["workers"]): c["samples_per_cpu_s"] for c in report["cases"]
           if c["layout"].startswith("per-file")}
    lines = [
        "# Loader throughput (CPU, host side)",
        "",
        f"{report['date']} · {m['cpu_model']}, {m['logical_cpus']} logical CPUs, {m['memory_mib']} MiB · "
        + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
        "",
        f"{st['num_samples']} synthetic {st['image_size']} px samples, batch {st['batch']}, "
        "page cache warmed per case, "
        f"median of {st['repeats']} × ≥{st['seconds_per_repeat']} s; latent sampling excluded (GPU). "
        "workers = 0: the measuring process does everything. **samples per CPU-s** = samples ÷ CPU time of the "
        "loader's processes (main + workers): throughput per CPU core, insensitive to other load on the machine; "
        "the ratio column compares it with the per-file layout in the same mode and worker count (loader threads: "
        "with as many per-file workers). threads: `data.loader_threads`, the shard loader's threads in the "
        "measuring process instead of worker processes. "
        "load avg: the 1-minute load average at the end of the case (this benchmark's own processes included; "
        f"the machine has {report['machine']['logical_cpus']} logical CPUs). Device: {st.get('device', 'cpu')}"
        + (f" ({st['gpu']}; image decode as the loader column says)" if st.get("gpu") else "") + ".",
        "",
        "| layout | loader | mode | workers | threads | samples/s | MB/s | per worker (samples/s) | samples per CPU-s "
        "| vs per-file (per CPU-s) | load avg |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for c in report["cases"]:
        r = ref.get((c["mode"], c["workers"] or c.get("threads", 0)))  # loader threads vs as many workers
        ratio = f"{c['samples_per_cpu_s'] / r:.1f}×" if r and not c["layout"].startswith("per-file") else ""
        load = max(run["loadavg_1min"] for run in c["runs"])
        loader = c["loader"] + (" (GPU decode)" if c.get("decode", "CPU") != "CPU" else "")
        lines.append(f"| {c['layout']} | {loader} | {c['mode']} | {c['workers']} | {c.get('threads', 0)} | "
                     f"{c['samples_per_s']:,.0f} | "
                     f"{c['mb_per_s']:,.1f} | {c['samples_per_s_per_worker']:,.0f} | {c['samples_per_cpu_s']:,.0f} | "
                     f"{ratio} | {load:.2f} |")
    b = report["bytes_per_sample"]
    lines += ["", "Stored bytes per sample: " + ", ".join(f"{k} {v / 1024:.1f} KiB" for k, v in b.items()), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
