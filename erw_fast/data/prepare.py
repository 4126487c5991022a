"""Preprocessing: images → ADM centre crop → VAE moments (+ image bytes, label, optional teacher features) → shards.

Sample ``i`` is the ``i``-th image of the source listing (ImageFolder: classes in sorted folder order, files sorted
within each class, as torchvision's ``ImageFolder``; or a file list in its own order). Shard ``k`` holds samples
``[k·S, (k+1)·S)``; rank ``r`` of ``W`` writes the shards with ``k % W == r`` (torchrun's ``RANK``/``WORLD_SIZE`` or
explicit options), each on its own device, without talking to the others.

Resume: a shard is finished once its tar and index have been renamed into place *and* its completion record
``shards/shard-XXXXXX.json`` (counts, size, sha256) exists; a rerun skips finished shards and rewrites the others
(a killed run's shard ``.tmp`` files are overwritten; its hidden ``.tmp-*`` files are never read). ``plan.json``
pins the settings and the source listing: a rerun with different ones is refused instead of mixing two datasets,
unless no shard is finished yet (then the plan is replaced). It is written once the VAE (and encoder) loaded, so a
VAE that cannot be had leaves nothing pinned. Whichever rank finds every shard finished writes ``manifest.json`` (a
rerun of any rank finalises a dataset whose last rank died after its last shard).

Unreadable images: ``on_error="raise"`` stops naming the file; ``"skip"`` keeps the sample's slot (the index space
and the shard boundaries stay those of the listing) with a black image and NaN moments, and records it in the
shard's completion record and the manifest's ``skipped`` list, which the training loaders never draw from.
``check_images`` decodes this rank's pending images before anything is pinned, loaded or written, and lists every
unreadable one at once. On SIGTERM/SIGUSR1 a rank stops at the next batch (the shard in progress is dropped,
finished ones are kept) and reports it (``PrepareResult.stopped``; the CLI exits 128 + the signal); the image
workers ignore those signals.

VAE batches never straddle shards, so a shard's bytes do not depend on where a previous run stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from erw_fast.atomic import atomic_write_bytes
from erw_fast.config import flatten_dotted
from erw_fast.data.images import IMAGE_FORMATS, IMAGE_MEMBER, center_crop_arr, encode_image, load_rgb
from erw_fast.data.shards import (
    MEMBER_FEATURES,
    MEMBER_LABEL,
    MEMBER_MOMENTS,
    MEMBER_MOMENTS_FLIP,
    SHARD_DIR,
    DataError,
    Manifest,
    ShardEntry,
    ShardWriter,
    npy_bytes,
    sample_key,
    sha256_file,
    shard_name,
)
from erw_fast.data.vae import DEFAULT_VAE, encode_moments, load_vae, vae_info
from erw_fast.stop_signals import StopSignals, children_inherit_blocked, loader_worker_init

log = logging.getLogger(__name__)

PLAN_NAME = "plan.json"
SOURCES_NAME = "sources.tsv"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".gif")


# ----------------------------------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class SourceListing:
    root: str  # paths are relative to this
    paths: list[str]
    labels: list[int]
    classes: list[str]
    kind: str  # "folder" | "list"

    def __len__(self) -> int:
        return len(self.paths)

    def digest(self) -> str:
        h = hashlib.sha256()
        for p, y in zip(self.paths, self.labels, strict=True):
            h.update(f"{p}\t{y}\n".encode())
        return h.hexdigest()


def scan_image_folder(root: str | os.PathLike[str]) -> SourceListing:
    """One sub-folder per class (class index = sorted folder order), image files found recursively and sorted."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise DataError(f"{root}: not a directory")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DataError(f"{root}: no class sub-folders (expected an ImageNet-style folder)")
    paths, labels = [], []
    for label, cls in enumerate(classes):
        for dirpath, dirnames, filenames in sorted(os.walk(os.path.join(root, cls), followlinks=True)):
            dirnames.sort()
            for fname in sorted(filenames):
                if fname.lower().endswith(IMAGE_EXTENSIONS):
                    paths.append(os.path.relpath(os.path.join(dirpath, fname), root))
                    labels.append(label)
    if not paths:
        raise DataError(f"{root}: no image files under the class folders")
    return SourceListing(root, paths, labels, classes, "folder")


