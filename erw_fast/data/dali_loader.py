"""The DALI loader over the same shards: our global order fed through ``fn.external_source``, DALI decoding.

Why not ``fn.readers.webdataset``: its order comes from its own shuffle buffer and shard split, so it cannot
reproduce the step-indexed global order (and exact resume) the trainer relies on. Instead a per-sample parallel
``external_source`` callback (``BatchAssembler.load_sample``: the same reads, replacement policy and keys as the
webdataset loader) hands DALI the stored bytes of step ``start_step + iteration``, slot ``idx_in_batch``;
``fn.decoders.image`` decodes them (``device="mixed"``, i.e. nvJPEG on the GPU, when the training device is CUDA;
``"cpu"`` otherwise) and ``fn.flip`` applies the per-sample flips. The index files also let DALI's own
``fn.readers.webdataset`` read these shards (``index_paths``) for other uses.

Identical to the webdataset loader for PNG and raw images on any device (lossless), and for JPEG with the CPU
decoder (both libjpeg-turbo; tested); nvJPEG's JPEG output may differ by rounding from libjpeg-turbo's.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import numpy as np
import torch

from erw_fast.data.batches import BatchAssembler
from erw_fast.data.shards import DataError
from erw_fast.data.train_loader import TrainLoader, finish_shard_batch
from erw_fast.stop_signals import children_inherit_blocked, loader_worker_init


class _Source:
    """Parallel external_source callback; picklable (spawned workers re-open the shards)."""

    def __init__(self, assembler: BatchAssembler, start_step: int) -> None:
        self.assembler, self.start_step = assembler, start_step
        self._seen = os.getpid()  # the trainer; a worker process sees another pid on its first call

    def __call__(self, info: Any) -> tuple[np.ndarray, ...]:
        if self._seen != os.getpid():  # the first call in a DALI python worker (DALI has no worker init hook)
            self._seen = os.getpid()
            loader_worker_init()  # ignore the process group's stop signals; the trainer stops and saves
        return self.assembler.load_sample(self.start_step + info.iteration, info.idx_in_batch)


def _worker_processes(pipe: Any) -> list[Any]:
    """The pipeline's python worker processes (DALI internals, read defensively)."""
    pool = getattr(getattr(pipe, "_py_pool", None), "pool", None)
    return list(getattr(pool, "_processes", None) or [])


def _to_torch(tensor_list: Any, device: torch.device) -> torch.Tensor:
    """A uniform DALI TensorList (CPU or GPU) → a torch tensor that owns its memory (DALI reuses buffers)."""
    from nvidia.dali.backend import TensorListGPU
    from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

    dense = tensor_list.as_tensor()
    if isinstance(tensor_list, TensorListGPU):
        out = torch.empty(dense.shape(), dtype=to_torch_type[dense.dtype], device=device)
        feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(device))
        return out
    return torch.from_numpy(np.array(dense))


