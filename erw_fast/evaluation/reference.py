"""ADM-style reference batches for custom data: ``erw-eval make-ref``.

A reference batch is what ``erw-eval --ref`` (and openai/guided-diffusion's ``evaluator.py``) reads: ``arr_0``, uint8
N×H×W×3 real images, and the Inception statistics FID and sFID compare with, ``mu``/``sigma`` of the 2048-d
``pool_3`` activations and ``mu_s``/``sigma_s`` of the 2023-d spatial ones (``mixed_6/conv`` 7 channels × 17²), in
float64 like ADM's files. ``arr_1`` holds the labels (ADM's ``*_labeled.npz`` do too) and ``protocol`` a JSON string
of how the batch was made (source, N, resolution, crop, Inception weights); ADM's evaluator reads only the keys it
knows, so the file stays a drop-in ADM reference batch. The same JSON is written beside it.

Sources: an image folder (ImageNet-style class sub-folders, or a flat folder: every image, label 0), centre-cropped
and resized exactly as ADM and ``erw-prepare`` do (``center_crop_arr``), or a prepared shard directory (its stored
images, already cropped by ``erw-prepare`` at the manifest's size). N images are drawn without replacement with a
seeded generator (all of them when N is not given), in index order.
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from erw_fast.evaluation.evaluator import Activations, compute_activations
from erw_fast.evaluation.fid import GaussianStats
from erw_fast.evaluation.inception import InceptionFeatureExtractor

__all__ = ["ReferenceImages", "build_reference", "load_reference_images", "reference_arrays"]

PathLike = str | os.PathLike[str]
PROTOCOL_FORMAT = "erw_fast.reference_batch/1"


@dataclass
class ReferenceImages:
    images: np.ndarray  # uint8 (N, H, W, 3)
    labels: np.ndarray  # int64 (N,)
    protocol: dict[str, Any]  # source, selection and crop


def _choose(n: int, num: int | None, seed: int) -> np.ndarray:
    if num is None or num >= n:
        return np.arange(n)
    if num < 2:
        raise ValueError(f"--num-samples must be ≥ 2 (a covariance needs two images), got {num}")
    return np.sort(np.random.default_rng(seed).choice(n, size=num, replace=False))


def _folder_listing(root: Path) -> tuple[list[str], list[int], str]:
    from erw_fast.data.prepare import IMAGE_EXTENSIONS, scan_image_folder

    if any(e.is_dir() and not e.name.startswith(".") for e in os.scandir(root)):
        listing = scan_image_folder(root)
        return [os.path.join(root, p) for p in listing.paths], list(listing.labels), "class sub-folders"
    paths = sorted(str(p) for p in root.iterdir() if p.name.lower().endswith(IMAGE_EXTENSIONS))
    if not paths:
        raise ValueError(f"{root}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return paths, [0] * len(paths), "flat folder (label 0)"


def _from_folder(root: Path, image_size: int | None, num: int | None, seed: int) -> ReferenceImages:
    from erw_fast.data.images import center_crop_arr, load_rgb

    if image_size is None:
        raise ValueError("--image-size is needed for an image folder (the training resolution, e.g. 256)")
    paths, labels, layout = _folder_listing(root)
    pick = _choose(len(paths), num, seed)
    images = np.stack([center_crop_arr(load_rgb(paths[i]), image_size) for i in pick])
    return ReferenceImages(images, np.asarray(labels, dtype=np.int64)[pick], {
        "source": {"kind": "image folder", "path": str(root.resolve()), "layout": layout, "images": len(paths)},
        "crop": f"ADM center_crop_arr to {image_size} px (BOX halving, BICUBIC resize, centre crop)",
    })


def _from_shards(root: Path, image_size: int | None, num: int | None, seed: int) -> ReferenceImages:
    from erw_fast.data.images import decode_image
    from erw_fast.data.shards import Manifest, ShardSet

    man = Manifest.load(root)
    if image_size is not None and image_size != man.image_size:
        raise ValueError(f"--image-size {image_size}: {root} stores {man.image_size} px images (leave it unset)")
    skipped = {int(s["index"]) for s in man.skipped}  # slots erw-prepare could not fill
    usable = np.array([i for i in range(man.num_samples) if i not in skipped], dtype=np.int64)
    pick = usable[_choose(len(usable), num, seed)]
    shards = ShardSet(root, verify="size")
    try:
        member = man.image_member
        images, labels = [], []
        for i in pick:
            got = shards.read(int(i), ["cls", member])
            img = got[member] if member == "img.npy" else decode_image(got[member])
            images.append(np.asarray(img, dtype=np.uint8))
            labels.append(shards.label(int(i), got["cls"]))
    finally:
        shards.close()
    return ReferenceImages(np.stack(images), np.asarray(labels, dtype=np.int64), {
        "source": {"kind": "prepared shards", "path": str(root.resolve()), "images": len(usable),
                   "image_format": man.image_format, "source_of_shards": man.source or None},
        "crop": f"as stored by erw-prepare: ADM center_crop_arr to {man.image_size} px"
                + (" then JPEG (lossy)" if man.image_format == "jpg" else ""),
    })


def load_reference_images(source: PathLike, *, image_size: int | None = None, num_samples: int | None = None,
                          seed: int = 0) -> ReferenceImages:
    """The images of a reference batch from an image folder or a prepared shard directory (``manifest.json``)."""
    root = Path(source)
    if not root.is_dir():
        raise FileNotFoundError(f"reference source not found (an image folder or erw-prepare's output): {root}")
    build = _from_shards if (root / "manifest.json").is_file() else _from_folder
    ref = build(root, image_size, num_samples, seed)
    ref.protocol.update({"num_samples": int(len(ref.images)), "resolution": list(ref.images.shape[1:3]),
                         "selection": "all images" if num_samples is None or num_samples >= ref.protocol["source"]
                         ["images"] else f"{num_samples} drawn without replacement, numpy default_rng({seed}), "
                                         "index order"})
    return ref


def reference_arrays(acts: Activations) -> dict[str, np.ndarray]:
    """ADM's statistics keys from Inception activations: float64 mean and (N − 1)-normalised covariance."""
    pool, spatial = GaussianStats.from_features(acts.pool), GaussianStats.from_features(acts.spatial)
    return {"mu": pool.mu, "sigma": pool.sigma, "mu_s": spatial.mu, "sigma_s": spatial.sigma}


