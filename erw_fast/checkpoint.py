"""Checkpoint I/O for the trainer: atomic saves, safe loads, retention, RNG state and reference-layout export.

Design rules:
- Every file is written by ``erw_fast.atomic`` (temp file in the same directory -> flush + fsync ->
  ``os.replace`` -> fsync of the directory). A crash at any point leaves either the old file set or the new one,
  never a torn checkpoint. Temp files start with ``.tmp-`` so readers never mistake them for checkpoints; the next
  successful save in the same directory removes leftovers (one writer per directory is assumed, i.e. rank 0 only).
- Checkpoints hold plain data only, so they always load with ``torch.load(weights_only=True)`` (no arbitrary code
  runs on load, and files stay readable when this package's classes change). ``save_checkpoint`` rejects anything
  else *before* writing, naming the offending key path, instead of producing a file that cannot be resumed from.
- Layout: ``run_dir/checkpoints/step_0001000.pt`` (rotated, keep-last-k) and ``{tag}_0001000.pt`` (e.g. the
  ``phase1`` hand-off; never rotated).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pickle
import random
import re
import shutil
import zlib
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from erw_fast.atomic import TMP_PREFIX, atomic_write, remove_temp_files
from erw_fast.errors import InputError

__all__ = [
    "CHECKPOINT_SUBDIR",
    "CHECKSUM_KEY",
    "ENGINE_SUBDIRS",
    "CheckpointError",
    "capture_rng_state",
    "checkpoint_name",
    "export_reference_checkpoint",
    "export_safetensors",
    "import_reference_checkpoint",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "prune_engine_dirs",
    "restore_rng_state",
    "save_checkpoint",
    "strip_wrapper_prefixes",
    "tensor_checksums",
]

CHECKPOINT_SUBDIR = "checkpoints"
_UNTAGGED = "step"  # file stem prefix of rotated checkpoints
# `{tag}_{step}.pt`; the tag may itself contain underscores (the greedy group backs off to the last `_digits`).
_NAME_RE = re.compile(r"^(?P<tag>[A-Za-z0-9][A-Za-z0-9_.-]*)_(?P<step>\d+)\.pt$")
_TAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

# Leaf types torch's weights-only unpickler reconstructs without allow-listing anything.
_PLAIN_SCALARS = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device)
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)  # exact types: other tensor subclasses need their class global


# ----------------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------------


def _check_plain(obj: Any, path: str, active: set[int]) -> None:
    """Raise TypeError at the first value `torch.load(weights_only=True)` could not rebuild."""
    t = type(obj)
    # Exact types on purpose: subclasses (np.float64 is a float, IntEnum an int) pickle by class reference.
    if t in _PLAIN_SCALARS or t in _PLAIN_TENSORS:
        return
    if t in (dict, OrderedDict):
        _enter(obj, path, active)
        for k, v in obj.items():
            if type(k) not in (str, int, float, bool, type(None), tuple):
                raise TypeError(
                    f"checkpoint state is not plain data: a key of {path} is a {t.__module__}.{type(k).__qualname__} "
                    f"({k!r}); use str/int keys"
                )
            _check_plain(v, f"{path}[{k!r}]", active)
        active.discard(id(obj))
        return
    if t in (list, tuple, torch.Size):
        _enter(obj, path, active)
        for i, v in enumerate(obj):
            _check_plain(v, f"{path}[{i}]", active)
        active.discard(id(obj))
        return
    hint = ""
    if isinstance(obj, os.PathLike):
        hint = "; store str(path)"
    elif isinstance(obj, (np.ndarray, np.generic)):
        hint = "; convert with torch.from_numpy(...) or .item()/.tolist()"
    elif isinstance(obj, torch.nn.Module):
        hint = "; store module.state_dict()"
    elif isinstance(obj, torch.optim.Optimizer):
        hint = "; store optimizer.state_dict()"
    elif hasattr(obj, "__dataclass_fields__"):
        hint = "; store dataclasses.asdict(...)"
    elif isinstance(obj, argparse.Namespace):
        hint = "; store vars(args)"
    raise TypeError(
        f"checkpoint state is not plain data: {path} is a {t.__module__}.{t.__qualname__}, which "
        f"torch.load(weights_only=True) cannot rebuild{hint}"
    )


def _enter(obj: Any, path: str, active: set[int]) -> None:
    # Containers on the current path: a cycle would otherwise recurse until RecursionError.
    if id(obj) in active:
        raise TypeError(f"checkpoint state is not plain data: {path} contains itself (reference cycle)")
    active.add(id(obj))


def _validate_plain(obj: Any, root: str = "state") -> None:
    _check_plain(obj, root, set())


# ----------------------------------------------------------------------------------------------------------------
# Atomic writes
# ----------------------------------------------------------------------------------------------------------------


def _atomic_write(final: Path, write: Callable[[BinaryIO], None]) -> Path:
    """`atomic_write`, then the temp files of earlier killed saves go (one writer per checkpoint directory)."""
    final = atomic_write(final, write)
    remove_temp_files(final.parent)
    return final


# ----------------------------------------------------------------------------------------------------------------
# Tensor checksums
# ----------------------------------------------------------------------------------------------------------------

CHECKSUM_KEY = "tensor_crc32"  # {key path: crc32 of the tensor's bytes}, added by save_checkpoint


class CheckpointError(InputError):
    """A checkpoint that cannot be used: unreadable, not plain data, or its tensors differ from when it was saved."""


def _tensors(obj: Any, path: str = "") -> Any:
    """(key path, tensor) of every tensor in plain checkpoint state, in a fixed order."""
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{path}/{k}")
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{path}/{i}")


def _crc32(t: torch.Tensor) -> int:
    # The bytes torch.save writes for the tensor's elements; zlib's CRC-32 runs at ~2.6 GB/s on one core here
    # (40 ms for a 105 MB state, against 140 ms for torch.save to memory), so every save can afford it.
    flat = t.detach().cpu().contiguous().reshape(-1)
    return zlib.crc32(flat.view(torch.uint8).numpy()) if flat.numel() else 0


def tensor_checksums(state: dict) -> dict[str, int]:
    """The CRC-32 of every tensor in ``state`` (except sparse/quantized ones, which checkpoints do not hold)."""
    return {p: _crc32(t) for p, t in _tensors(state) if t.layout == torch.strided and not t.is_quantized}


def _suggest_previous(path: Path) -> str:
    """What to resume from instead of ``path``: the newest older checkpoint that loads and verifies (each one tried
    is read in full; this runs only when ``path`` is bad)."""
    candidate = _previous_checkpoint(path)
    while candidate is not None:
        try:
            load_checkpoint(candidate, suggest=False)
        except (CheckpointError, OSError):
            candidate = _previous_checkpoint(candidate)
            continue
        return (f"resume from the previous checkpoint {candidate}, the last good one: checkpoint.resume={candidate}, "
                f"or move {path.name} out of {path.parent} and rerun (checkpoint.resume=auto takes the newest left)")
    return "no previous checkpoint of this run loads either: restore the file from a copy, or start over"


def _verify(state: dict, path: Path, suggest: bool) -> dict:
    expected = state.pop(CHECKSUM_KEY, None)
    if expected is None:  # written before checksums existed: loads as it always did, unverified
        return state
    found = tensor_checksums(state)
    bad = next((k for k in expected.keys() | found.keys() if expected.get(k) != found.get(k)), None)
    if bad is not None:
        what = "missing" if bad not in found else "not in its checksum table" if bad not in expected else "changed"
        raise CheckpointError(
            f"checkpoint {path} is corrupt: tensor {bad} is {what} since it was saved (a flipped bit on disk, in "
            f"memory or in a copy); {_suggest_previous(path) if suggest else 'refusing it'}")
    return state


def _torch_save_to(obj: Any) -> Callable[[BinaryIO], None]:
    # Looks `torch.save` up at call time (tests patch it to simulate a crash mid-write).
    return lambda f: torch.save(obj, f)


# ----------------------------------------------------------------------------------------------------------------
# Trainer checkpoints
# ----------------------------------------------------------------------------------------------------------------


def _checkpoint_dir(run_dir: str | os.PathLike[str]) -> Path:
    return Path(run_dir) / CHECKPOINT_SUBDIR


def _parse_name(path: Path) -> tuple[int, str | None] | None:
    """(step, tag) for a finished checkpoint file name, tag None for rotated `step_*` files; None otherwise."""
    if path.name.startswith(TMP_PREFIX):
        return None
    m = _NAME_RE.match(path.name)
    if m is None:
        return None
    tag = m.group("tag")
    return int(m.group("step")), (None if tag == _UNTAGGED else tag)


def _sort_key(item: tuple[Path, int, str | None]) -> tuple[int, bool, str]:
    _, step, tag = item
    # Within one step tagged files come first (alphabetically), the untagged one last: latest = list[-1].
    return step, tag is None, tag or ""


def _scan(run_dir: str | os.PathLike[str]) -> list[tuple[Path, int, str | None]]:
    directory = _checkpoint_dir(run_dir)
    if not directory.is_dir():
        return []
    found = []
    for p in directory.iterdir():
        parsed = _parse_name(p)
        if parsed is not None and p.is_file():
            found.append((p, *parsed))
    return sorted(found, key=_sort_key)


def save_checkpoint(state: dict, run_dir: str | Path, step: int, keep_last: int = 3, tag: str | None = None) -> Path:
    """Atomically write `state` to ``run_dir/checkpoints/{tag or 'step'}_{step:07d}.pt`` and rotate old ones.

    `state` must be plain data (tensors, Python scalars/str/bytes/None, dtypes/devices, and dicts/lists/tuples of
    those); anything else raises TypeError naming the key path, before any file or directory is created.
    After the write, untagged checkpoints beyond the newest `keep_last` are deleted (the file just written is always
    kept, even when older-numbered than stale ones); tagged checkpoints are never deleted.
    """
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    if not isinstance(keep_last, int) or keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last!r}")
    if tag is not None and (not _TAG_RE.match(tag) or tag == _UNTAGGED):
        raise ValueError(f"invalid checkpoint tag {tag!r}: use [A-Za-z0-9][A-Za-z0-9_.-]* and not {_UNTAGGED!r}")
    if not isinstance(state, dict):
        raise TypeError(f"checkpoint state must be a dict, got {type(state).__qualname__}")
    _validate_plain(state)
    if CHECKSUM_KEY in state:
        raise ValueError(f"{CHECKSUM_KEY!r} is reserved for the checksums save_checkpoint adds")

    final = _checkpoint_dir(run_dir) / f"{checkpoint_name(step, tag)}.pt"
    _atomic_write(final, _torch_save_to({**state, CHECKSUM_KEY: tensor_checksums(state)}))

    untagged = [p for p, _, t in _scan(run_dir) if t is None and p != final]
    # `final` occupies one of the keep_last slots.
    for p in untagged[: max(len(untagged) - (keep_last - 1), 0)]:
        with contextlib.suppress(OSError):  # a file that cannot go now goes with a later save
            p.unlink()
    return final


def checkpoint_name(step: int, tag: str | None = None) -> str:
    """The stem of a checkpoint's state file (``step_0001000``), also naming an engine's files for it."""
    return f"{tag or _UNTAGGED}_{step:07d}"


# Engines that write their own files (DeepSpeed) put them in these directories, one entry per checkpoint name.
ENGINE_SUBDIRS = ("deepspeed", "deepspeed-universal")


def prune_engine_dirs(run_dir: str | Path) -> list[Path]:
    """Delete engine checkpoint directories whose state file is gone (rotated out) or was never written (a save
    interrupted before it completed). Call after a successful save, on one rank."""
    directory = _checkpoint_dir(run_dir)
    removed = []
    for sub in ENGINE_SUBDIRS:
        root = directory / sub
        if not root.is_dir():
            continue
        for entry in root.iterdir():
            if entry.is_dir() and not (directory / f"{entry.name}.pt").is_file():
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
    return removed


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """All finished checkpoints (tagged and untagged) in ``run_dir/checkpoints``, sorted by step then tag.

    Within one step, tagged files come first (alphabetically) and the untagged one last. Temp files are ignored.
    """
    return [p for p, _, _ in _scan(run_dir)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The finished checkpoint with the highest step (ties: the untagged one), or None when there is none."""
    found = _scan(run_dir)
    return found[-1][0] if found else None


