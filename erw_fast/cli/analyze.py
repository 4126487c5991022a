"""erw-analyze: CKNNA alignment of every SiT layer with the run's encoder(s) on held-out images, plus a chart.

Held-out data: the demo dataset drawn with a seed the run never trained on (the default for demo runs), the
images (and labels, if stored as ``arr_1``) of an ADM-style ``.npz`` (``--images``), encoded to latents with
``--vae``, or a prepared dataset (``--data DIR``, erw-prepare's output, e.g. of a validation folder): its stored
images and labels, and latents = posterior mean × the manifest's scale (the training latents without noise; no VAE
is loaded). From the run's own training shards the images are not held out: prepare a validation split for that.
Encoders come from the run's config (``encoder.names`` etc.); randomly initialised
ones are rebuilt from the same seed the trainer used, so a demo run is analysed against its actual teacher.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from erw_fast.cli import run_cli

HELD_OUT_SEED_OFFSET = 1_000_003  # demo data seed = run seed + this: never a training sample
ENCODER_SEED_OFFSET = 7919  # the trainer draws random (pretrained: false) encoders from run seed + 7919


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="erw-analyze", description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="checkpoint (run/reference/*.pt, run/checkpoints/*.pt)")
    p.add_argument("--out-dir", required=True, help="writes cknna.json and cknna.png")
    p.add_argument("--config", default=None, help="the run's config.yaml (default: found beside the checkpoint)")
    p.add_argument("--raw", action="store_true", help="analyse the raw weights instead of the EMA")
    p.add_argument("--images", default=None, help="held-out .npz (arr_0 uint8 NHWC, optional arr_1 labels)")
    p.add_argument("--data", default=None,
                   help="a prepared dataset directory (manifest.json): --num-samples of its images, seeded draw")
    p.add_argument("--vae", default="auto",
                   help="latent codec for --images: auto (toy for demo runs, else ema) | toy | ema | mse | local path")
    p.add_argument("--num-samples", type=int, default=512)
    p.add_argument("--t", type=float, nargs="+", default=[0.0, 0.25, 0.5], help="interpolant times to probe")
    p.add_argument("--topk", type=int, default=10, help="CKNNA neighbourhood size (platonic-rep: 10)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="seed of the noise ε in x_t")
    p.add_argument("--device", default="auto")
    return p


def _held_out(args: argparse.Namespace, loaded: Any, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(uint8 images N×3×H×W, latents, labels) of the held-out set."""
    from erw_fast.codecs import build_codec, choose_codec

    model, config = loaded.model, loaded.config
    if args.images is not None and args.data is not None:
        raise ValueError("give --images or --data, not both")
    if args.data is not None:
        return _from_shards(args, model)
    if args.images is None:
        if config is None or config.data.kind != "demo":
            raise ValueError("no held-out images: pass --data <prepared dataset> or --images <npz> (the run is not a "
                             "demo run)")
        from erw_fast.data import DemoShapesDataset

        data = DemoShapesDataset(
            num_samples=args.num_samples, num_classes=model.num_classes, image_size=config.data.image_size,
            latent_size=model.input_size, latent_channels=model.in_channels,
            seed=config.run.seed + HELD_OUT_SEED_OFFSET,
        )
        return data.images, data.latents, data.labels
    from erw_fast.evaluation import read_npz_images

    arr = read_npz_images(args.images)[: args.num_samples]
    images = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).contiguous()
    with np.load(args.images) as f:
        # Without stored labels the SiT is probed unconditionally (null class).
        labels = (torch.from_numpy(f["arr_1"][: len(images)]).long() if "arr_1" in f.files
                  else torch.full((len(images),), model.num_classes, dtype=torch.long))
    choice = choose_codec(args.vae, config, loaded.args)
    print(f"encoding --images: {choice.note}", file=sys.stderr)
    codec = build_codec(choice.name, device=device, image_size=images.shape[-1], latent_size=model.input_size,
                        latent_channels=model.in_channels, scale=choice.scale)
    latents = torch.cat([codec.encode(images[s : s + args.batch_size]).float().cpu()
                         for s in range(0, len(images), args.batch_size)])
    return images, latents, labels