class DaliLoader(TrainLoader):
    """``kind="dali"``: see the module docstring. Build through ``erw_fast.data.build_loader``."""

    kind = "dali"

    def __init__(
        self,
        assembler: BatchAssembler,
        *,
        start_step: int,
        device: torch.device,
        num_workers: int = 4,
        num_threads: int = 2,
        prefetch: int = 2,
        latent_scale: float,
        decoder_device: str = "auto",
    ) -> None:
        super().__init__(assembler.sampler, start_step, assembler.num_classes, device)
        try:
            import nvidia.dali  # noqa: F401
        except ImportError as exc:
            raise ImportError("data.kind=dali needs NVIDIA DALI (pip install 'erw-fast[data]')") from exc
        cuda = device.type == "cuda"
        if decoder_device == "auto":
            decoder_device = "mixed" if cuda else "cpu"
        if decoder_device not in ("mixed", "cpu"):
            raise ValueError(f"decoder_device must be 'auto', 'mixed' or 'cpu', got {decoder_device!r}")
        if decoder_device == "mixed" and not cuda:
            raise ValueError("DALI's mixed (GPU) decoder needs a CUDA training device")
        self.assembler, self.latent_scale = assembler, latent_scale
        self.names = assembler.dali_outputs()
        self._settings = {"cuda": cuda, "decoder_device": decoder_device, "num_workers": num_workers,
                          "num_threads": max(1, num_threads), "prefetch": max(1, prefetch)}
        self._pipe: Any = None
        self._build(start_step)

    def _build(self, start_step: int) -> None:
        from nvidia.dali import fn, types
        from nvidia.dali.pipeline import Pipeline

        cfg, device, assembler = self._settings, self.device, self.assembler
        cuda = cfg["cuda"]
        # Forked workers must not inherit a CUDA context; once the trainer has touched CUDA, spawn them.
        start_method = "spawn" if cuda and torch.cuda.is_initialized() else "fork"
        pipe = Pipeline(
            batch_size=self.local_batch_size,
            num_threads=cfg["num_threads"],
            device_id=(device.index if device.index is not None else torch.cuda.current_device()) if cuda else None,
            py_num_workers=max(1, cfg["num_workers"]),
            py_start_method=start_method,
            prefetch_queue_depth=cfg["prefetch"],
            exec_dynamic=True,
        )
        with pipe:
            outs = fn.external_source(
                source=_Source(assembler, start_step), num_outputs=len(self.names), batch=False,
                parallel=cfg["num_workers"] > 0,
            )
            node = dict(zip(self.names, outs, strict=True))
            if "images" in node:
                img = node["images"]
                if assembler.raw_images:
                    img = img.gpu() if cuda else img
                else:
                    img = fn.decoders.image(img, device=cfg["decoder_device"], output_type=types.RGB)
                node["images"] = fn.flip(img, horizontal=node["flips"])
            if cuda:
                for name in ("moments", "features"):
                    if name in node:
                        node[name] = node[name].gpu()
            pipe.set_outputs(*(node[n] for n in self.names))
        with children_inherit_blocked():  # the python workers are forked here
            pipe.build()
        self._pipe = pipe
        self._closed = False

    def _release(self) -> None:
        """Shut the pipeline and its workers down now. Left to garbage collection, a dead pipeline can outlive the
        moment a torch DataLoader forks, and its destructor then aborts the forked worker."""
        pipe, self._pipe = self._pipe, None
        if pipe is not None:
            # DALI's shutdown ends a worker that does not exit within 1 s with SIGTERM, which the workers ignore
            # (loader_worker_init), and then waits for it: SIGKILL what is left after 10 s instead of hanging.
            workers = _worker_processes(pipe)
            timer = threading.Timer(10.0, lambda: [w.kill() for w in workers if w.is_alive()])
            timer.daemon = True
            timer.start()
            try:
                getattr(pipe, "_shutdown", lambda: None)()
            except RuntimeError:  # a pipeline that died of an operator error may refuse a clean shutdown
                pass
            finally:
                timer.cancel()

    def _recover(self, message: str) -> None:
        """DALI failed (a decoder error ends the pipeline): name the sample, or rebuild without it ("skip")."""
        self._release()
        cause = RuntimeError(f"DALI: {message}")
        # The pipeline prepares batches ahead, so the failing sample may belong to any step still in flight.
        last = self.step + 2 * self._settings["prefetch"] + 2
        bad = []
        for step in range(self.step, last + 1):
            bad = self.assembler.diagnose(step)
            if bad:
                break
        if not bad:
            raise DataError(f"DALI failed while preparing steps {self.step}..{last}, yet all their samples decode "
                            "with PIL (see the cause)") from cause
        if self.assembler.opts.on_error == "raise":
            raise bad[0][1] from cause
        new = {index for index, _ in bad} - self.assembler.undecodable
        if not new:
            raise DataError(f"DALI keeps failing at step {self.step} (see the cause)") from cause
        self.assembler.undecodable |= new  # the rebuilt workers get the updated copy
        self._build(self.step)

    def next_host(self) -> dict[str, Any]:
        """The next step's pipeline outputs as torch tensors (latents not drawn yet)."""
        while True:
            try:
                outs = self._pipe.run()
            except Exception as exc:  # noqa: BLE001 - DALI re-raises worker and operator errors as plain Exception
                message = str(exc)  # only the text: DALI's traceback would keep the dead pipeline alive
            else:
                break
            self._recover(message)
        batch: dict[str, Any] = {n: _to_torch(t, self.device) for n, t in zip(self.names, outs, strict=True)}
        batch["step"] = self.step
        self._count_skips([], int(batch.pop("skipped").sum()))
        self.step += 1
        return batch

    def __next__(self) -> dict[str, torch.Tensor]:
        return finish_shard_batch(self.next_host(), self.device, self.latent_scale)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._release()
            self.assembler.shards.close()
