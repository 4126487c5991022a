"""Import timm on machines where torchvision's compiled ops cannot load (a CUDA torchvision wheel beside CPU
torch): the fix itself, and why, is ``erw_fast.torchvision_cpu``; where ``_C.so`` loads nothing is changed."""

from __future__ import annotations

from types import ModuleType

from erw_fast.torchvision_cpu import install as _install_torchvision_fix


def ensure_torchvision_importable() -> None:
    """Call before anything imports torchvision (timm, diffusers, the FID Inception)."""
    _install_torchvision_fix()


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