def _previous_checkpoint(path: Path) -> Path | None:
    parsed = _parse_name(path)
    if parsed is None or path.parent.name != CHECKPOINT_SUBDIR:
        return None
    older = [p for p, s, _ in _scan(path.parent.parent) if s < parsed[0]]
    return older[-1] if older else None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", *, suggest: bool = True) -> dict:
    """Load a checkpoint with ``weights_only=True`` and verify its tensors against the checksums saved with them.

    Missing file -> FileNotFoundError. Unreadable (truncated, corrupt, holding non-plain objects) or a tensor whose
    checksum differs -> CheckpointError naming the file and the newest older checkpoint that loads (``suggest``).
    Checkpoints written before checksums existed load unverified.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"could not read checkpoint {path} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            f"the file is truncated, corrupt or not plain data -- {_suggest_previous(path) if suggest else 'refused'}"
        ) from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a checkpoint's state dict")
    return _verify(state, path, suggest)


# ----------------------------------------------------------------------------------------------------------------
# RNG state
# ----------------------------------------------------------------------------------------------------------------


def capture_rng_state() -> dict:
    """Snapshot of the global torch / CUDA / Python `random` / NumPy generators, as weights-only-loadable data.

    Python's and NumPy's states are tuples holding large ints / a uint32 array, re-encoded as int64 tensors.
    """
    py_version, py_internal, py_gauss = random.getstate()
    np_state = np.random.get_state(legacy=True)
    assert isinstance(np_state, tuple)
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np_state
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": {
            "version": int(py_version),
            "internal": torch.tensor(py_internal, dtype=torch.int64),  # 624 uint32 words + position
            "gauss_next": None if py_gauss is None else float(py_gauss),
        },
        "numpy": {
            "name": str(np_name),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64).copy()),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_cached),
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    """Restore generators from `capture_rng_state()` output (missing entries are left untouched)."""
    if "torch" in state:
        # .cpu(): the checkpoint may have been loaded with map_location="cuda".
        torch.set_rng_state(state["torch"].cpu())
    if "python" in state:
        py = state["python"]
        internal = tuple(int(x) for x in py["internal"].tolist())
        random.setstate((int(py["version"]), internal, py["gauss_next"]))
    if "numpy" in state:
        nps = state["numpy"]
        keys = np.asarray(nps["keys"].cpu().numpy(), dtype=np.uint32)
        np.random.set_state((nps["name"], keys, int(nps["pos"]), int(nps["has_gauss"]), float(nps["cached_gaussian"])))
    if state.get("cuda") and torch.cuda.is_available():
        cuda_states = [s.cpu() for s in state["cuda"]]
        # A resume on fewer/more GPUs restores the devices both runs have; extra devices keep their seed.
        n = min(len(cuda_states), torch.cuda.device_count())
        for i in range(n):
            torch.cuda.set_rng_state(cuda_states[i], device=i)


# ----------------------------------------------------------------------------------------------------------------
# Reference (REPA / ERW) layout and safetensors
# ----------------------------------------------------------------------------------------------------------------

_LEADING_PREFIXES = ("module.", "_orig_mod.")


def strip_wrapper_prefixes(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Drop leading ``module.`` (DDP) / ``_orig_mod.`` (torch.compile) prefixes, in any nesting order."""
    out: dict[str, Any] = {}
    for key, value in state_dict.items():
        new = key
        while isinstance(new, str) and new.startswith(_LEADING_PREFIXES):
            new = new.split(".", 1)[1]
        if new in out:
            raise ValueError(f"state dict keys collide after stripping wrapper prefixes: {key!r} -> {new!r}")
        out[new] = value
    return out


