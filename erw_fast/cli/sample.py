"""erw-sample: draw N images from a SiT checkpoint into an ADM-compatible ``.npz`` plus ``protocol.json``.

Works under ``torchrun``: rank r draws global samples r, r + W, r + 2W, … (W = world size) from its own seed
``seed · W + r`` (REPA generate.py), writes its share to ``out_dir/.parts``, and rank 0 interleaves the shares
into ``samples.npz`` (``arr_0`` uint8 NHWC, the first N; ``arr_1`` their labels) and ``protocol.json``.

Resumable: every batch lands in ``.parts`` with the rank's generator state, so rerunning the same command after
an interruption (a preempted 50K-sample FID run) continues from the last finished batch and writes the same
samples as an uninterrupted run. A rerun with different settings is refused, naming them. A rerun of a finished
run says so and draws nothing (``--overwrite`` draws again).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from erw_fast.atomic import atomic_write, atomic_write_text
from erw_fast.cli import run_cli
from erw_fast.doctor import package_version
from erw_fast.envinfo import versions

SAMPLES_FILE = "samples.npz"
PROTOCOL_FILE = "protocol.json"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="erw-sample", description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="checkpoint: run/reference/NNNNNNN.pt, run/checkpoints/*.pt or REPA's")
    p.add_argument("--out-dir", required=True, help="writes samples.npz, protocol.json (and png/ with --png)")
    p.add_argument("--num-samples", type=int, default=50_000, help="N images (ADM protocol: 50 000)")
    p.add_argument("--batch-size", type=int, default=32, help="per process")
    p.add_argument("--mode", "--sampler", dest="mode", choices=["ode", "sde"], default="ode")
    p.add_argument("--num-steps", "--steps", dest="num_steps", type=int, default=50)
    p.add_argument("--heun", action=argparse.BooleanOptionalAction, default=False, help="ODE only")
    p.add_argument("--cfg-scale", type=float, default=1.0)
    p.add_argument("--guidance-low", type=float, default=0.0)
    p.add_argument("--guidance-high", type=float, default=1.0)
    p.add_argument("--cls-cfg-scale", type=float, default=1.5,
                   help="REG models: the class token's guidance scale while the latent is guided (0: its conditional "
                        "output; REG's generate.py default 1.5, its eval.sh 2.3)")
    p.add_argument("--path-type", choices=["linear", "cosine"], default=None, help="default: the checkpoint's")
    p.add_argument("--vae", default="auto",
                   help="auto (toy for demo runs, else ema) | toy | ema | mse | local diffusers VAE path")
    p.add_argument("--image-size", type=int, default=None, help="toy VAE only (default: run config or 8·latent)")
    p.add_argument("--seed", type=int, default=0, help="global seed; rank r uses seed·world_size + r")
    p.add_argument("--balanced-labels", action="store_true",
                   help="label i = i mod classes instead of uniform random (NOT the reference protocol)")
    p.add_argument("--raw", action="store_true", help="sample the raw weights instead of the EMA")
    p.add_argument("--model", default=None, help="model name if the checkpoint does not say (e.g. SiT-XL/2)")
    p.add_argument("--config", default=None, help="the run's config.yaml (default: found beside the checkpoint)")
    p.add_argument("--png", action="store_true", help="also write png/NNNNNN.png")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32", help="autocast for the SiT")
    p.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--compile", action="store_true", help="torch.compile the SiT forward")
    p.add_argument("--device", default="auto")
    p.add_argument("--overwrite", "--force", dest="overwrite", action="store_true",
                   help="draw again even if out-dir holds a finished run (default: a finished run is left as it is)")
    return p


def _finished(out_dir: Path, settings: dict[str, Any], overwrite: bool) -> dict[str, Any] | None:
    """The protocol of a finished run in ``out_dir`` with these settings (a rerun is a no-op), None to draw.
    A finished run with other settings is refused (naming them) unless ``overwrite``."""
    npz, proto = out_dir / SAMPLES_FILE, out_dir / PROTOCOL_FILE
    if overwrite or not (npz.is_file() and proto.is_file()):
        return None
    protocol = json.loads(proto.read_text())
    was = protocol.get("settings")
    if was is None:  # written before protocols recorded their settings
        return protocol
    changed = sorted(k for k in settings.keys() | was.keys() if settings.get(k) != was.get(k))
    if changed:
        there, now = {k: was.get(k) for k in changed}, {k: settings.get(k) for k in changed}
        raise ValueError(f"{out_dir} holds finished samples drawn with other settings ({there} there, {now} now); "
                         "use another --out-dir, or --overwrite to replace them")
    return protocol


def _labels(generator: torch.Generator, global_idx: torch.Tensor, num_classes: int, balanced: bool,
            device: torch.device) -> torch.Tensor:
    if balanced:
        return (global_idx % num_classes).to(device)
    return torch.randint(0, num_classes, (len(global_idx),), generator=generator, device=device)


def _save_png(images: np.ndarray, indices: np.ndarray, folder: Path) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for img, i in zip(images, indices, strict=True):
        Image.fromarray(img).save(folder / f"{int(i):06d}.png")


def _write_npz(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    # A file object keeps np.savez from appending a second ".npz".
    atomic_write(path, lambda f: np.savez(f, arr_0=images, arr_1=labels))


def _sampling_settings(args: argparse.Namespace, loaded: Any, world: int, vae: str, image_size: int,
                       path_type: str, latent_scale: float) -> dict[str, Any]:
    """Everything that decides which images a rank draws: a resumed run must match it exactly."""
    settings = {"checkpoint": str(loaded.checkpoint), "checkpoint_step": loaded.step, "weights": loaded.weights,
                "num_samples": args.num_samples, "batch_size": args.batch_size, "world_size": world,
                "seed": args.seed, "mode": args.mode, "num_steps": args.num_steps, "heun": bool(args.heun),
                "cfg_scale": args.cfg_scale, "guidance_low": args.guidance_low, "guidance_high": args.guidance_high,
                "path_type": path_type, "vae": vae, "latent_scale": latent_scale, "image_size": image_size,
                "balanced_labels": bool(args.balanced_labels), "precision": args.precision, "tf32": bool(args.tf32),
                "compile": bool(args.compile)}
    if loaded.model.cls_token_dim is not None:
        settings["cls_cfg_scale"] = args.cls_cfg_scale
    return settings


def _reg_protocol(args: argparse.Namespace, dim: int) -> dict[str, Any]:
    """What a REG model's samples depend on beyond a SiT's: the class token's state, its guidance, its noise."""
    return {
        "class_token_dim": dim,
        "cls_cfg_scale": args.cls_cfg_scale,
        "cls_guidance": "uncond + cls_cfg_scale·(cond − uncond) where the latent is guided; cls_cfg_scale ≤ 0: "
                        "cond only; nothing when cfg_scale ≤ 1",
        "cls_init": "N(0, I) of shape (batch, class_token_dim), drawn from the rank's generator after the labels",
        "cls_noise": "SDE: each step draws the latent's noise, then the class token's" if args.mode == "sde" else None,
        "sampler_source": "REG's Euler–Maruyama SDE with the joint class token" if args.mode == "sde" else
                          "this project's ODE with the joint class token (REG ships only the SDE)",
    }


