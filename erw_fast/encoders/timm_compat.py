"""Import timm on machines where torchvision's compiled ops cannot load.

On a CPU-only torch with the PyPI (CUDA) torchvision wheel, `torchvision/_C.so` fails to load, yet
`torchvision/_meta_registrations.py` still calls `torch.library.register_fake("torchvision::nms")` (and
`qnms`) unconditionally, which raises "operator torchvision::nms does not exist" and takes `import timm`
down with it. Declaring the two schemas ourselves (no kernels) lets the import succeed; we never call
torchvision ops. Where `_C.so` loads (matching GPU builds) nothing is changed.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from types import ModuleType

import torch

# Kept alive at module level: dropping the Library object would unregister the schemas.
_TORCHVISION_STUB_LIB: torch.library.Library | None = None


def _op_exists(name: str) -> bool:
    try:
        getattr(torch.ops.torchvision, name)
    except (AttributeError, RuntimeError):
        return False
    return True


def _torchvision_ops_loadable() -> bool:
    """True if torchvision is absent/already imported or its compiled ops load (nothing to patch)."""
    if "torchvision" in sys.modules:
        return True
    spec = importlib.util.find_spec("torchvision")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return True
    pkg_dir = list(spec.submodule_search_locations)[0]
    candidates = [f for f in os.listdir(pkg_dir) if f.startswith("_C") and f.endswith((".so", ".pyd"))]
    if not candidates:
        return False
    try:
        torch.ops.load_library(os.path.join(pkg_dir, candidates[0]))
    except (OSError, RuntimeError):
        return False
    return True


def ensure_torchvision_importable() -> None:
    """Declare `torchvision::nms` / `torchvision::qnms` schemas if torchvision's `_C` cannot load."""
    global _TORCHVISION_STUB_LIB
    if _TORCHVISION_STUB_LIB is not None or _torchvision_ops_loadable():
        return
    missing = [n for n in ("nms", "qnms") if not _op_exists(n)]
    if not missing:
        return
    lib = torch.library.Library("torchvision", "DEF")
    schemas = {
        "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
        "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    }
    for name in missing:
        lib.define(schemas[name])
    _TORCHVISION_STUB_LIB = lib


def import_timm() -> ModuleType:
    """Return the `timm` module, applying the torchvision workaround first when it is needed."""
    ensure_torchvision_importable()
    try:
        import timm
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "erw_fast.encoders needs timm (and torchvision): pip install 'erw-fast[encoders]'"
        ) from exc
    return timm