def build_reference(source: PathLike, out: PathLike, extractor: InceptionFeatureExtractor, *,
                    image_size: int | None = None, num_samples: int | None = None, seed: int = 0,
                    batch_size: int = 64, inception: dict[str, Any] | None = None,
                    echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Write the reference batch ``out`` (+ ``out`` with ``.json``); returns its protocol."""
    from erw_fast.atomic import atomic_write, atomic_write_text

    ref = load_reference_images(source, image_size=image_size, num_samples=num_samples, seed=seed)
    echo(f"reference: {len(ref.images)} images of {ref.images.shape[1]}x{ref.images.shape[2]} from "
         f"{ref.protocol['source']['path']}; Inception activations…")
    stats = reference_arrays(compute_activations(extractor, ref.images, batch_size))
    protocol = {"format": PROTOCOL_FORMAT, **ref.protocol,
                "inception": inception or {"weights": extractor.weights_source},
                "statistics": "mu/sigma: pool_3 (2048), mu_s/sigma_s: mixed_6/conv[:7] spatial (2023); float64, "
                              "covariance normalised by N − 1 (numpy.cov), as ADM's evaluator",
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(protocol, indent=2)
    atomic_write(out, lambda f: np.savez(f, arr_0=ref.images, arr_1=ref.labels, protocol=np.array(text), **stats))
    atomic_write_text(out.with_suffix(".json"), text + "\n")
    return protocol