def read_file_list(
    list_path: str | os.PathLike[str], root: str | os.PathLike[str] | None = None, num_classes: int | None = None
) -> SourceListing:
    """``path label`` per line (whitespace or comma separated; ``#`` comments; an optional CSV header line).

    Relative paths are resolved against ``root`` (default: the list's directory). Classes are ``0 … max label``
    (or ``num_classes``), named by their index.
    """
    list_path = os.fspath(list_path)
    base = os.fspath(root) if root is not None else os.path.dirname(os.path.abspath(list_path))
    paths, labels = [], []
    with open(list_path) as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.rsplit(",", 1) if "," in line else line.rsplit(None, 1)
            if len(parts) != 2:
                raise DataError(f"{list_path}:{lineno}: expected 'path label', got {line!r}")
            path, label = parts[0].strip(), parts[1].strip()
            if not label.lstrip("-").isdigit():
                if not paths:  # a header line
                    continue
                raise DataError(f"{list_path}:{lineno}: label {label!r} is not an integer")
            if int(label) < 0:
                raise DataError(f"{list_path}:{lineno}: negative label {label}")
            paths.append(path)
            labels.append(int(label))
    if not paths:
        raise DataError(f"{list_path}: no entries")
    n_cls = max(labels) + 1 if num_classes is None else num_classes
    if max(labels) >= n_cls:
        raise DataError(f"{list_path}: label {max(labels)} ≥ num_classes {n_cls}")
    return SourceListing(base, paths, labels, [str(k) for k in range(n_cls)], "list")


# ----------------------------------------------------------------------------------------------------- options


@dataclass
class PrepareOptions:
    image_size: int = 256
    samples_per_shard: int = 1000
    image_format: str = "png"
    jpeg_quality: int = 95
    png_compress_level: int = 1
    vae: str = DEFAULT_VAE  # hub name or local directory (recorded in the manifest)
    flip_moments: bool = False  # also store the moments of the horizontally flipped image
    encoder: str | None = None  # precompute this teacher's features (erw_fast.encoders name)
    encoder_cls_token: bool = False  # store its CLS token first, then the patch tokens (REG's target and class token)
    encoder_weights: str | None = None
    encoder_pretrained: bool = True
    batch_size: int = 32  # VAE / encoder batch
    num_workers: int = 4  # image decode + crop + encode processes
    device: str | None = None  # default: cuda:LOCAL_RANK if CUDA exists, else cpu
    rank: int | None = None  # default: $RANK or 0
    world_size: int | None = None  # default: $WORLD_SIZE or 1
    max_shards: int | None = None  # stop after writing this many shards (chunked jobs); rerun to continue
    on_error: str = "raise"  # an unreadable image stops (raise) or is left out and recorded (skip); not pinned
    check_images: bool = False  # decode this rank's pending images first and list every unreadable one
    verify_existing: bool = False  # re-hash finished shards before trusting them
    progress: bool = True

    def settings(self) -> dict[str, Any]:
        """What determines the bytes of the dataset (pinned in plan.json)."""
        return {
            "image_size": self.image_size,
            "samples_per_shard": self.samples_per_shard,
            "image_format": self.image_format,
            "image_encoding": self.image_encoding(),
            "vae": self.vae,
            "flip_moments": self.flip_moments,
            "encoder": self.encoder,
            **({"encoder_cls_token": True} if self.encoder_cls_token else {}),
        }

    def image_encoding(self) -> dict[str, Any]:
        if self.image_format == "jpg":
            return {"jpeg_quality": self.jpeg_quality}
        if self.image_format == "png":
            return {"png_compress_level": self.png_compress_level}
        return {}

    def validate(self) -> None:
        if self.image_format not in IMAGE_FORMATS:
            raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {self.image_format!r}")
        if self.image_size < 8 or self.image_size % 8:
            raise ValueError(f"image_size must be a positive multiple of 8 (the VAE's stride), got {self.image_size}")
        for name in ("samples_per_shard", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {self.on_error!r}")


@dataclass
class PrepareResult:
    output: Path
    num_shards: int
    written: list[str] = field(default_factory=list)  # shards written by this call
    skipped: list[str] = field(default_factory=list)  # this rank's shards found finished
    complete: bool = False  # manifest.json written (every shard finished)
    unreadable: list[dict[str, Any]] = field(default_factory=list)  # images left out by this call (on_error skip)
    stopped: str | None = None  # the signal this call stopped for (SIGTERM, SIGUSR1), its shard in progress dropped


# ----------------------------------------------------------------------------------------------------- workers


class _SourceImages(torch.utils.data.Dataset):
    """Global index → (index, cropped HWC uint8, stored image bytes, why it is unreadable or None); runs in
    DataLoader workers. An unreadable image raises, or (``on_error="skip"``) comes back black with its reason;
    ``check_only`` decodes and returns only (index, None, b"", reason)."""

    def __init__(self, listing: SourceListing, opts: PrepareOptions, check_only: bool = False) -> None:
        self.root, self.paths = listing.root, listing.paths
        self.size, self.fmt, self.skip, self.check_only = opts.image_size, opts.image_format, opts.on_error, check_only
        self.encoding = {"jpeg_quality": opts.jpeg_quality, "png_compress_level": opts.png_compress_level}

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, np.ndarray | None, bytes, str | None]:
        path = os.path.join(self.root, self.paths[index])
        try:
            arr = center_crop_arr(load_rgb(path), self.size)
        except Exception as exc:
            why = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            if self.check_only:
                return index, None, b"", why
            if self.skip != "skip":
                raise DataError(f"sample {index} ({path}): cannot read the image: {exc} (erw-prepare --on-error "
                                "skip leaves unreadable images out and records them)") from exc
            arr = np.zeros((self.size, self.size, 3), np.uint8)  # keeps the slot; its moments become NaN
            return index, arr, encode_image(arr, self.fmt, **self.encoding), why
        if self.check_only:
            return index, None, b"", None
        return index, arr, encode_image(arr, self.fmt, **self.encoding), None


