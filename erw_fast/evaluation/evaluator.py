"""ADM-style evaluation of a sample batch against a reference batch (both ``.npz`` with uint8 NHWC ``arr_0``).

Mirrors openai/guided-diffusion ``evaluations/evaluator.py``: Inception activations of both batches; FID and
sFID against the reference's stored ``mu``/``sigma`` and ``mu_s``/``sigma_s`` when present (else computed from
its images); Inception Score of the samples; k = 3 manifold precision/recall on ``pool_3`` activations.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from erw_fast.evaluation.fid import GaussianStats, inception_score
from erw_fast.evaluation.inception import InceptionFeatureExtractor
from erw_fast.evaluation.precision_recall import manifold_precision_recall

__all__ = [
    "Activations",
    "compute_activations",
    "evaluate_batches",
    "read_npz_images",
    "reference_statistics",
]

PathLike = str | os.PathLike[str]


@dataclass
class Activations:
    pool: np.ndarray  # (N, 2048) float32
    spatial: np.ndarray  # (N, 2023) float32
    logits: np.ndarray  # (N, 1008) float32


def read_npz_images(path: PathLike) -> np.ndarray:
    """``arr_0`` of an ADM batch file: uint8 (N, H, W, 3)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"batch file not found: {path}")
    with np.load(path) as data:
        if "arr_0" not in data.files:
            raise ValueError(f"{path}: no 'arr_0' array (keys: {data.files}); expected an ADM-style batch")
        images = data["arr_0"]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or len(images) == 0:
        raise ValueError(f"{path}: arr_0 must be non-empty uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    return images


def compute_activations(
    extractor: InceptionFeatureExtractor, images: np.ndarray, batch_size: int = 64
) -> Activations:
    """Inception outputs for uint8 NHWC ``images``, in batches (float32 on the CPU)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    device = next(extractor.parameters()).device
    parts: dict[str, list[np.ndarray]] = {"pool": [], "spatial": [], "logits": []}
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size])).to(device)
        out = extractor(batch.permute(0, 3, 1, 2))
        for name in parts:
            parts[name].append(getattr(out, name).float().cpu().numpy())
    return Activations(**{name: np.concatenate(chunks) for name, chunks in parts.items()})


def reference_statistics(path: PathLike, activations: Activations | None = None) -> tuple[GaussianStats, GaussianStats]:
    """(pool_3 stats, spatial stats) of a reference batch: stored ``mu/sigma``, ``mu_s/sigma_s`` if present."""
    with np.load(path) as data:
        if "mu" in data.files:
            missing = {"sigma", "mu_s", "sigma_s"} - set(data.files)
            if missing:
                raise ValueError(f"{path}: has 'mu' but lacks {sorted(missing)}")
            return GaussianStats(data["mu"], data["sigma"]), GaussianStats(data["mu_s"], data["sigma_s"])
    if activations is None:
        raise ValueError(f"{path} stores no statistics: pass its activations")
    return GaussianStats.from_features(activations.pool), GaussianStats.from_features(activations.spatial)


def evaluate_batches(
    sample_path: PathLike,
    reference_path: PathLike,
    extractor: InceptionFeatureExtractor,
    *,
    batch_size: int = 64,
    k: int = 3,
    split_size: int = 5000,
) -> dict[str, Any]:
    """FID, sFID, Inception Score, precision and recall of ``sample_path`` against ``reference_path``."""
    ref_images = read_npz_images(reference_path)
    sample_images = read_npz_images(sample_path)
    ref_acts = compute_activations(extractor, ref_images, batch_size)
    sample_acts = compute_activations(extractor, sample_images, batch_size)
    ref_stats, ref_spatial = reference_statistics(reference_path, ref_acts)
    sample_stats = GaussianStats.from_features(sample_acts.pool)
    sample_spatial = GaussianStats.from_features(sample_acts.spatial)
    device = next(extractor.parameters()).device  # 50k×50k distances: use the accelerator when there is one
    precision, recall = manifold_precision_recall(ref_acts.pool, sample_acts.pool, k=k, device=device)
    return {
        "fid": sample_stats.frechet_distance(ref_stats),
        "sfid": sample_spatial.frechet_distance(ref_spatial),
        "inception_score": inception_score(sample_acts.logits, split_size),
        "precision": precision,
        "recall": recall,
        "num_samples": int(len(sample_images)),
        "num_reference": int(len(ref_images)),
        "sample_resolution": list(sample_images.shape[1:3]),
        "reference_resolution": list(ref_images.shape[1:3]),
    }
