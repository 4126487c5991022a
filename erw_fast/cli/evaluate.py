"""erw-eval: FID, sFID, Inception Score, precision and recall of a sample batch against an ADM reference batch.

Both batches are ``.npz`` files with uint8 NHWC ``arr_0`` (ADM's reference batches, e.g.
VIRTUAL_imagenet256_labeled.npz, also store ``mu/sigma/mu_s/sigma_s``, which are used for FID/sFID). The
results JSON embeds the sampling protocol (``protocol.json`` beside the sample npz) when there is one.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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


def _protocol_for(samples: Path) -> dict[str, Any] | None:
    path = samples.parent / PROTOCOL_FILE
    if not path.is_file():
        return None
    protocol = json.loads(path.read_text())
    # Only the protocol of this very file: a directory may hold other batches.
    return protocol if protocol.get("npz", samples.name) == samples.name else None


def run(args: argparse.Namespace) -> dict[str, Any]:
    from erw_fast.evaluation import build_fid_inception, evaluate_batches

    samples, ref = Path(args.samples), Path(args.ref)
    for path in (samples, ref):
        if not path.is_file():
            raise FileNotFoundError(f"batch file not found: {path}")
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if args.random_inception is not None:
        extractor = build_fid_inception(pretrained=False, seed=args.random_inception, resize=args.resize,
                                        device=device)
    else:
        extractor = build_fid_inception(weights_path=args.inception_weights, resize=args.resize, device=device)
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
    return run_cli("erw-eval", build_parser(), run, argv)

if __name__ == "__main__":
    sys.exit(main())