def _collate(items: list[tuple[int, np.ndarray, bytes, str | None]]
             ) -> tuple[list[int], torch.Tensor, list[bytes], list[str | None]]:
    idx = [i for i, _, _, _ in items]
    images = torch.from_numpy(np.stack([a for _, a, _, _ in items])).permute(0, 3, 1, 2)
    return idx, images, [b for _, _, b, _ in items], [w for _, _, _, w in items]


def _collate_check(items: list[tuple[int, Any, bytes, str | None]]) -> list[tuple[int, str | None]]:
    return [(i, why) for i, _, _, why in items]


def _image_loader(dataset: torch.utils.data.Dataset, batches: list[list[int]], opts: PrepareOptions,
                  collate: Callable[[list[Any]], Any]) -> torch.utils.data.DataLoader:
    """Decode workers that ignore the stop signals (the main process stops at a batch boundary)."""
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=opts.num_workers,
                                       collate_fn=collate, prefetch_factor=4 if opts.num_workers else None,
                                       worker_init_fn=loader_worker_init)


def check_images(listing: SourceListing, opts: PrepareOptions, shards: Sequence[int]) -> list[dict[str, Any]]:
    """Decode every image of ``shards``: the unreadable ones as ``{"index", "path", "error"}``."""
    n, per = len(listing), opts.samples_per_shard
    batches = list(_shard_batches(shards, n, per, max(opts.batch_size, 64)))
    loader = _image_loader(_SourceImages(listing, opts, check_only=True), batches, opts, _collate_check)
    with children_inherit_blocked():
        it = iter(loader)
    return [{"index": i, "path": listing.paths[i], "error": why} for batch in it for i, why in batch if why]


def _shard_batches(shards: Sequence[int], n: int, per_shard: int, batch: int) -> Iterator[list[int]]:
    """Index lists aligned to shard starts (a batch never straddles two shards)."""
    for k in shards:
        start, end = k * per_shard, min((k + 1) * per_shard, n)
        for b in range(start, end, batch):
            yield list(range(b, min(b + batch, end)))


# ----------------------------------------------------------------------------------------------------- state


def _paths(out: Path, k: int) -> tuple[Path, Path, Path]:
    name = shard_name(k)
    d = out / SHARD_DIR
    return d / f"{name}.tar", d / f"{name}.idx", d / f"{name}.json"


