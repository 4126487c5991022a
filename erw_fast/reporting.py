"""Run reports: read the JSONL metrics log, plot the loss curves, print a per-phase summary table, and the live
view of a run (a progress bar on a terminal, one plain line per logging step elsewhere)."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Loss keys drawn on the left axis, with their legend names and colours (the phase picks the line style).
_LOSS_KEYS: tuple[tuple[str, str, str], ...] = (
    ("loss", "total", "C0"),
    ("loss_diffusion", "diffusion", "C1"),
    ("loss_align", "alignment", "C2"),
)
_PHASE_STYLES: tuple[str, ...] = ("--", "-", "-.", ":")


def read_metrics(path: str | Path) -> list[dict]:
    """One dict per JSONL line; blank lines are skipped.

    A malformed *last* line is dropped (a run killed mid-write leaves a truncated record); a malformed line
    anywhere else is corruption and raises ``ValueError`` with its line number.
    """
    lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    numbered = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
    records: list[dict] = []
    for pos, (lineno, line) in enumerate(numbered):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if pos == len(numbered) - 1:
                break
            raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from err
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
    return records


def _number(value: Any) -> float | None:
    """A finite float, or None for missing / None / NaN / inf / non-numeric values (all skipped in plots)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _series(records: Sequence[dict], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for rec in records:
        step, y = _number(rec.get("step")), _number(rec.get(key))
        if step is not None and y is not None:
            xs.append(step)
            ys.append(y)
    return xs, ys


def phase_switches(records: Sequence[dict]) -> list[tuple[float, str]]:
    """(step, new phase) at each phase switch of step-sorted records. A record's ``step`` counts completed steps
    and a phase always logs its last step, so the switch is at the step of the previous phase's last record (the
    new phase's first record comes ``log_every`` steps later)."""
    return [(float(prev["step"]), str(rec.get("phase", "?")))
            for prev, rec in zip(records, records[1:], strict=False)
            if str(prev.get("phase", "?")) != str(rec.get("phase", "?"))]


def plot_loss_curves(metrics: list[dict], out_png: str | Path, title: str = "") -> Path:
    """Loss curves per phase (left axis), λ (right axis) and a dashed vertical line at each phase switch.

    Colour encodes the quantity (total / diffusion / alignment), line style the phase. A phase's series that
    duplicates its total loss (ERW's warmup, where the loss *is* the alignment loss) is drawn once.
    """
    # Object-oriented API on an Agg canvas: no display needed and no global pyplot/backend state touched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    records = sorted((r for r in metrics if _number(r.get("step")) is not None), key=lambda r: float(r["step"]))

    fig = Figure(figsize=(9, 5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    phases: list[str] = []
    for rec in records:
        phase = str(rec.get("phase", "?"))
        if phase not in phases:
            phases.append(phase)

    for p_idx, phase in enumerate(phases):
        recs = [r for r in records if str(r.get("phase", "?")) == phase]
        style = _PHASE_STYLES[p_idx % len(_PHASE_STYLES)]
        drawn: list[tuple[list[float], list[float]]] = []
        for key, name, colour in _LOSS_KEYS:
            xs, ys = _series(recs, key)
            if not xs or (xs, ys) in drawn:
                continue
            drawn.append((xs, ys))
            if phase == "warmup" and key == "loss" and all(r.get("loss_diffusion") is None for r in recs):
                name, colour = "alignment", "C2"  # warmup trains alignment only: label it for what it is
            ax.plot(xs, ys, style, color=colour, linewidth=1.4, label=f"{phase}: {name}")

    for at, phase in phase_switches(records):
        ax.axvline(at, color="0.4", linestyle=":", linewidth=1.2)
        ax.annotate(f"→ {phase}", xy=(at, 1.0), xycoords=("data", "axes fraction"), xytext=(3, -12),
                    textcoords="offset points", fontsize=8, color="0.3")

    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()

    xs, ys = _series(records, "lambda")
    if xs:
        ax2 = ax.twinx()
        ax2.plot(xs, ys, color="C3", linewidth=1.0, alpha=0.8, label="λ (alignment weight)")
        ax2.set_ylabel("λ", color="C3")
        ax2.tick_params(axis="y", colors="C3")
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    if handles:
        ax.legend(handles, labels, loc="upper right", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no metrics to plot", ha="center", va="center", transform=ax.transAxes)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(out, format="png")
    return out


def _fmt(value: Any, spec: str) -> str:
    number = _number(value)
    return "-" if number is None else format(number, spec)


def phase_summary_table(rows: list[dict]) -> str:
    """Fixed-width table: phase, steps, wall (s), images, img/s, final loss, GFLOP/step, plus a total row.

    Missing values print as ``-``. Per row, ``images`` falls back to ``img_per_s · wall_s`` and ``img_per_s`` to
    ``images / wall_s``. Total: steps, wall time and images summed; img/s = total images / total wall time;
    final loss = the last phase's; GFLOP/step = step-weighted mean (``-`` if any phase lacks it).
    """
    header = ("phase", "steps", "wall (s)", "images", "img/s", "final loss", "GFLOP/step")
    body: list[tuple[str, ...]] = []
    tot_steps, tot_wall, tot_images, tot_flop = 0, 0.0, 0.0, 0.0
    images_known = flops_known = bool(rows)
    for row in rows:
        steps = int(row.get("steps") or 0)
        wall = _number(row.get("wall_s"))
        rate = _number(row.get("img_per_s"))
        images = _number(row.get("images"))
        if images is None and rate is not None and wall is not None:
            images = rate * wall
        if rate is None and images is not None and wall:
            rate = images / wall
        gflops = _number(row.get("gflops_per_step"))
        tot_steps += steps
        tot_wall += wall or 0.0
        images_known = images_known and images is not None
        tot_images += images or 0.0
        flops_known = flops_known and gflops is not None
        tot_flop += (gflops or 0.0) * steps
        body.append(
            (
                str(row.get("phase", "?")),
                str(steps),
                _fmt(wall, ".1f"),
                _fmt(images, ".0f"),
                _fmt(rate, ".1f"),
                _fmt(row.get("final_loss"), ".4f"),
                _fmt(gflops, ".1f"),
            )
        )
    total = (
        "total",
        str(tot_steps),
        f"{tot_wall:.1f}",
        f"{tot_images:.0f}" if images_known else "-",
        f"{tot_images / tot_wall:.1f}" if images_known and tot_wall > 0 else "-",
        _fmt(rows[-1].get("final_loss"), ".4f") if rows else "-",
        f"{tot_flop / tot_steps:.1f}" if flops_known and tot_steps > 0 else "-",
    )
    table = [header, *body, total]
    widths = [max(len(r[c]) for r in table) for c in range(len(header))]

    def line(cells: tuple[str, ...]) -> str:
        # Phase names left-aligned, numbers right-aligned so digits line up.
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(r) for r in body), rule, line(total)])


def report_run(config: Any, stats: Any, world_size: int, plot: bool = True) -> list[str]:
    """The end-of-run summary: the per-phase table (rows in the order given: the phases'), skipped steps, and the
    loss-curve plot (logging.plot, unless ``plot`` is off)."""
    from erw_fast.flops import gflops_per_step

    stats = list(stats)
    rows = [{"phase": s.name, "steps": s.steps, "images": s.images, "wall_s": s.wall_s,
             "img_per_s": s.images / s.wall_s if s.wall_s else 0.0, "final_loss": s.final_loss,
             "gflops_per_step": gflops_per_step(config, s.name, world_size)} for s in stats if s.steps]
    lines = [phase_summary_table(rows)]
    skipped = sum(s.skipped for s in stats)
    if skipped:
        lines.append(f"non-finite steps skipped: {skipped}")
    if config.logging.plot and plot:
        png = plot_loss_curves(read_metrics(config.run_dir / "metrics.jsonl"), config.run_dir / "loss_curves.png",
                               title=f"{config.run.name}: {config.model.name} ({config.run.mode})")
        lines.append(f"loss curves: {png}")
    return lines


def progress_bar(phase: Any, step: int) -> Any:
    """A tqdm bar over the phase's steps, on stderr, starting at ``step`` (resumes start part-way)."""
    from tqdm import tqdm

    return tqdm(total=phase.end - phase.start, initial=step - phase.start, desc=phase.name, unit="step",
                dynamic_ncols=True, file=sys.stderr)


def use_progress_bar(enabled: bool, *streams: Any) -> bool:
    """Whether to draw the bar: logging.progress, and only when the bar's stream (stderr) and the log's (stdout, or
    the ``streams`` given) are terminals. In a file (a SLURM log) or a pipe its ``\\r`` redraws pile up into one
    unreadable line; the trainer prints ``log_line``s there instead."""
    def tty(stream: Any) -> bool:
        isatty = getattr(stream, "isatty", None)
        return callable(isatty) and bool(isatty())

    return enabled and all(tty(s) for s in (streams or (sys.stderr, sys.stdout)))


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    days, rest = divmod(seconds, 86_400)
    hours, rest = divmod(rest, 3600)
    clock = f"{hours}:{rest // 60:02d}:{rest % 60:02d}"
    return f"{days}d {clock}" if days else clock


def run_eta_s(config: Any, phases: Sequence[Any], index: int, step: int, step_time_s: float,
              world_size: int = 1) -> float:
    """Seconds left in the run at the current step time, the later phases' steps weighted by their FLOPs per step
    relative to the current phase's (ERW's warmup of SiT-XL/2 costs about a fifth of a Phase-2 step, so an ETA from
    warmup step times alone would be far too short); a phase whose FLOPs cannot be counted weighs 1."""
    from erw_fast.flops import gflops_per_step

    def cost(name: str) -> float | None:
        try:
            return gflops_per_step(config, name, world_size)
        except Exception:  # noqa: BLE001 - an estimate only: a phase the FLOP model does not know weighs 1
            return None

    here = cost(phases[index].name)
    steps = float(phases[index].end - step)
    for later in phases[index + 1:]:
        there = cost(later.name)
        steps += (later.end - later.start) * (there / here if here and there else 1.0)
    return steps * step_time_s


def log_line(record: dict, total_steps: int, eta_s: float | None = None) -> str:
    """One plain line for a logged record: step/total, phase, the loss and its parts, λ, grad norm, img/s and the
    ETA of the run (``eta_s``; else the steps left at the current step time), e.g.
    ``step 120/1000 [full] loss 0.4123 diffusion 0.3021 align 0.1102 λ 0.5000 grad 1.23 | 812.4 img/s | ETA 0:12:05``.
    """
    step = int(record["step"])
    parts = [f"step {step}/{total_steps}", f"[{record.get('phase', '?')}]", f"loss {_fmt(record.get('loss'), '.4f')}"]
    parts += [f"{key[len('loss_'):]} {_fmt(value, '.4f')}" for key, value in record.items()
              if key.startswith("loss_") and value is not None]
    if _number(record.get("lambda")) is not None:  # Phase 1 has no λ
        parts.append(f"λ {_fmt(record['lambda'], '.4f')}")
    if record.get("grad_norm") is not None:
        parts.append(f"grad {_fmt(record['grad_norm'], '.3g')}")
    rate = _fmt(record.get("img_per_s"), ".1f")
    step_time = _number(record.get("step_time_s"))
    if eta_s is None and step_time is not None:
        eta_s = (total_steps - step) * step_time
    eta = _duration(eta_s) if eta_s is not None else "-"
    return " ".join(parts) + f" | {rate} img/s | ETA {eta}"