def export_reference_checkpoint(model_state: dict, ema_state: dict, args: dict, step: int, out_dir: str | Path) -> Path:
    """Write ``out_dir/{step:07d}.pt`` = ``{"model", "ema", "args", "steps"}`` as the REPA/ERW `generate.py` reads.

    Wrapper prefixes are stripped so the reference SiT loads the weights with strict=True. `args` must be a plain
    dict (the reference pickles an argparse.Namespace, which needs allow-listing on load; a dict does not).
    """
    if not isinstance(args, dict):
        raise TypeError(f"args must be a plain dict (e.g. vars(namespace)), got {type(args).__qualname__}")
    payload = {
        "model": strip_wrapper_prefixes(dict(model_state)),
        "ema": strip_wrapper_prefixes(dict(ema_state)),
        "args": dict(args),
        "steps": int(step),
    }
    _validate_plain(payload, "checkpoint")
    return _atomic_write(Path(out_dir) / f"{int(step):07d}.pt", _torch_save_to(payload))


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def _load_reference(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # Reference training checkpoints pickle `args` as an argparse.Namespace, which the weights-only unpickler
        # refuses. Namespace only carries attributes (no code runs on rebuild), so allow-listing it alone is safe;
        # anything else still refuses to load.
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)


def import_reference_checkpoint(path: str | Path) -> dict:
    """Read a reference-style checkpoint into ``{"model", "ema", "args", "steps"}``.

    Accepts the reference training layout (``{"model", "ema", "opt", "args", "steps"}``; `args` as an
    argparse.Namespace is allow-listed for this load only and returned as a dict), the exported layout, or a bare
    state dict (then ``ema`` is None). A file holding only ``ema`` returns it as ``model`` too. Leading
    ``module.`` / ``_orig_mod.`` key prefixes are stripped. Always ``weights_only=True``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference checkpoint not found: {path}")
    try:
        raw = _load_reference(path)
    except Exception as exc:
        raise RuntimeError(
            f"could not read reference checkpoint {path} with weights_only=True "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from exc
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a dict checkpoint, got {type(raw).__qualname__}")
    raw = _verify(raw, path, suggest=False)  # a trainer checkpoint's tensor checksums (other files have none)

    if isinstance(raw.get("engine"), dict) and raw["engine"].get("kind") == "deepspeed":
        # A DeepSpeed-engine trainer checkpoint: the raw weights live in DeepSpeed's files beside it.
        from erw_fast.engines.deepspeed_files import read_deepspeed_weights

        raw = {**raw, "model": read_deepspeed_weights(path, raw)}
    if "model" in raw or "ema" in raw:
        model, ema = raw.get("model"), raw.get("ema")
        for name, sd in (("model", model), ("ema", ema)):
            if sd is not None and not _is_state_dict(sd):
                raise ValueError(f"{path}: {name!r} is not a state dict of tensors")
        ema = strip_wrapper_prefixes(ema) if ema is not None else None
        model = strip_wrapper_prefixes(model) if model is not None else ema
        args = raw.get("args")
        if isinstance(args, argparse.Namespace):
            args = vars(args)
        elif args is None:
            args = {}
        elif not isinstance(args, dict):
            raise ValueError(f"{path}: 'args' is a {type(args).__qualname__}, expected a dict or Namespace")
        steps = raw.get("steps")
        steps = int(steps) if steps is not None else None
        return {"model": model, "ema": ema, "args": dict(args), "steps": steps}
    if _is_state_dict(raw):
        return {"model": strip_wrapper_prefixes(raw), "ema": None, "args": {}, "steps": None}
    raise ValueError(
        f"{path}: unrecognised checkpoint layout (top-level keys {sorted(map(str, raw))[:10]}); expected "
        "'model'/'ema' entries or a bare state dict"
    )


def export_safetensors(state_dict: dict, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Atomically write a tensor dict as safetensors (CPU, contiguous, shared storage cloned apart).

    safetensors refuses tensors that share storage (tied weights, views), so every tensor whose storage was already
    seen is cloned; the whole file is serialised in memory first, then written through the atomic writer.
    """
    from safetensors.torch import save as st_save

    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in state_dict.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise TypeError(f"safetensors needs str -> Tensor entries; {key!r} is {type(value).__qualname__}")
        t = value.detach().cpu()
        storage = t.untyped_storage()
        # Clone views and second users of a storage; a tensor owning its whole storage is written as is.
        owns_storage = t.is_contiguous() and t.storage_offset() == 0 and t.nbytes == storage.nbytes()
        if storage.data_ptr() in seen or not owns_storage:
            t = t.contiguous().clone()
        else:
            seen.add(storage.data_ptr())
        tensors[key] = t
    data = st_save(tensors, metadata=metadata)
    return _atomic_write(Path(path), lambda f: f.write(data))