def _read_record(out: Path, k: int, verify: bool) -> dict[str, Any] | None:
    """The completion record of shard ``k`` if the shard is finished and intact, else None."""
    tar, idx, rec = _paths(out, k)
    if not (rec.is_file() and tar.is_file() and idx.is_file()):
        return None
    try:
        record = json.loads(rec.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if tar.stat().st_size != record.get("bytes"):
        return None
    if verify and sha256_file(tar) != record.get("sha256"):
        log.warning("%s: checksum differs from its completion record; rewriting it", tar.name)
        return None
    return record


def _finished_shards(out: Path) -> list[Path]:
    return sorted((out / SHARD_DIR).glob("shard-*.json"))


def _check_plan(out: Path, plan: dict[str, Any]) -> str | None:
    """None when ``plan`` may be (or is) the directory's plan; a description of the change when it replaces a
    plan no shard was finished under. Refused (DataError) once a shard is finished under another plan."""
    path = out / PLAN_NAME
    if not path.is_file():
        return None
    old, new = (flatten_dotted(p, empty_as_leaf=True) for p in (json.loads(path.read_text()), plan))
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if not diff:
        return None
    change = "; ".join(f"{k}: was {old.get(k)!r}, now {new.get(k)!r}" for k in diff[:4])
    if _finished_shards(out):
        raise DataError(
            f"{out} was started with different settings or sources ({change}) and {len(_finished_shards(out))} "
            "shard(s) are finished under them. Use a new output directory, or the original settings to resume "
            "(unreadable images: --on-error skip leaves them out without changing the plan).")
    return change


def _pin_plan(out: Path, plan: dict[str, Any], listing: SourceListing, rank: int, replacing: bool) -> None:
    path = out / PLAN_NAME
    if replacing or not path.is_file():
        atomic_write_bytes(path, (json.dumps(plan, indent=1, sort_keys=True) + "\n").encode())
    if rank == 0 or replacing:
        _write_sources(out, listing, replacing)


def _write_sources(out: Path, listing: SourceListing, replace: bool = False) -> None:
    path = out / SOURCES_NAME
    if path.is_file() and not replace:
        return
    lines = [f"{sample_key(i)}\t{y}\t{p}\n" for i, (p, y) in enumerate(zip(listing.paths, listing.labels, strict=True))]
    atomic_write_bytes(path, "".join(lines).encode())


def finalize(out: str | os.PathLike[str], *, verify: bool = False) -> Manifest | None:
    """Write ``manifest.json`` if every planned shard is finished; returns it (None if shards are missing)."""
    out = Path(out)
    plan = json.loads((out / PLAN_NAME).read_text())
    n, per = plan["num_samples"], plan["settings"]["samples_per_shard"]
    num_shards = -(-n // per)
    records = []
    for k in range(num_shards):
        rec = _read_record(out, k, verify)
        if rec is None:
            return None
        records.append(rec)
    first = records[0]
    for rec in records[1:]:
        for key in ("vae", "moments_shape", "features", "members"):
            if rec[key] != first[key]:
                raise DataError(f"{rec['name']}: {key} {rec[key]} differs from {first['name']}'s {first[key]}")
    s = plan["settings"]
    skipped = sorted((e for r in records for e in r.get("skipped", [])), key=lambda e: e["index"])
    manifest = Manifest(
        num_samples=n,
        num_classes=len(plan["classes"]),
        classes=plan["classes"],
        image_size=s["image_size"],
        image_format=s["image_format"],
        members=first["members"],
        samples_per_shard=per,
        moments_shape=first["moments_shape"],
        vae=first["vae"],
        flip_moments=s["flip_moments"],
        shards=[ShardEntry(**{k: r[k] for k in ShardEntry.__dataclass_fields__}) for r in records],
        features=first["features"],
        image_encoding=s["image_encoding"],
        source=plan["source"],
        skipped=skipped,
    )
    manifest.validate(str(out / "manifest.json"))
    manifest.save(out)
    return manifest


# ----------------------------------------------------------------------------------------------------- main


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


def _default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", _env_int("LOCAL_RANK", 0))
    return torch.device("cpu")


def prepare(
    listing: SourceListing,
    output: str | os.PathLike[str],
    opts: PrepareOptions | None = None,
    *,
    vae: nn.Module | None = None,
    encoder: nn.Module | None = None,
    echo: Callable[[str], None] | None = None,
) -> PrepareResult:
    """Write (or resume writing) this rank's shards of ``listing`` into ``output``; finalise when all are done.

    ``vae``/``encoder``: already-built modules (tests, notebooks); by default ``opts.vae`` is loaded with
    diffusers and ``opts.encoder`` with ``erw_fast.encoders.load_encoder``.
    """
    opts = opts or PrepareOptions()
    opts.validate()
    echo = echo or (lambda msg: print(msg, file=sys.stderr, flush=True))
    rank = opts.rank if opts.rank is not None else _env_int("RANK", 0)
    world = opts.world_size if opts.world_size is not None else _env_int("WORLD_SIZE", 1)
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside world size {world}")
    out = Path(output)
    (out / SHARD_DIR).mkdir(parents=True, exist_ok=True)
    n, per = len(listing), opts.samples_per_shard
    num_shards = -(-n // per)
    plan = {
        "settings": opts.settings(),
        "num_samples": n,
        "classes": listing.classes,
        "source": {"kind": listing.kind, "listing_sha256": listing.digest()},
    }
    replacing = _check_plan(out, plan)  # refused here when finished shards would mix two datasets

    mine = [k for k in range(num_shards) if k % world == rank]
    result = PrepareResult(out, num_shards)
    pending = []
    for k in mine:
        if _read_record(out, k, opts.verify_existing) is None:
            pending.append(k)
        else:
            result.skipped.append(shard_name(k))
    if opts.max_shards is not None:
        pending = pending[: opts.max_shards]
    echo(f"erw-prepare rank {rank}/{world}: {n} samples, {num_shards} shards; this rank: {len(mine)} shards, "
         f"{len(result.skipped)} already finished, {len(pending)} to write")

    if pending and opts.check_images:
        bad = check_images(listing, opts, pending)
        echo(f"checked the images of {len(pending)} shard(s): {len(bad)} unreadable")
        if bad and opts.on_error == "raise":
            raise DataError(f"{len(bad)} unreadable image(s) under {listing.root}: " + "; ".join(
                f"{b['path']} ({b['error']})" for b in bad[:10]) + ("; …" if len(bad) > 10 else "")
                + ". Nothing was written: fix or remove them (the listing may change while no shard is finished), "
                "or rerun with --on-error skip to leave them out (recorded in the manifest)")
    if pending:  # loaded before the plan is pinned: a VAE that cannot be had must not pin it
        vae, encoder = _load_models(opts, vae, encoder)
    if replacing:
        echo(f"replacing the plan of {out}, under which no shard was finished ({replacing})")
    _pin_plan(out, plan, listing, rank, replacing is not None)
    if pending:
        _write_shards(listing, out, opts, pending, vae, encoder, result, echo, rank)
        if result.stopped:
            echo(f"erw-prepare rank {rank}: {result.stopped} received: stopped after {len(result.written)} shard(s) "
                 "(the one in progress is dropped); rerun the same command to resume")
            return result
    manifest = finalize(out)
    result.complete = manifest is not None
    if result.complete:
        echo(f"dataset complete: {out / 'manifest.json'} ({n} samples, {num_shards} shards)")
    return result


def _load_models(opts: PrepareOptions, vae: nn.Module | None,
                 encoder: nn.Module | None) -> tuple[nn.Module, nn.Module | None]:
    device = torch.device(opts.device) if opts.device else _default_device()
    if vae is None:
        vae = load_vae(opts.vae, device)
    if encoder is None and opts.encoder:
        from erw_fast.encoders import load_encoder

        encoder = load_encoder(opts.encoder, resolution=opts.image_size, pretrained=opts.encoder_pretrained,
                               weights_path=opts.encoder_weights, device=device)
    if encoder is not None and not opts.encoder:
        raise ValueError("an encoder module was given without opts.encoder (its name goes into the manifest)")
    if opts.encoder_cls_token and not opts.encoder:
        raise ValueError("encoder_cls_token (--encoder-cls-token) needs an encoder (--encoder)")
    return vae, encoder


def _write_shards(
    listing: SourceListing,
    out: Path,
    opts: PrepareOptions,
    pending: list[int],
    vae: nn.Module,
    encoder: nn.Module | None,
    result: PrepareResult,
    echo: Callable[[str], None],
    rank: int,
) -> None:
    device = torch.device(opts.device) if opts.device else _default_device()
    vae_device = next(vae.parameters()).device
    info = vae_info(vae, opts.vae)
    source = getattr(encoder, "weights_source", None)  # an Encoder says where its weights came from
    feature_weights = ((not source.startswith("random init"), source) if isinstance(source, str)
                       else (bool(opts.encoder_pretrained), "a module given by the caller"))
    n, per = len(listing), opts.samples_per_shard
    loader = _image_loader(_SourceImages(listing, opts), list(_shard_batches(pending, n, per, opts.batch_size)),
                           opts, _collate)
    total = sum(min((k + 1) * per, n) - k * per for k in pending)
    bar = None
    if opts.progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="img", desc="erw-prepare", dynamic_ncols=True, file=sys.stderr)
    writer: ShardWriter | None = None
    current = -1
    skipped: list[dict[str, Any]] = []  # this shard's unreadable images
    t0 = time.perf_counter()
    stops = StopSignals(["SIGTERM", "SIGUSR1"])
    try:
        for indices, images, encoded, unreadable in _until(loader, stops):
            k = indices[0] // per
            if k != current:
                tar, idx, _ = _paths(out, k)
                writer, current, skipped = ShardWriter(tar, idx), k, []
            moments, flipped = encode_moments(vae, images.to(vae_device), flip=opts.flip_moments)
            moments16 = moments.to(torch.float16).cpu().numpy()
            flipped16 = flipped.to(torch.float16).cpu().numpy() if flipped is not None else None
            feats16 = None
            if encoder is not None:
                with torch.no_grad():
                    feats = encoder(images.to(device), with_cls=True) if opts.encoder_cls_token else \
                        encoder(images.to(device))
                    feats16 = feats.to(torch.float16).cpu().numpy()
            for j, why in enumerate(unreadable):
                if why is not None:  # a slot no loader draws (NaN would be refused even if one did)
                    for array in (moments16, flipped16, feats16):
                        if array is not None:
                            array[j] = np.nan
                    skipped.append({"index": indices[j], "path": listing.paths[indices[j]], "error": why})
                    echo(f"skipped unreadable image {listing.paths[indices[j]]} (sample {indices[j]}): {why}")
            for j, i in enumerate(indices):
                members = [(MEMBER_LABEL, str(listing.labels[i]).encode()), (MEMBER_MOMENTS, npy_bytes(moments16[j]))]
                if flipped16 is not None:
                    members.append((MEMBER_MOMENTS_FLIP, npy_bytes(flipped16[j])))
                members.append((IMAGE_MEMBER[opts.image_format], encoded[j]))
                if feats16 is not None:
                    members.append((MEMBER_FEATURES, npy_bytes(feats16[j])))
                writer.add(sample_key(i), members)
            if bar is not None:
                bar.update(len(indices))
            if indices[-1] + 1 == min((k + 1) * per, n):  # last batch of the shard
                members_order = [m for m, _ in members]  # the same for every sample (the writer checks)
                shard_info = writer.commit()
                writer = None
                record = {
                    "name": shard_name(k),
                    "tar": f"{SHARD_DIR}/{shard_name(k)}.tar",
                    "index": f"{SHARD_DIR}/{shard_name(k)}.idx",
                    "first_index": k * per,
                    "num_samples": shard_info.num_samples,
                    "bytes": shard_info.bytes,
                    "sha256": shard_info.sha256,
                    "members": members_order,
                    "moments_shape": list(moments16.shape[1:]),
                    "vae": {**info, "latent_size": int(moments16.shape[-1])},
                    "features": (
                        {"encoder": opts.encoder, "shape": list(feats16.shape[1:]), "dtype": "float16",
                         # what training checks data.features against (encoder.resolution / pretrained)
                         "resolution": opts.image_size, "pretrained": feature_weights[0],
                         "weights": feature_weights[1],
                         **({"cls_token": True} if opts.encoder_cls_token else {})}
                        if feats16 is not None else None
                    ),
                    "skipped": skipped,
                }
                atomic_write_bytes(_paths(out, k)[2], (json.dumps(record, indent=1, sort_keys=True) + "\n").encode())
                result.written.append(shard_name(k))
                result.unreadable.extend(skipped)
                rate = sum(min((j + 1) * per, n) - j * per for j in pending[: len(result.written)])
                rate /= max(time.perf_counter() - t0, 1e-9)
                msg = (f"{shard_name(k)}: {shard_info.num_samples} samples, {shard_info.bytes / 2**20:.1f} MiB, "
                       f"sha256 {shard_info.sha256[:12]}… ({len(result.written)}/{len(pending)}, {rate:.1f} img/s)")
                if bar is not None:
                    bar.write(msg)
                else:
                    echo(msg)
        result.stopped = stops.received.name if stops.received is not None else None
    finally:
        if writer is not None:
            writer.abort()
        if bar is not None:
            bar.close()


def _until(loader: torch.utils.data.DataLoader, stops: StopSignals) -> Iterator[Any]:
    """The loader's batches until a stop signal arrives (handled while this runs; looked at between batches)."""
    with stops:
        with children_inherit_blocked():
            batches = iter(loader)  # the workers are forked here
        for batch in batches:
            if stops.received is not None:
                return
            yield batch
