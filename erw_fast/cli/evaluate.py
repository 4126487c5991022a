"""erw-eval: FID, sFID, Inception Score, precision and recall of a sample batch against an ADM reference batch.

Both batches are ``.npz`` files with uint8 NHWC ``arr_0`` (ADM's reference batches, e.g.
VIRTUAL_imagenet256_labeled.npz, also store ``mu/sigma/mu_s/sigma_s``, which are used for FID/sFID). The
results JSON embeds the sampling protocol (``protocol.json`` beside the sample npz) when there is one.

``erw-eval make-ref SOURCE OUT.npz`` builds a reference batch for custom data from an image folder or prepared
shards (``erw_fast.evaluation.reference``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from erw_fast.cli import run_cli

PROTOCOL_FILE = "protocol.json"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="erw-eval", description=__doc__.splitlines()[0])
    p.add_argument("samples", help="sample batch .npz (arr_0: uint8 N×H×W×3)")
    p.add_argument("--ref", required=True, help="reference batch .npz (ADM format)")
    p.add_argument("--out", default=None, help="results JSON (default: <samples>.eval.json beside the samples)")
    p.add_argument("--inception-weights", default=None,
                   help="pt_inception-2015-12-05-6726825d.pth (default: the torch.hub cache)")
    p.add_argument("--random-inception", type=int, default=None, metavar="SEED",
                   help="random Inception weights from SEED (tests only: numbers are not comparable)")
    p.add_argument("--resize", choices=["tf", "torch"], default="tf",
                   help="tf: the TF graph's legacy bilinear resize (ADM); torch: pytorch-fid's")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--k", type=int, default=3, help="neighbourhood size for precision/recall")
    p.add_argument("--split-size", type=int, default=5000, help="Inception Score split size (ADM: 5000)")
    p.add_argument("--device", default="auto")
    return p


# Below 2048 images the 2048×2048 pool_3 covariance is singular, and FID's plug-in estimate is biased upward by a
# term that falls roughly like 1/N (Chong & Forsyth 2020): numbers at different N are not comparable.
MIN_STATS_IMAGES = 2048


def build_make_ref_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="erw-eval make-ref",
                                description="Build an ADM-style reference batch (arr_0 + mu/sigma/mu_s/sigma_s) "
                                            "from an image folder or erw-prepare's shards")
    p.add_argument("source", help="image folder (class sub-folders or flat) or a prepared dataset (manifest.json)")
    p.add_argument("out", help="the reference .npz to write (and its protocol, .json beside it)")
    p.add_argument("--image-size", type=int, default=None,
                   help="ADM centre crop size for a folder (the training resolution); shards: their stored size")
    p.add_argument("--num-samples", type=int, default=None,
                   help="draw N images without replacement (default: all; ADM's ImageNet batches: 10 000 images)")
    p.add_argument("--seed", type=int, default=0, help="seed of the draw")
    p.add_argument("--inception-weights", default=None,
                   help="pt_inception-2015-12-05-6726825d.pth (default: the torch.hub cache)")
    p.add_argument("--random-inception", type=int, default=None, metavar="SEED",
                   help="random Inception weights from SEED (tests only: numbers are not comparable)")
    p.add_argument("--resize", choices=["tf", "torch"], default="tf", help="as erw-eval's --resize")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    return p


def _extractor(args: argparse.Namespace, device: str) -> Any:
    from erw_fast.evaluation import build_fid_inception

    if args.random_inception is not None:
        return build_fid_inception(pretrained=False, seed=args.random_inception, resize=args.resize, device=device)
    return build_fid_inception(weights_path=args.inception_weights, resize=args.resize, device=device)


def _device(args: argparse.Namespace) -> str:
    return args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")


def run_make_ref(args: argparse.Namespace) -> dict[str, Any]:
    from erw_fast.evaluation.reference import build_reference

    if args.num_samples is not None and args.num_samples < 2:
        raise ValueError(f"--num-samples must be ≥ 2, got {args.num_samples}")
    extractor = _extractor(args, _device(args))
    protocol = build_reference(
        args.source, args.out, extractor, image_size=args.image_size, num_samples=args.num_samples, seed=args.seed,
        batch_size=args.batch_size, echo=lambda line: print(line, file=sys.stderr),
        inception={"weights": extractor.weights_source, "resize": args.resize,
                   "comparable": args.random_inception is None})
    for warning in _size_warnings(protocol["num_samples"], "reference"):
        print(f"warning: {warning}", file=sys.stderr)
    print(f"wrote {args.out} ({protocol['num_samples']} images, {protocol['resolution'][0]} px) and "
          f"{Path(args.out).with_suffix('.json')}")
    return protocol


def npz_image_shape(path: Path) -> tuple[int, ...]:
    """``arr_0``'s shape, read from the .npy header inside the zip (no image data loaded)."""
    with zipfile.ZipFile(path) as z, z.open("arr_0.npy") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, _ = read(f)
    return tuple(shape)


