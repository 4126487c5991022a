"""Single-device step time of the training engines: one process (the DDP engine's path) vs DeepSpeed ZeRO-0/1/2.

On one device no bytes cross a link, so the difference is the engine's own overhead: DeepSpeed's flat fp32
master copies, its bucketing and gradient partition bookkeeping, the optimizer wrapper, and the sharded EMA. The
model's full step (Phase 2, or ERW Phase 1 with --phase warmup) runs on a synthetic batch with precomputed teacher
features (no encoder, no loader), so only the model, loss, backward, optimizer and EMA are timed.

    python benchmarks/bench_engines.py                       # SiT-XL/2, batch 32, bf16 on a GPU
    python benchmarks/bench_engines.py --model SiT-S/2 --batch 8 --steps 5 --device cpu --precision fp32

Writes JSON (device, versions, settings, raw per-step times) and a markdown table to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from erw_fast.envinfo import device_name, versions

ENGINES = ("ddp", "zero0", "zero1", "zero2")


def _config(args: argparse.Namespace, engine: str, out_dir: Path):
    from erw_fast.config import load_config

    overrides = [
        f"model.name={args.model}", f"train.global_batch_size={args.batch}", f"train.precision={args.precision}",
        f"run.device={args.device}", f"run.output_dir={out_dir}", f"run.name={engine}", "run.mode=erw",
        "erw.warmup_steps=1", "train.total_steps=2", "encoder.pretrained=false", "logging.progress=false",
        f"train.compile={str(args.compile).lower()}", *args.override,
    ]
    if engine != "ddp":
        overrides += ["engine.kind=deepspeed", f"engine.zero_stage={engine[-1]}"]
    return load_config(None, overrides)


def time_engine(args: argparse.Namespace, engine: str, out_dir: Path) -> dict:
    from erw_fast.trainer import Trainer

    config = _config(args, engine, out_dir)
    trainer = Trainer(config, log_stream=sys.stderr)  # engine.kind in the config picks the engine
    device = trainer.device
    embed_dim = 768  # DINOv2-B features, precomputed: the encoder is not what is being compared
    # A stand-in teacher of DINOv2-B's width: one projector, never called (the batch carries its features).
    tokens = (config.model.input_size // 2) ** 2
    trainer.teacher.encoders = [SimpleNamespace(embed_dim=embed_dim, num_patches=lambda: tokens)]
    phase = trainer.phases[0 if args.phase == "warmup" else 1]
    trainer._enter_phase(phase, trainer._new_model(phase))
    m = config.model
    g = torch.Generator(device="cpu").manual_seed(0)
    batch = {"latents": torch.randn(args.batch, m.in_channels, m.input_size, m.input_size, generator=g).to(device),
             "labels": torch.randint(0, m.num_classes, (args.batch,), generator=g).to(device),
             "features": torch.randn(args.batch, tokens, embed_dim, generator=g).to(device)}
    times = []
    for i in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        trainer.train_step(trainer.engine, phase, phase.start + i, batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    description = trainer.engine.describe()
    trainer.engine.close()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    measured = times[args.warmup:]
    return {"engine": engine, "describe": description, "step_s": measured, "median_step_s": statistics.median(measured),
            "peak_memory_gib": memory, "build_s": trainer.engine_build_s}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="SiT-XL/2")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--phase", default="full", choices=["warmup", "full"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--tag", default=None, help="result file stem (default: engines_<device kind>)")
    parser.add_argument("--override", nargs="*", default=[], help="extra config overrides (key=value)")
    parser.add_argument("--scratch", type=Path, default=Path("runs/bench_engines"))
    args = parser.parse_args(argv)

    import deepspeed

    results = [time_engine(args, engine, args.scratch) for engine in args.engines]
    report = {
        "device": device_name(args.device), **versions("deepspeed"),
        "settings": {k: str(v) for k, v in vars(args).items()}, "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.tag or f"engines_{'gpu' if args.device.startswith('cuda') else 'cpu'}"
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    base = results[0]["median_step_s"]
    lines = [f"# Engine overhead on one device: {report['device']}", "",
             f"{args.model}, {args.phase} phase, batch {args.batch}, {args.precision}, compile {args.compile}; "
             f"median of {args.steps} steps after {args.warmup} warm-up; torch {torch.__version__}, "
             f"DeepSpeed {deepspeed.__version__}.", "",
             "| engine | median step (ms) | vs first | peak memory (GiB) | what ran |",
             "| --- | --- | --- | --- | --- |"]
    for r in results:
        mem = f"{r['peak_memory_gib']:.2f}" if r["peak_memory_gib"] is not None else "-"
        lines.append(f"| {r['engine']} | {1e3 * r['median_step_s']:.1f} | {r['median_step_s'] / base:.2f}× | {mem} | "
                     f"{r['describe']} |")
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
