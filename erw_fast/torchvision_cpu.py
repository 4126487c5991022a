"""Make ``import torchvision`` work beside a CPU-only torch when the installed torchvision is a CUDA build.

Why: PyPI's Linux torchvision wheel is built against CUDA torch. Beside torch ``+cpu`` its ``_C.so`` cannot load
(it links ``libtorch_cuda.so``), yet ``torchvision/_meta_registrations.py`` registers fake kernels for
``torchvision::nms``/``qnms`` unconditionally, so ``import torchvision`` (and timm, diffusers, a user's
``torchvision.utils.save_image``) dies with "operator torchvision::nms does not exist". The matching CPU wheel
lives on download.pytorch.org, which offline / mirrored machines cannot reach.

What this does, only where ``_C.so`` fails to load (nothing changes where it loads):

- before torchvision is imported: declares the two operator schemas and gives ``torchvision::nms`` a CPU kernel
  written in plain torch (greedy NMS in descending-score order, the semantics of torchvision's C++ kernel);
- after: points ``torchvision.ops.nms`` (and the ``batched_nms`` that calls it) at that operator, since
  torchvision's Python wrapper refuses to run without ``_C``. Every other compiled op (``roi_align``, video/image
  decoding) keeps torchvision's own "Couldn't load custom C++ ops" error.

Two ways in: ``install()`` (the project calls it before importing timm/diffusers/torchvision), and a ``.pth``
start-up hook in the virtual environment (``python -m erw_fast.torchvision_cpu --install``, run by the Makefile)
so any script in the venv gets it. The hook copy is this file, standalone: stdlib at import, torch only once
torchvision is being imported.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from typing import Any

HOOK_MODULE = "_erw_fast_torchvision_cpu"  # the name of this file's copy in site-packages

_LIB: Any = None  # the torch.library.Library holding the schemas; dropping it would unregister them
_ACTIVE = False  # schemas + kernel installed by us (so the post-import patch applies)


def _compiled_ops_load(pkg_dir: str) -> bool:
    import torch

    candidates = [f for f in os.listdir(pkg_dir) if f.startswith("_C") and f.endswith((".so", ".pyd"))]
    if not candidates:
        return False
    try:
        torch.ops.load_library(os.path.join(pkg_dir, candidates[0]))
    except (OSError, RuntimeError):
        return False
    return True


def nms_reference(dets: Any, scores: Any, iou_threshold: float) -> Any:
    """Greedy NMS on (N, 4) xyxy boxes: indices kept, by decreasing score (ties: the lower index first)."""
    import torch

    if dets.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=dets.device)
    order = torch.sort(scores, stable=True, descending=True).indices
    boxes = dets[order]
    x1, y1, x2, y2 = boxes.unbind(1)
    area = (x2 - x1) * (y2 - y1)
    wh = (torch.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
          - torch.maximum(boxes[:, None, :2], boxes[None, :, :2])).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    iou = inter / (area[:, None] + area[None, :] - inter)
    over = (iou > iou_threshold).cpu()
    suppressed = torch.zeros(len(order), dtype=torch.bool)
    keep = []
    for i in range(len(order)):
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= over[i]
    return order[torch.tensor(keep, dtype=torch.long, device=order.device)]


def _define_ops() -> None:
    global _LIB, _ACTIVE
    import torch

    def exists(name: str) -> bool:
        try:
            getattr(torch.ops.torchvision, name)
        except (AttributeError, RuntimeError):
            return False
        return True

    missing = [n for n in ("nms", "qnms") if not exists(n)]
    if not missing:
        return
    lib = torch.library.Library("torchvision", "DEF")
    for name in missing:
        lib.define(f"{name}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    if "nms" in missing:
        lib.impl("nms", nms_reference, "CPU")
    _LIB, _ACTIVE = lib, True


def _patch_ops() -> None:
    """After torchvision is imported: its ``ops.nms`` wrapper refuses to run without ``_C``; route it to the op."""
    boxes = sys.modules.get("torchvision.ops.boxes")
    if not _ACTIVE or boxes is None:
        return
    import torch

    def nms(boxes_: Any, scores: Any, iou_threshold: float) -> Any:
        return torch.ops.torchvision.nms(boxes_, scores, iou_threshold)

    nms.__doc__ = boxes.nms.__doc__
    boxes.nms = nms  # batched_nms looks the name up in this module
    ops = sys.modules.get("torchvision.ops")
    if ops is not None:
        ops.nms = nms


class _Loader(importlib.abc.Loader):
    def __init__(self, inner: Any, finder: Any) -> None:
        self.inner, self.finder = inner, finder

    def create_module(self, spec: Any) -> Any:
        return self.inner.create_module(spec)

    def exec_module(self, module: Any) -> None:
        if self.finder in sys.meta_path:
            sys.meta_path.remove(self.finder)  # imported: nothing left to do
        self.inner.exec_module(module)
        _patch_ops()


class _Finder(importlib.abc.MetaPathFinder):
    """Runs the fix when ``torchvision`` is imported (nothing else is touched). A bare ``find_spec`` (a check
    whether torchvision is installed) only declares the schemas; the finder stays until the import happens."""

    def __init__(self) -> None:
        self._busy = False
        self._ops_load: bool | None = None  # whether torchvision's _C loads here (asked once)

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != "torchvision" or self._busy:
            return None
        self._busy = True  # the normal finders locate the package (this finder is asked again: it declines)
        try:
            spec = importlib.util.find_spec("torchvision")
        finally:
            self._busy = False
        if spec is None or not spec.submodule_search_locations or spec.loader is None:
            return spec
        if self._ops_load is None:
            self._ops_load = _compiled_ops_load(list(spec.submodule_search_locations)[0])
        if not self._ops_load:
            _define_ops()
            spec.loader = _Loader(spec.loader, self)
        return spec


def install() -> None:
    """Apply the fix to the next ``import torchvision`` (no-op once torchvision is imported or the hook is set)."""
    # The venv's start-up copy (another module object) may have placed its finder already.
    if "torchvision" in sys.modules or any(type(f).__name__ == "_Finder" for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _Finder())


def install_hook(site_packages: str | None = None) -> str:
    """Copy this file into site-packages with a ``.pth`` that imports it at interpreter start; returns the path."""
    import shutil
    import sysconfig

    target = site_packages or sysconfig.get_paths()["purelib"]
    shutil.copyfile(__file__, os.path.join(target, HOOK_MODULE + ".py"))
    pth = os.path.join(target, HOOK_MODULE + ".pth")
    with open(pth, "w") as f:
        f.write(f"import {HOOK_MODULE}; {HOOK_MODULE}.install()\n")
    return pth


if __name__ == "__main__":
    if sys.argv[1:] != ["--install"]:
        sys.exit("usage: python -m erw_fast.torchvision_cpu --install   (adds the start-up hook to this venv)")
    print(f"wrote {install_hook()}")
