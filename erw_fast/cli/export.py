"""erw-export: any trainer checkpoint (DDP or DeepSpeed ZeRO 0–3, any world size) → one consolidated
``{model, ema, args, steps}`` file in the reference layout, plus safetensors. No zero_to_fp32 step, no GPUs:
DeepSpeed's shards are merged on the CPU with its own consolidation routine."""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from pathlib import Path

from erw_fast.checkpoint import load_checkpoint
from erw_fast.cli import run_cli
from erw_fast.config import config_from_dict
from erw_fast.engines.deepspeed_files import trainer_checkpoint_weights

_PROJECTOR_OUT = re.compile(r"projectors\.(\d+)\.(?:4|projection_layer)\.weight$")


def export(path: Path, out_dir: Path | None) -> list[Path]:
    from erw_fast.checkpoint_state import export_consolidated, reference_args

    state = load_checkpoint(path)
    config = config_from_dict(state["config"])
    weights = trainer_checkpoint_weights(path, state)
    model = {k: v.float() if v.is_floating_point() else v for k, v in weights.items()}
    # Each projector's last weight (REPA's MLP: .4, iREPA's conv: .projection_layer) has z rows; in index order.
    last = {int(m.group(1)): v.shape[0] for k, v in model.items() if (m := _PROJECTOR_OUT.match(k))}
    z_dims = [last[i] for i in sorted(last)]
    out_dir = out_dir or path.parent.parent / "reference"
    args = reference_args(config, z_dims, state["phase"])
    return export_consolidated(model, state["ema"], args, int(state["step"]), out_dir)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="erw-export", description=__doc__)
    parser.add_argument("checkpoint", type=Path, help="a trainer checkpoint, e.g. runs/x/checkpoints/step_0100000.pt")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: the run's reference/)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    def run(args: argparse.Namespace) -> None:
        for p in export(args.checkpoint, args.out):
            print(p)

    return run_cli("erw-export", build_parser(), run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
