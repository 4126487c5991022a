"""The training log beyond metrics.jsonl: TensorBoard and W&B (read back from their own files), the monitors' grids
with and without guidance, the phase switch at its step, and the plain log lines of a run without a terminal."""

import io
import json
import math
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from _trainer_helpers import launch, read, tiny_config

from erw_fast.codecs import build_codec
from erw_fast.encoders.teacher import load_teacher
from erw_fast.log_sinks import WANDB_ID_FILE
from erw_fast.monitor import TrainingMonitor
from erw_fast.phases import plan_phases
from erw_fast.reporting import log_line, phase_switches, run_eta_s, use_progress_bar
from erw_fast.sampling import euler_sampler, make_image_grid
from erw_fast.trainer import Trainer

MONITORS = ["logging.sample_every=7", "logging.sample_steps=2", "logging.sample_count=4", "logging.cknna_every=7",
            "logging.cknna_samples=8", "logging.log_every=2"]


# ----------------------------------------------------------------------------------------------- readers


def tensorboard_events(log_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()  # purges what a resumed run's purge_step marks as orphaned, as TensorBoard's UI does
    return acc


def tb_scalars(acc, tag: str) -> dict[int, float]:
    return {e.step: e.value for e in acc.Scalars(tag)}


def wandb_records(path: Path):
    """The protobuf records of an offline ``.wandb`` file: its 7-byte header (':W&B', magic, version), then a
    LevelDB-style log of 32 KiB blocks of 7-byte-headed chunks (crc32c, length, type: full / first / middle / last).
    wandb 0.31 ships no Python reader of it (its sync is in the Go core)."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # full, last
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_offline_run(run_file: Path) -> tuple[str, dict[int, dict]]:
    """(run id, {step: {key: value}}) of one offline run; nested keys (images) joined with '.'."""
    run_id, history = None, {}
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id = record.run.run_id
        elif kind == "history":
            row = {".".join(item.nested_key) or item.key: json.loads(item.value_json) for item in record.history.item}
            history.setdefault(record.history.step.num, {}).update(row)
    return run_id, history


def numeric(record: dict) -> dict[str, float]:
    return {k: v for k, v in record.items() if isinstance(v, int | float) and not isinstance(v, bool) and k != "step"}


# ----------------------------------------------------------------------------------------------- end to end


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """W&B offline, its files under tmp_path/wandb_dir; wandb reads the environment once per process, so its
    process-wide state is reset around the test."""
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    wandb.teardown()
    yield
    wandb.teardown()



@pytest.mark.slow
def test_trackers_hold_the_scalars_grids_and_monitors(tmp_path, offline_wandb):
    import matplotlib.image

    from erw_fast.evaluation.inception import build_fid_inception

    inception = tmp_path / "inception.pt"  # offline: a random network in the real format
    torch.save(build_fid_inception(pretrained=False, seed=0).net.state_dict(), inception)
    config = tiny_config(tmp_path, "tracked", "logging.tensorboard=true", "logging.wandb=true", *MONITORS,
                         "logging.fid_every=14", "logging.fid_samples=4", f"logging.fid_inception={inception}")
    Trainer(config).run()
    records = read(config.run_dir)
    monitored = [json.loads(line) for line in (config.run_dir / "monitor.jsonl").read_text().splitlines()]
    cknna = {r["step"]: r["cknna"] for r in monitored if "cknna" in r}
    fid = {r["step"]: r["fid"] for r in monitored if "fid" in r}
    assert sorted(cknna) == [7, 14] and sorted(fid) == [14]

    # TensorBoard: every numeric field of every record at its step (float32 in the event file), the grids
    # (the same pixels as the PNGs), the monitors and the switch.
    acc = tensorboard_events(config.run_dir / "tb")
    for key in {k for r in records for k in numeric(r)}:
        expected = {r["step"]: r[key] for r in records if isinstance(r.get(key), int | float)}
        got = tb_scalars(acc, key)
        assert sorted(got) == sorted(expected), key
        assert all(got[s] == pytest.approx(v, rel=1e-6, abs=1e-7) for s, v in expected.items()), key
    for tag, suffix in (("samples", ""), ("samples_cfg", "_cfg4")):
        images = {e.step: e for e in acc.Images(tag)}
        assert sorted(images) == [7, 14], tag
        for step, event in images.items():
            tb_pixels = matplotlib.image.imread(io.BytesIO(event.encoded_image_string), format="png")
            png = matplotlib.image.imread(config.run_dir / "samples" / f"step_{step:07d}{suffix}.png")
            assert np.array_equal(tb_pixels[..., :3], png[..., :3]), (tag, step)
    assert tb_scalars(acc, "fid") == pytest.approx(fid)
    for step, values in cknna.items():
        for block, value in enumerate(values, start=1):
            assert tb_scalars(acc, f"cknna/block_{block:02d}")[step] == pytest.approx(value, abs=1e-6)
        assert tb_scalars(acc, "cknna/max")[step] == pytest.approx(max(values), abs=1e-6)
    assert tb_scalars(acc, "phase_switch") == {6: 1.0}  # ERW's switch step (erw.warmup_steps=6), not step 8
    from tensorboard.util.tensor_util import make_ndarray

    [text] = acc.Tensors("phase_switch_text/text_summary")
    assert text.step == 6 and make_ndarray(text.tensor_proto).item().decode() == "step 6: warmup → full"
    assert tb_scalars(acc, "phase_index") == {r["step"]: float(r["step"] > 6) for r in records}

    # W&B (offline): the same history, the grids as images, the run id of <run_dir>/wandb_id.
    run_id = (config.run_dir / WANDB_ID_FILE).read_text().strip()
    [run_file] = (tmp_path / "wandb_dir" / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    got_id, history = wandb_offline_run(run_file)
    assert got_id == run_id
    for record in records:
        row = history[record["step"]]
        for key, value in numeric(record).items():
            assert row[key] == pytest.approx(value, rel=1e-12), (record["step"], key)
    for step in (7, 14):
        assert history[step]["samples._type"] == "image-file" and history[step]["samples_cfg._type"] == "image-file"
        assert (run_file.parent / "files" / history[step]["samples_cfg.path"]).is_file()
        assert history[step]["cknna/max"] == pytest.approx(max(cknna[step]), abs=1e-9)
    assert history[14]["fid"] == pytest.approx(fid[14])
    assert history[6]["phase_switch"] == 1 and "full" in history[6]["phase_switch_text"]


@pytest.mark.slow
def test_resumed_run_keeps_one_history_and_one_wandb_run(tmp_path, monkeypatch, offline_wandb):
    """Killed after 11 steps (checkpoint at 8): steps 9-11 are logged twice. TensorBoard keeps the resumed values
    only (purge_step), W&B resumes the stored run id."""
    from test_trainer import Killed, kill_after

    extra = ("logging.tensorboard=true", "logging.wandb=true")
    with monkeypatch.context() as patch:
        kill_after(patch, 11)
        with pytest.raises(Killed):
            Trainer(tiny_config(tmp_path, "resumed", *extra)).run()
    run_dir = tmp_path / "resumed"
    first_id = (run_dir / WANDB_ID_FILE).read_text().strip()
    Trainer(tiny_config(tmp_path, "resumed", *extra)).run()
    records = read(run_dir)
    assert [r["step"] for r in records] == list(range(1, 15))

    acc = tensorboard_events(run_dir / "tb")
    assert tb_scalars(acc, "loss") == pytest.approx({r["step"]: r["loss"] for r in records}, rel=1e-6)
    assert (run_dir / WANDB_ID_FILE).read_text().strip() == first_id
    runs = sorted((tmp_path / "wandb_dir" / "wandb").glob("offline-run-*"))
    # wandb names a run directory offline-run-<time>-<id>, with "-1" added when two start within one second
    assert len(runs) == 2 and all(re.fullmatch(rf"offline-run-\d{{8}}_\d{{6}}-{first_id}(-\d+)?", r.name)
                                  for r in runs)
    histories = [wandb_offline_run(next(r.glob("*.wandb"))) for r in runs]
    assert [h[0] for h in histories] == [first_id, first_id]
    assert sorted(histories[0][1]) == list(range(1, 12)) and sorted(histories[1][1]) == list(range(9, 15))
    assert {s: row["loss"] for s, row in histories[1][1].items()} == pytest.approx(
        {r["step"]: r["loss"] for r in records if r["step"] >= 9}, rel=1e-12)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_log_file_gets_one_plain_line_per_logging_step_from_rank_0(tmp_path, monkeypatch):
    """Two ranks under torchrun with the output in pipes, as under SLURM: logging.progress=true draws no bar there,
    rank 0 alone prints the lines and writes the trackers."""
    monkeypatch.setenv("WANDB_MODE", "offline")  # inherited by the ranks
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    out = launch(tmp_path, "piped", "logging.progress=true", "logging.log_every=3", "logging.tensorboard=true",
                 "logging.wandb=true")
    assert "\r" not in out
    lines = [line for line in out.splitlines() if line.startswith("step ")]
    assert len(list((tmp_path / "piped" / "tb").iterdir())) == 1
    assert len(list((tmp_path / "wandb_dir" / "wandb").glob("offline-run-*"))) == 1
    records = read(tmp_path / "piped")
    assert [r["step"] for r in records] == [3, 6, 9, 12, 14]  # every log_every steps and each phase's last
    assert len(lines) == len(records)
    for line, record in zip(lines, records, strict=True):
        assert line.startswith(f"step {record['step']}/14 [{record['phase']}] loss {record['loss']:.4f} ")
        for key in ("loss_align", "loss_diffusion"):
            if key in record:
                assert f" {key[5:]} {record[key]:.4f} " in line
        if record["lambda"] is None:  # Phase 1
            assert " λ " not in line
        else:
            assert f" λ {record['lambda']:.4f} " in line
        assert f"| {record['img_per_s']:.1f} img/s | ETA " in line


# ----------------------------------------------------------------------------------------------- units


def test_guided_grid_differs_and_equals_the_sampler_at_that_scale(tmp_path):
    config = tiny_config(tmp_path, "grid", "logging.sample_count=4", "logging.sample_steps=3",
                         "logging.sample_cfg_scale=2.5")
    teacher = load_teacher(config, torch.device("cpu"), config.model.num_tokens(), lambda _: None)
    phase = plan_phases(config, teacher, "torch")[-1]
    model = phase.build_model(config.model.sit_kwargs(teacher.z_dims, "sdpa"))
    with torch.no_grad():  # a trained-looking model: the zero-initialised output layers would ignore the label
        gen = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    monitor = TrainingMonitor(config, config.run_dir, torch.device("cpu"), held_out_batch=None)
    assert monitor.sample_scales() == (1.0, 2.5)
    plain, guided = (monitor.sample_grid(model, scale) for scale in monitor.sample_scales())
    assert not torch.equal(plain, guided)

    g = torch.Generator().manual_seed(config.run.seed + 4242)  # the monitor's fixed inputs, drawn independently
    noise = torch.randn(4, config.model.in_channels, 8, 8, generator=g)
    labels = torch.arange(4) % config.model.num_classes
    decode = build_codec("toy", device=torch.device("cpu"), image_size=64, latent_size=8, latent_channels=4).decode
    model.eval()
    for scale, grid in ((1.0, plain), (2.5, guided)):
        latents = euler_sampler(model, noise, labels, num_steps=3, cfg_scale=scale)
        assert torch.equal(grid, make_image_grid(decode(latents.float()))), scale

    one = TrainingMonitor(tiny_config(tmp_path, "one", "logging.sample_cfg_scale=1"), tmp_path, torch.device("cpu"),
                          held_out_batch=None)
    assert one.sample_scales() == (1.0,)


def test_log_line_fields_and_eta():
    record = {"step": 100, "phase": "full", "loss": 1.25, "loss_diffusion": 1.0, "loss_align": 0.5,
              "lambda": 0.5, "grad_norm": 2.0, "img_per_s": 512.0, "step_time_s": 0.5}
    assert log_line(record, 1000) == ("step 100/1000 [full] loss 1.2500 diffusion 1.0000 align 0.5000 λ 0.5000 "
                                      "grad 2 | 512.0 img/s | ETA 0:07:30")  # 900 steps × 0.5 s
    assert log_line(record, 1000, eta_s=3725.4).endswith("| ETA 1:02:05")
    warmup = {"step": 2, "phase": "warmup", "loss": math.nan, "lambda": None, "img_per_s": 1.0,
              "step_time_s": 86_400.0}
    assert log_line(warmup, 4) == "step 2/4 [warmup] loss - | 1.0 img/s | ETA 2d 0:00:00"


def test_run_eta_weighs_later_phases_by_their_flops(tmp_path):
    from types import SimpleNamespace

    from erw_fast.flops import gflops_per_step

    config = tiny_config(tmp_path, "eta", "model.depth=8", "erw.warmup_depth=2")  # Phase 1: 2 of 8 blocks
    phases = [SimpleNamespace(name="warmup", start=0, end=6), SimpleNamespace(name="full", start=6, end=14)]
    warmup, full = gflops_per_step(config, "warmup"), gflops_per_step(config, "full")
    assert full > warmup  # (the demo teacher dominates both at this size)
    assert run_eta_s(config, phases, 0, 2, 0.5) == pytest.approx(0.5 * (4 + 8 * full / warmup))
    assert run_eta_s(config, phases, 1, 10, 0.5) == pytest.approx(0.5 * 4)
    unknown = [phases[0], SimpleNamespace(name="no-such-phase", start=6, end=14)]
    assert run_eta_s(config, unknown, 0, 2, 0.5) == pytest.approx(0.5 * 12)  # not countable: weight 1


def test_progress_bar_only_on_a_terminal():
    class Stream(io.StringIO):
        def __init__(self, tty):
            super().__init__()
            self.tty = tty

        def isatty(self):
            return self.tty

    bar, log = Stream(True), Stream(True)
    assert use_progress_bar(True, bar, log) and not use_progress_bar(False, bar, log)
    assert not use_progress_bar(True, Stream(False), log)  # stderr (the bar's) in a file
    assert not use_progress_bar(True, bar, Stream(False))  # stdout (the log's) in a file: plain lines there


def test_phase_switch_marker_sits_at_the_switch_step():
    # log_every=4 with the warmup ending at 6: the warmup logs 4 and 6, the full phase 10, 14.
    records = [{"step": s, "phase": "warmup" if s <= 6 else "full", "loss": 1.0} for s in (4, 6, 10, 14)]
    assert phase_switches(records) == [(6.0, "full")]


def test_wandb_without_a_login_is_one_config_error(tmp_path, monkeypatch):
    import wandb

    from erw_fast.config import ConfigError
    from erw_fast.log_sinks import WandbSink

    for name in ("WANDB_API_KEY", "NETRC", "WANDB_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc, no wandb settings
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_MODE", "online")
    wandb.teardown()  # wandb reads the environment once per process
    try:
        with pytest.raises(ConfigError, match=r"^logging\.wandb: W&B did not start: .*API key.*WANDB_MODE=offline"):
            WandbSink(tmp_path, "erw_fast", "no-login")
    finally:
        wandb.teardown()
    assert (tmp_path / WANDB_ID_FILE).is_file()  # kept for the next invocation


def test_a_loader_that_fails_to_start_leaves_no_tracker_open(tmp_path, monkeypatch):
    """The trackers start before the data loader (a W&B that cannot start is a config error before any worker is
    spawned); a loader error then closes them: the TensorBoard file is flushed and closed, not left to exit."""
    from erw_fast.metrics import MetricsWriter

    closed: list[bool] = []
    close = MetricsWriter.close
    monkeypatch.setattr(MetricsWriter, "close", lambda self: (closed.append(True), close(self))[1])

    def broken(*args, **kwargs):
        raise OSError("shard-000003.tar: No such file or directory")

    monkeypatch.setattr(Trainer, "_build_loader", broken)
    config = tiny_config(tmp_path, "no_data", "logging.tensorboard=true")
    with pytest.raises(OSError, match="shard-000003"):
        Trainer(config).run()
    assert closed == [True] and list((config.run_dir / "tb").glob("events.out.tfevents.*"))