def _from_shards(args: argparse.Namespace, model: Any) -> tuple[torch.Tensor, ...]:
    """Images, noise-free latents (mean × scale of the stored moments) and labels of a prepared dataset."""
    from erw_fast.data.images import decode_image
    from erw_fast.data.shards import MEMBER_MOMENTS, Manifest, ShardSet

    man = Manifest.load(args.data)
    c2, h, _ = man.moments_shape
    if (c2 // 2, h) != (model.in_channels, model.input_size):
        raise ValueError(f"{args.data}: latents are {c2 // 2}×{h}², the model takes {model.in_channels}×"
                         f"{model.input_size}²")
    skipped = {int(s["index"]) for s in man.skipped}
    usable = np.array([i for i in range(man.num_samples) if i not in skipped])
    n = min(args.num_samples, len(usable))
    pick = np.sort(np.random.default_rng(args.seed).choice(usable, size=n, replace=False))
    shards = ShardSet(args.data)
    images, latents, labels = [], [], []
    try:
        for i in pick:
            got = shards.read(int(i), ["cls", MEMBER_MOMENTS, man.image_member])
            img = got[man.image_member]
            images.append(np.asarray(img if man.image_member == "img.npy" else decode_image(img), dtype=np.uint8))
            latents.append(torch.from_numpy(np.array(got[MEMBER_MOMENTS][: c2 // 2], dtype=np.float32)))
            labels.append(shards.label(int(i), got["cls"]))
    finally:
        shards.close()
    print(f"held-out: {n} samples of {args.data} (latents: posterior mean × {man.scaling_factor:g})", file=sys.stderr)
    return (torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(),
            torch.stack(latents) * man.scaling_factor, torch.tensor(labels, dtype=torch.long))


def _encoders(config: Any, device: torch.device) -> list[Any]:
    from erw_fast.encoders import load_encoders

    if config is None or not config.encoder.names:
        raise ValueError("no encoder to compare with: the run config (--config) must name encoder.names")
    enc = config.encoder
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.run.seed + ENCODER_SEED_OFFSET)
        return load_encoders(enc.names, resolution=enc.resolution, pretrained=enc.pretrained,
                             weights_paths=enc.weights_paths or None, device=device)


def _plot(results: dict[str, Any], out_png: Path, title: str) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    encoders = list(results["cknna"])
    fig = Figure(figsize=(6 * len(encoders), 4.2), dpi=110)
    FigureCanvasAgg(fig)
    for i, name in enumerate(encoders):
        ax = fig.add_subplot(1, len(encoders), i + 1)
        for t, scores in results["cknna"][name].items():
            ax.plot(results["depths"], scores, marker="o", label=f"t = {t}")
        if results.get("alignment_depth"):
            ax.axvline(results["alignment_depth"], color="grey", ls=":", label="alignment depth")
        ax.set_xlabel("SiT block (depth)")
        ax.set_ylabel(f"CKNNA (k = {results['topk']})")
        ax.set_title(f"{title}\nvs {name}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png)
    return out_png


def run(args: argparse.Namespace) -> dict[str, Any]:
    from erw_fast.cli.loading import load_sit_checkpoint
    from erw_fast.evaluation.layerwise import layerwise_cknna, sit_layer_features

    if args.num_samples <= args.topk:
        raise ValueError(f"--num-samples ({args.num_samples}) must exceed --topk ({args.topk})")
    if not Path(args.ckpt).is_file():
        raise FileNotFoundError(f"checkpoint not found: {args.ckpt}")
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    loaded = load_sit_checkpoint(args.ckpt, ema=not args.raw, config_path=args.config, device=device)
    images, latents, labels = _held_out(args, loaded, device)
    encoders = _encoders(loaded.config, device)

    enc_feats = {}
    for encoder in encoders:
        chunks = [encoder(images[s : s + args.batch_size].to(device)).float().mean(dim=1).cpu()
                  for s in range(0, len(images), args.batch_size)]
        enc_feats[encoder.name] = torch.cat(chunks)
    generator = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(latents.shape, generator=generator)
    reg: dict[str, Any] = {}
    if loaded.model.cls_token_dim is not None:  # REG: the first encoder's CLS, noised at t, is the class token
        cls = torch.cat([encoders[0](images[s : s + args.batch_size].to(device), with_cls=True)[:, 0].float().cpu()
                         for s in range(0, len(images), args.batch_size)])
        reg = {"cls_token": cls, "cls_noise": torch.randn(cls.shape, generator=generator)}
    results: dict[str, Any] = {
        "checkpoint": str(loaded.checkpoint), "checkpoint_step": loaded.step, "weights": loaded.weights,
        "num_samples": len(images), "topk": args.topk, "t": args.t, "path_type": loaded.path_type,
        "held_out": args.images or (f"{args.data}: {len(images)} samples, numpy default_rng({args.seed})"
                                    if args.data else f"demo dataset, seed run.seed + {HELD_OUT_SEED_OFFSET}"),
        "features": "token-mean hidden state after each block, L2-normalised; encoder: token-mean patch tokens"
                    + ("; REG: the class token is the first encoder's CLS noised at t, left out of the mean"
                       if reg else ""),
        "depths": list(range(1, len(loaded.model.blocks) + 1)),
        "alignment_depth": loaded.kwargs.get("encoder_depth"),
        "cknna": {name: {} for name in enc_feats},
    }
    for t in args.t:
        layers = sit_layer_features(loaded.model, latents, labels, t, noise, path_type=loaded.path_type,
                                    batch_size=args.batch_size, **reg)
        for name, feats in enc_feats.items():
            results["cknna"][name][str(t)] = layerwise_cknna(layers, feats, args.topk)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "cknna.json").write_text(json.dumps(results, indent=2) + "\n")
    title = f"{loaded.checkpoint.name} (step {loaded.step}, {loaded.weights})"
    results["chart"] = str(_plot(results, out_dir / "cknna.png", title))
    for name, per_t in results["cknna"].items():
        for t, scores in per_t.items():
            print(f"{name} t={t}: " + " ".join(f"{s:.3f}" for s in scores))
    return results


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("erw-analyze", build_parser(), run, argv)

if __name__ == "__main__":
    sys.exit(main())