def _size_warnings(n: int, what: str) -> list[str]:
    if n >= MIN_STATS_IMAGES:
        return []
    return [f"the {what} batch has {n} images, fewer than {MIN_STATS_IMAGES}: its 2048-d covariance is singular "
            "and FID is biased upward at small N (the bias falls like 1/N); compare only FIDs computed with the "
            "same N (the ADM protocol: 50 000 samples)"]


def batch_warnings(samples: Path, ref: Path) -> list[str]:
    """What makes these two batches' numbers doubtful, said before any Inception work."""
    try:
        s_shape, r_shape = npz_image_shape(samples), npz_image_shape(ref)
    except (KeyError, ValueError, OSError, zipfile.BadZipFile):
        return []  # not readable this way: read_npz_images reports it
    found = _size_warnings(s_shape[0], "sample") + _size_warnings(r_shape[0], "reference")
    if s_shape[1:3] != r_shape[1:3]:
        found.append(f"samples are {s_shape[1]}x{s_shape[2]} but the reference is {r_shape[1]}x{r_shape[2]}: "
                     "both are resized to 299 for Inception, yet the resolution changes the statistics, so this "
                     "FID does not measure the model at the reference's resolution")
    return found


def _protocol_for(samples: Path) -> dict[str, Any] | None:
    path = samples.parent / PROTOCOL_FILE
    if not path.is_file():
        return None
    protocol = json.loads(path.read_text())
    # Only the protocol of this very file: a directory may hold other batches.
    return protocol if protocol.get("npz", samples.name) == samples.name else None


def run(args: argparse.Namespace) -> dict[str, Any]:
    from erw_fast.evaluation import evaluate_batches

    samples, ref = Path(args.samples), Path(args.ref)
    for path in (samples, ref):
        if not path.is_file():
            raise FileNotFoundError(f"batch file not found: {path}")
    warnings = batch_warnings(samples, ref)
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    extractor = _extractor(args, _device(args))
    metrics = evaluate_batches(samples, ref, extractor, batch_size=args.batch_size, k=args.k,
                               split_size=args.split_size)
    protocol = _protocol_for(samples)
    results: dict[str, Any] = {
        **metrics,
        "samples": str(samples.resolve()),
        "reference": str(ref.resolve()),
        "inception": {"weights": extractor.weights_source, "resize": args.resize,
                      "comparable": args.random_inception is None},
        "precision_recall_k": args.k,
        "inception_score_split_size": args.split_size,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "protocol": protocol,
        "warnings": warnings,
    }
    out = Path(args.out) if args.out else samples.with_suffix(".eval.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(
        f"FID {results['fid']:.4f}  sFID {results['sfid']:.4f}  IS {results['inception_score']:.4f}  "
        f"precision {results['precision']:.4f}  recall {results['recall']:.4f}  "
        f"({results['num_samples']} samples vs {results['num_reference']} reference) -> {out}"
    )
    return results


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["make-ref"]:
        return run_cli("erw-eval make-ref", build_make_ref_parser(), run_make_ref, argv[1:])
    return run_cli("erw-eval", build_parser(), run, argv)

if __name__ == "__main__":
    sys.exit(main())
