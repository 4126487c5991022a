"""``erw-prepare``: ImageNet-style folder or file list → latent shards (see ``erw_fast.data.prepare``).

    erw-prepare /data/imagenet/train /data/in256                                  # one process
    torchrun --nproc_per_node 8 -m erw_fast.cli.prepare /data/imagenet/train /data/in256 --flip-moments
    erw-prepare --list train.txt --root /data/imgs /data/in256 --image-format jpg  # "path label" lines

Rerun the same command to resume; finished shards are kept.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from erw_fast.data.images import IMAGE_FORMATS
from erw_fast.data.prepare import PrepareOptions, prepare, read_file_list, scan_image_folder
from erw_fast.data.shards import DataError
from erw_fast.data.vae import DEFAULT_VAE


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="erw-prepare",
        description="Preprocess images into webdataset latent shards (ADM centre crop, VAE moments, images, labels).",
    )
    p.add_argument("source", nargs="?", help="ImageNet-style folder (one sub-folder per class); omit with --list")
    p.add_argument("output", help="output directory (created; rerun with the same one to resume)")
    p.add_argument("--list", dest="file_list", help="file list with 'path label' lines instead of a folder")
    p.add_argument("--root", help="base directory of relative paths in --list (default: the list's directory)")
    p.add_argument("--num-classes", type=int, help="class count for --list (default: max label + 1)")
    p.add_argument("--image-size", type=int, default=256, help="output side in px (256 or 512 for the paper)")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--image-format", choices=IMAGE_FORMATS, default="png")
    p.add_argument("--jpeg-quality", type=int, default=95)
    p.add_argument("--png-compress-level", type=int, default=1, choices=range(10), metavar="0-9")
    p.add_argument("--vae", default=DEFAULT_VAE, help="diffusers AutoencoderKL: hub name or local directory")
    p.add_argument("--flip-moments", action="store_true", help="also store moments of the flipped image")
    p.add_argument("--encoder", help="also store this teacher's features (e.g. dinov2-vit-b)")
    p.add_argument("--encoder-cls-token", action="store_true",
                   help="store --encoder's CLS token before its patch tokens (REG: run.mode reg / erw_reg)")
    p.add_argument("--encoder-weights", help="local weights for --encoder")
    p.add_argument("--encoder-random", action="store_true", help="random encoder weights (testing only)")
    p.add_argument("--batch-size", type=int, default=32, help="VAE / encoder batch")
    p.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1), help="image decode processes")
    p.add_argument("--device", help="default: cuda:$LOCAL_RANK if CUDA is available, else cpu")
    p.add_argument("--rank", type=int, help="default: $RANK (torchrun) or 0")
    p.add_argument("--world-size", type=int, help="default: $WORLD_SIZE (torchrun) or 1")
    p.add_argument("--max-shards", type=int, help="write at most this many shards, then stop (resume later)")
    p.add_argument("--verify-existing", action="store_true", help="re-hash finished shards before keeping them")
    p.add_argument("--on-error", choices=("raise", "skip"), default="raise",
                   help="an unreadable image stops erw-prepare (raise), or is left out and recorded in the manifest "
                        "(skip; the training loaders never draw it)")
    p.add_argument("--check-images", action="store_true",
                   help="decode every image of this rank's pending shards first and list all unreadable ones, "
                        "before the VAE is loaded or anything is written")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if (args.source is None) == (args.file_list is None):
        print("erw-prepare: give either a source folder or --list FILE (not both)", file=sys.stderr)
        return 2
    opts = PrepareOptions(
        image_size=args.image_size, samples_per_shard=args.samples_per_shard, image_format=args.image_format,
        jpeg_quality=args.jpeg_quality, png_compress_level=args.png_compress_level, vae=args.vae,
        flip_moments=args.flip_moments, encoder=args.encoder, encoder_cls_token=args.encoder_cls_token,
        encoder_weights=args.encoder_weights,
        encoder_pretrained=not args.encoder_random, batch_size=args.batch_size, num_workers=args.num_workers,
        device=args.device, rank=args.rank, world_size=args.world_size, max_shards=args.max_shards,
        verify_existing=args.verify_existing, progress=not args.no_progress, on_error=args.on_error,
        check_images=args.check_images,
    )
    try:
        if args.file_list:
            listing = read_file_list(args.file_list, args.root, args.num_classes)
        else:
            listing = scan_image_folder(args.source)
        result = prepare(listing, args.output, opts)
    except (DataError, ValueError, ImportError, OSError) as exc:  # OSError: a VAE not found, a full disk
        print(f"erw-prepare: error: {exc}", file=sys.stderr)
        return 1
    if result.stopped:  # SIGTERM/SIGUSR1: finished shards kept; 128 + the signal, as a shell reports it
        return 128 + int(signal.Signals[result.stopped])
    return 0


if __name__ == "__main__":
    sys.exit(main())