def _alignment_protocol(loaded: Any) -> dict[str, Any]:
    """How the model was aligned during training (iREPA's projector and target normalisation, U-REPA's manifold
    weight): the run config's when found, else what the export's args record; the projector as rebuilt."""
    from erw_fast.checkpoint_state import alignment_args

    keys = ("spnorm_method", "zscore_alpha", "manifold_weight")
    known = alignment_args(loaded.config) if loaded.config is not None else loaded.args
    out: dict[str, Any] = {k: known.get(k) for k in keys}
    out["projection_layer_type"] = loaded.kwargs.get("projector", "mlp")
    out["proj_kwargs_kernel_size"] = loaded.kwargs.get("projector_kernel_size", 1)
    return out


class _RankProgress:
    """This rank's finished batches in ``.parts``: one ``.npz`` each, and (written after it) the count and the
    generator state that the next batch starts from."""

    def __init__(self, parts: Path, rank: int, settings: dict[str, Any]) -> None:
        self.parts, self.rank, self.settings = parts, rank, settings
        self.state_file = parts / f"rank{rank:05d}.pt"

    def chunk(self, rank: int, iteration: int) -> Path:
        return self.parts / f"rank{rank:05d}_{iteration:06d}.npz"

    def resume(self, generator: torch.Generator) -> int:
        """The number of batches already done (0 for a fresh start); restores the generator to follow them."""
        if not self.state_file.is_file():
            return 0
        state = torch.load(self.state_file, weights_only=True)
        changed = sorted(k for k in self.settings.keys() | state["settings"].keys()
                         if self.settings.get(k) != state["settings"].get(k))
        if changed:
            was = {k: state["settings"].get(k) for k in changed}
            now = {k: self.settings.get(k) for k in changed}
            raise ValueError(f"{self.parts} holds an interrupted run with other settings ({was} there, {now} now); "
                             "rerun with those settings to finish it, or delete the folder to start over")
        generator.set_state(state["generator"])
        return int(state["done"])

    def save(self, iteration: int, images: np.ndarray, labels: np.ndarray, generator: torch.Generator) -> None:
        _write_npz(self.chunk(self.rank, iteration), images, labels)
        state = {"settings": self.settings, "done": iteration + 1, "generator": generator.get_state()}
        atomic_write(self.state_file, lambda f: torch.save(state, f))  # the count moves on once the batch is on disk

    def load(self, rank: int, iterations: int) -> tuple[np.ndarray, np.ndarray]:
        images, labels = [], []
        for it in range(iterations):
            with np.load(self.chunk(rank, it)) as f:
                images.append(f["arr_0"])
                labels.append(f["arr_1"])
        return np.concatenate(images), np.concatenate(labels)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from erw_fast.cli.loading import load_sit_checkpoint
    from erw_fast.codecs import build_codec, choose_codec
    from erw_fast.runtime import autocast_context, init_runtime, set_tf32
    from erw_fast.sampling import euler_maruyama_sampler, euler_sampler

    if args.num_samples <= 0:
        raise ValueError(f"--num-samples must be positive, got {args.num_samples}")
    if args.batch_size <= 0:
        raise ValueError(f"--batch-size must be positive, got {args.batch_size}")
    if args.num_steps <= 0:
        raise ValueError(f"--num-steps must be positive, got {args.num_steps}")
    if args.cfg_scale < 1.0:
        raise ValueError(f"--cfg-scale must be ≥ 1 (1 = no guidance), got {args.cfg_scale}")
    if args.cls_cfg_scale < 0:
        raise ValueError(f"--cls-cfg-scale must be ≥ 0 (0 = the class token's conditional output), got "
                         f"{args.cls_cfg_scale}")
    if not Path(args.ckpt).is_file():
        raise FileNotFoundError(f"checkpoint not found: {args.ckpt}")

    env = init_runtime(args.device)
    set_tf32(args.tf32)
    rank, world = env.rank, env.world_size
    loaded = load_sit_checkpoint(args.ckpt, ema=not args.raw, config_path=args.config, model_name=args.model,
                                 device=env.device)
    model = loaded.model
    latent = model.input_size
    choice = choose_codec(args.vae, loaded.config, loaded.args)
    vae = choice.name
    image_size = args.image_size or (loaded.config.data.image_size if loaded.config is not None else 8 * latent)
    path_type = args.path_type or loaded.path_type
    out_dir = Path(args.out_dir)
    settings = _sampling_settings(args, loaded, world, vae, image_size, path_type, choice.scale)
    done = _finished(out_dir, settings, args.overwrite)
    if done is not None:
        if rank == 0:
            print(f"{out_dir / SAMPLES_FILE} is already complete ({done.get('num_samples')} images, same settings); "
                  "nothing to do (--overwrite draws them again)", file=sys.stderr)
        return done
    if rank == 0:
        print(choice.note, file=sys.stderr)
    codec = build_codec(vae, device=env.device, image_size=image_size if vae == "toy" else 8 * latent,
                        latent_size=latent, latent_channels=model.in_channels, scale=choice.scale)
    sampler = euler_maruyama_sampler if args.mode == "sde" else euler_sampler

    n = args.batch_size
    iterations = math.ceil(args.num_samples / (n * world))
    generator = torch.Generator(device=env.device).manual_seed(args.seed * world + rank)
    parts = out_dir / ".parts"
    parts.mkdir(parents=True, exist_ok=True)
    progress = _RankProgress(parts, rank, settings)
    start = progress.resume(generator)
    if start and rank == 0:
        print(f"resuming at batch {start + 1}/{iterations} (earlier batches are in {parts})", file=sys.stderr)
    for it in range(start, iterations):
        local = torch.arange(it * n, (it + 1) * n)
        global_idx = local * world + rank
        z = torch.randn(n, model.in_channels, latent, latent, generator=generator, device=env.device)
        y = _labels(generator, global_idx, model.num_classes, args.balanced_labels, env.device)
        kwargs: dict[str, Any] = dict(num_steps=args.num_steps, heun=args.heun, cfg_scale=args.cfg_scale,
                                      guidance_low=args.guidance_low, guidance_high=args.guidance_high,
                                      path_type=path_type, compile=args.compile)
        if model.cls_token_dim is not None:  # REG: the class token's starting noise, after the labels
            kwargs["cls_latents"] = torch.randn(n, model.cls_token_dim, generator=generator, device=env.device)
            kwargs["cls_cfg_scale"] = args.cls_cfg_scale
        if args.mode == "sde":
            kwargs["generator"] = generator
        with autocast_context(args.precision, env.device):
            latents = sampler(model, z, y, **kwargs)
        batch = codec.decode(latents.to(torch.float32)).permute(0, 2, 3, 1).contiguous().numpy()
        if args.png:
            keep = global_idx.numpy() < args.num_samples
            _save_png(batch[keep], global_idx.numpy()[keep], out_dir / "png")
        progress.save(it, batch, y.cpu().numpy(), generator)
        if rank == 0:
            print(f"batch {it + 1}/{iterations}: {n * world} images", file=sys.stderr, flush=True)

    if world > 1:
        dist.barrier()  # every rank's batches are on disk
    protocol: dict[str, Any] = {}
    if rank == 0:
        shares = [progress.load(r, iterations) for r in range(world)]
        total = iterations * n * world
        all_images = np.empty((total, *shares[0][0].shape[1:]), dtype=np.uint8)
        all_labels = np.empty(total, dtype=np.int64)
        for r, (own_images, own_labels) in enumerate(shares):  # global index = local index · W + r
            all_images[r::world] = own_images
            all_labels[r::world] = own_labels
        _write_npz(out_dir / SAMPLES_FILE, all_images[: args.num_samples], all_labels[: args.num_samples])
        protocol = {
            "format": "erw_fast.sample_protocol/1",
            "npz": SAMPLES_FILE,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "checkpoint": str(loaded.checkpoint),
            "checkpoint_step": loaded.step,
            "weights": loaded.weights,
            "run_config": str(loaded.config_path) if loaded.config_path else None,
            "model": {k: v for k, v in loaded.kwargs.items() if k != "attn_backend"},
            "sampler": {"mode": args.mode, "num_steps": args.num_steps, "heun": bool(args.heun and args.mode == "ode"),
                        "cfg_scale": args.cfg_scale, "guidance_low": args.guidance_low,
                        "guidance_high": args.guidance_high, "path_type": path_type},
            "reg": _reg_protocol(args, model.cls_token_dim) if model.cls_token_dim is not None else None,
            "alignment": _alignment_protocol(loaded),
            "vae": {"spec": vae, "requested": args.vae, "description": codec.description,
                    "latent_scale": choice.scale, "why": choice.note},
            "num_samples": args.num_samples,
            "image_shape": list(all_images.shape[1:]),
            "labels": "balanced (i mod classes)" if args.balanced_labels else "uniform random",
            "comparable": not args.balanced_labels,
            "seed": args.seed,
            "world_size": world,
            "per_process_batch_size": n,
            "precision": args.precision,
            "tf32": bool(args.tf32),
            "compile": bool(args.compile),
            "device": str(env.device),
            "versions": versions("numpy", "diffusers", "timm") | {"erw-fast": package_version("erw-fast")},
            "settings": settings,  # what a rerun compares (a rerun with the same ones is a no-op)
        }
        if args.balanced_labels:
            protocol["note"] = "balanced labels differ from the reference protocol (uniform random labels)"
        atomic_write_text(out_dir / PROTOCOL_FILE, json.dumps(protocol, indent=2) + "\n")
        shutil.rmtree(parts, ignore_errors=True)
        print(f"wrote {out_dir / SAMPLES_FILE} ({args.num_samples} images) and {out_dir / PROTOCOL_FILE}")
    if world > 1:
        dist.barrier()
    return protocol


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return run_cli("erw-sample", build_parser(), run, argv)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()

if __name__ == "__main__":
    sys.exit(main())
