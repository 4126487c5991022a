"""``erw-bench``: the ERW cost analysis (analytic FLOPs per phase and per budget split) and a training-throughput
benchmark (img/s, step-time breakdown, TFLOP/s, MFU, peak memory), optionally against the reference's way of
running the same step.

    erw-bench cost                                   # ERW Fig. 4: SiT-XL/2, batch 256, DINOv2-B, 100K budget
    erw-bench cost --measure --model SiT-S/2 --input-size 8 --depth 2 --hidden 64 --heads 2 \\
        --encoder demo-vit-t --resolution 64 --batch 4     # + timed steps per phase on this device
    erw-bench train --config configs/erw_sit_xl2.yaml --batch 32 64 --compile both --reference-step

FLOPs are analytic (``erw_fast.flops``: 2 FLOPs per multiply-add, matmul FLOPs only). Timings are measured on the
device the command runs on and written with its name; on CPU no MFU is reported.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from erw_fast import flops as F
from erw_fast.bench.common import Workload, _slug, _write_json, device_info, peak_bf16_tflops, resolve_device
from erw_fast.bench.cost import (
    _parse_splits,
    cost_analysis,
    measure_phases,
    plot_cost,
    reconstruct_paper,
    render_cost_markdown,
)
from erw_fast.bench.train import (
    REGIONS,
    RegionTimer,
    TrainSettings,
    _reference_cosine_loop,
    _reference_ema,
    bench_config,
    guard_cpu,
    plot_train,
    render_train_markdown,
    run_train_benchmark,
    train_figure,
)

__all__ = [  # the CLI, and what tests and scripts import from here
    "REGIONS",
    "train_figure",
    "RegionTimer",
    "Workload",
    "_reference_cosine_loop",
    "_reference_ema",
    "build_parser",
    "main",
    "peak_bf16_tflops",
    "reconstruct_paper",
]

DEFAULT_OUT = Path("benchmarks/results")


def _add_workload_args(p: argparse.ArgumentParser, batch_default: int | None) -> None:
    g = p.add_argument_group("model and teacher")
    g.add_argument("--model", default="SiT-XL/2", help="SiT-{S,B,L,XL}/{2,4,8}")
    g.add_argument("--input-size", type=int, default=32, help="latent side (32 for 256 px)")
    g.add_argument("--in-channels", type=int, default=4)
    g.add_argument("--num-classes", type=int, default=1000)
    g.add_argument("--depth", type=int, default=None, help="override the named depth")
    g.add_argument("--hidden", type=int, default=None, help="override the hidden size")
    g.add_argument("--heads", type=int, default=None, help="override the number of heads")
    g.add_argument("--patch-size", type=int, default=None)
    g.add_argument("--projector-dim", type=int, default=2048)
    g.add_argument("--encoder", default="dinov2-vit-b", help="teacher encoder(s), comma-separated")
    g.add_argument("--resolution", "--encoder-resolution", dest="resolution", type=int, default=256,
                   help="image side the teacher sees (before its own resize)")
    g.add_argument("--warmup-depth", type=int, default=None, help="ERW Phase-1 blocks L (default min(4, depth))")
    g.add_argument("--encoder-depth", type=int, default=None, help="alignment depth in the full phase")
    g.add_argument("--objective", choices=("cosine", "nt_xent"), default="cosine")
    g.add_argument("--negatives", choices=("batch", "position"), default="batch")
    if batch_default is not None:
        g.add_argument("--batch", type=int, default=batch_default, help="images per step")


def _workload(args: argparse.Namespace) -> Workload:
    from erw_fast.encoders import parse_encoder_names

    return Workload(
        model=args.model, input_size=args.input_size, in_channels=args.in_channels, num_classes=args.num_classes,
        depth=args.depth, hidden=args.hidden, heads=args.heads, patch_size=args.patch_size,
        projector_dim=args.projector_dim, encoders=parse_encoder_names(args.encoder), resolution=args.resolution,
        warmup_depth=args.warmup_depth, encoder_depth=args.encoder_depth, objective=args.objective,
        negatives=args.negatives,
    )


def cmd_cost(args: argparse.Namespace) -> int:
    work = _workload(args)
    res = cost_analysis(work, args.batch, _parse_splits(args.splits))
    if args.measure:
        res["measured"] = measure_phases(work, args)
    out = Path(args.out)
    md = render_cost_markdown(res)
    (out / f"{args.name}.md").parent.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.md").write_text(md + "\n")
    for k in res["per_step"]:  # the component dump is long; keep the JSON readable
        res["per_step"][k]["breakdown"] = res["per_step"][k]["breakdown"]["components"]
    _write_json(out / f"{args.name}.json", res)
    plot_cost(res, out / f"{args.name}.png")
    print(md)
    print(f"\nwrote {out / args.name}.{{md,json,png}}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from erw_fast.models import resolve_attention_backend

    attn_backends = None
    if args.attn_backend:
        try:
            attn_backends = list(dict.fromkeys(name if name == "measure" else resolve_attention_backend(name)
                                               for name in args.attn_backend))
        except RuntimeError as error:  # a backend that cannot run here is a usage error, not a crash
            raise ValueError(str(error)) from error
    settings = TrainSettings(
        config=args.config, overrides=list(args.overrides),
        phases=[p.strip() for p in args.phases.split(",") if p.strip()], batches=args.batch,
        steps=args.steps, warmup=args.warmup, device=args.device, precision=args.precision, compile=args.compile,
        compile_scope=args.compile_scope, compile_mode=args.compile_mode, profile_dir=args.profile,
        profile_steps=args.profile_steps, attn_backends=attn_backends, alignment_backend=args.alignment_backend,
        reference_step=args.reference_step, seed=args.seed,
    )
    if settings.steps < 1:
        raise ValueError("--steps must be ≥ 1")
    device = resolve_device(settings.device)
    guard_cpu(settings, device, args.cpu_flop_limit)
    out = Path(args.out)
    model = bench_config(settings, settings.phases[0], settings.batches[0], device).model.name
    name = args.name or f"train_{_slug(device_info(device)['name'])}_{_slug(model)}"

    def write(doc: dict) -> str:  # after every measurement too: a time limit never loses finished cases
        _write_json(out / f"{name}.json", doc)
        md = render_train_markdown(doc)
        (out / f"{name}.md").write_text(md + "\n")
        return md

    doc = run_train_benchmark(settings, on_result=write)
    md = write(doc)
    plot_train(doc, out / f"{name}.png")
    print(md)
    print(f"\nwrote {out / name}.{{json,md,png}}")
    return 0 if all(r["status"] == "ok" for r in doc["results"]) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="erw-bench", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    cost = sub.add_parser("cost", help="analytic FLOPs per phase and per budget split (ERW Fig. 4)")
    _add_workload_args(cost, batch_default=F.PAPER_BATCH)
    cost.add_argument("--splits", default=None,
                      help="comma-separated WARMUP+FULL step counts (default: 0+100000,10000+90000,… and REPA)")
    cost.add_argument("--out", default=str(DEFAULT_OUT))
    cost.add_argument("--name", default="cost_analysis", help="output file stem")
    cost.add_argument("--measure", action="store_true", help="also time steps of each phase on this device")
    cost.add_argument("--measure-batch", type=int, default=None, help="batch for --measure (default: --batch)")
    cost.add_argument("--measure-steps", type=int, default=3)
    cost.add_argument("--measure-warmup", type=int, default=1)
    cost.add_argument("--device", default="auto")
    cost.add_argument("--precision", choices=("auto", "bf16", "fp16", "fp32"), default="auto")
    cost.add_argument("--cpu-flop-limit", type=float, default=1e12, help="refuse --measure on CPU above this")
    cost.set_defaults(func=cmd_cost)

    train = sub.add_parser("train", help="training throughput per phase: img/s, breakdown, TFLOP/s, MFU")
    train.add_argument("--config", default=None, help="a YAML config, as train.py takes it (default: the "
                                                      "built-in defaults, SiT-XL/2 + DINOv2-B)")
    train.add_argument("overrides", nargs="*", help="key.sub=value config overrides, e.g. model.name=SiT-B/2")
    train.add_argument("--batch", type=int, nargs="+", default=[32], help="batch sizes to sweep (one device)")
    train.add_argument("--phases", default="warmup,full",
                       help="comma-separated: warmup, full, repa, sit, reg, denoise (after the alignment stopped)")
    train.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    train.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation, allocator)")
    train.add_argument("--device", default="auto")
    train.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default=None,
                       help="default: the config's train.precision")
    train.add_argument("--compile", choices=("off", "on", "both"), default=None,
                       help="eager, compiled, or both (default: the config's train.compile)")
    train.add_argument("--compile-scope", choices=("blocks", "model"), default=None,
                       help="regional (each SiT block) or whole-model compilation (default: the config's)")
    train.add_argument("--compile-mode", default=None,
                       choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"))
    train.add_argument("--profile", default=None, metavar="DIR",
                       help="also profile a few steps per measurement: Chrome traces with a range per step "
                            "region (NVTX ranges on CUDA for Nsight Systems)")
    train.add_argument("--profile-steps", type=int, default=3)
    train.add_argument("--attn-backend", nargs="+", default=None,
                       help="one or more of auto | sdpa | sdpa_flash | sdpa_efficient | sdpa_cudnn | math | flash_attn "
                            "| xformers | measure; several are swept, each its own variant (fast@<backend>); "
                            "default: the config's model.attn_backend")
    train.add_argument("--alignment-backend", choices=("auto", "torch", "triton"), default=None,
                       help="default: the config's alignment.backend")
    train.add_argument("--reference-step", action="store_true",
                       help="also time the reference's way of running the step (per-sample alignment loop, fp16 "
                            "+ GradScaler, eager, per-parameter EMA, fp32 teacher) and report the speed-up")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--cpu-flop-limit", type=float, default=1e12, help="refuse CPU runs above this per step")
    train.add_argument("--out", default=str(DEFAULT_OUT))
    train.add_argument("--name", default=None, help="output file stem (default: train_<device>_<model>)")
    train.set_defaults(func=cmd_train)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ValueError as error:
        print(f"erw-bench: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
