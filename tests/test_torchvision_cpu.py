"""torchvision in the project's venv: importable, ops.nms and utils.save_image working, beside CPU torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from erw_fast.torchvision_cpu import nms_reference


def _greedy_nms(boxes: list[list[float]], scores: list[float], thr: float) -> list[int]:
    """Textbook greedy NMS in plain Python floats (float64)."""
    def iou(a: list[float], b: list[float]) -> float:
        w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        inter = w * h
        union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
        return inter / union

    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    keep: list[int] = []
    for i in order:
        if all(iou(boxes[i], boxes[k]) <= thr for k in keep):
            keep.append(i)
    return keep


def _boxes(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g, dtype=torch.float64) * 20
    wh = torch.rand(n, 2, generator=g, dtype=torch.float64) * 8 + 0.5
    return torch.cat([xy, xy + wh], 1), torch.rand(n, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("thr", [0.0, 0.3, 0.7])
def test_nms_kernel_matches_greedy_reference(thr):
    boxes, scores = _boxes(60, seed=int(thr * 10))
    got = nms_reference(boxes, scores, thr).tolist()
    assert got == _greedy_nms(boxes.tolist(), scores.tolist(), thr)
    assert nms_reference(boxes[:0], scores[:0], thr).numel() == 0


_SCRIPT = r"""
import json, sys, tempfile, os
import importlib.util
assert importlib.util.find_spec("torchvision") is not None  # an "is it installed?" check first (preflight does)
import torch, torchvision
from torchvision.utils import save_image
boxes = torch.tensor(json.loads(sys.argv[1]), dtype=torch.float32)
scores = torch.tensor(json.loads(sys.argv[2]), dtype=torch.float32)
keep = torchvision.ops.nms(boxes, scores, 0.4).tolist()
batched = torchvision.ops.batched_nms(boxes, scores, torch.zeros(len(scores), dtype=torch.long), 0.4).tolist()
path = os.path.join(tempfile.mkdtemp(), "grid.png")
save_image(torch.rand(4, 3, 8, 8), path)
print(json.dumps({"keep": keep, "batched": batched, "png": os.path.getsize(path) > 0}))
"""


@pytest.mark.multiprocess
def test_import_torchvision_in_venv_subprocess(tmp_path):
    """A user's script in the venv (no erw_fast import): what the Makefile's start-up hook guarantees."""
    boxes, scores = _boxes(40, seed=3)
    boxes, scores = boxes.float().double(), scores.float().double()  # the float32 values the script sees
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(boxes.tolist()), json.dumps(scores.tolist())],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    want = _greedy_nms(boxes.tolist(), scores.tolist(), 0.4)
    assert got["keep"] == want and got["batched"] == want and got["png"]


@pytest.mark.multiprocess
def test_the_installed_hook_alone_makes_torchvision_importable(tmp_path):
    """What `make` installs (python -m erw_fast.torchvision_cpu --install), without the venv's own copy: the
    interpreter starts with -S (no site .pth files), gets site-packages on its path, then only our hook's dir."""
    import sysconfig

    from erw_fast.torchvision_cpu import HOOK_MODULE, install_hook

    pth = install_hook(str(tmp_path))
    assert pth == str(tmp_path / f"{HOOK_MODULE}.pth") and (tmp_path / f"{HOOK_MODULE}.py").is_file()
    script = ("import sys, site; sys.path[:0] = [sys.argv[1]]; site.addsitedir(sys.argv[2]); import torch, "
              "torchvision; print(torchvision.ops.nms(torch.tensor([[0., 0, 2, 2], [0, 0, 2, 1.9], [5, 5, 6, 6]]), "
              "torch.tensor([0.9, 0.8, 0.7]), 0.5).tolist())")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-S", "-c", script, sysconfig.get_paths()["purelib"], str(tmp_path)],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[0, 2]"  # box 1 overlaps box 0 (IoU 0.95) and goes
