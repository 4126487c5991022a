"""Optional in-training monitors of the full model's EMA: sample grids (without and with classifier-free guidance,
from the same noise), per-layer CKNNA with the teacher, and a small-N FID.

All draw their noise from their own seeded generators, so turning them on never changes the training run. Their
results go to files (``samples/*.png``, ``monitor.jsonl``) and, through the trainer's ``MetricsWriter``, to
TensorBoard / W&B on the training scalars' step axis.

A monitor never ends the run. What it needs is resolved at start-up (``check_monitor_resources``, called by the
pre-flight checks): a missing resource is one ``config error`` naming its ``logging.*`` key, before anything is
built, instead of a crash at the first due step (after a minute of hub retries for the VAE). A monitor that still
fails later is logged with the step and the error and switched off for the rest of the run; training goes on.
"""

from __future__ import annotations

import json
import os
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from erw_fast.config import Config, ConfigError

if TYPE_CHECKING:
    from erw_fast.metrics import MetricsWriter

MONITORS = {"samples": "logging.sample_every", "cknna": "logging.cknna_every", "fid": "logging.fid_every"}


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("", "0", "false", "no")


def _hub_vae_cached(repo: str) -> bool:
    """Whether diffusers finds ``repo``'s config and weights in the Hugging Face cache (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    if not isinstance(try_to_load_from_cache(repo, "config.json"), str):
        return False
    weights = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
    return any(isinstance(try_to_load_from_cache(repo, name), str) for name in weights)


def _fetch_hub_vae(repo: str) -> None:
    from huggingface_hub import snapshot_download

    snapshot_download(repo, allow_patterns=["config.json", "diffusion_pytorch_model.safetensors"])


def check_monitor_resources(config: Config) -> None:
    """Resolve what the enabled monitors need, now: the sample VAE (a hub VAE from the cache, fetched when it is
    missing and the hub is reachable), the FID Inception weights (likewise), a teacher for CKNNA. Raises a
    ConfigError ``<logging key>: <why> (<what to do>)``. The files and sample counts are preflight's checks."""
    from erw_fast.codecs import SD_VAE_HUB_NAMES, choose_codec

    log = config.logging
    if log.sample_every or log.fid_every:
        name = choose_codec(log.sample_vae, config).name
        repo = SD_VAE_HUB_NAMES.get(name, name if name.count("/") == 1 and not Path(name).exists() else None)
        if repo is not None and not _hub_vae_cached(repo):
            why = "the hub is off (HF_HUB_OFFLINE)" if _offline() else None
            if why is None:
                try:
                    _fetch_hub_vae(repo)
                except Exception as error:  # noqa: BLE001 - the hub client raises many types
                    why = f"fetching it failed ({type(error).__name__}: {str(error).splitlines()[0][:200]})"
            if why is not None:
                raise ConfigError(
                    f"logging.sample_vae: the sample monitors decode with {repo}, which is not in the Hugging Face "
                    f"cache and {why} (download it where there is a network: huggingface-cli download {repo}; or "
                    "give a local diffusers VAE directory; or set logging.sample_every=0 and logging.fid_every=0)")
    if log.fid_every and not log.fid_inception:
        from erw_fast.evaluation.inception import FID_WEIGHTS_URL, _default_weights_path

        path = _default_weights_path()
        if not path.is_file():
            why = "the hub is off (HF_HUB_OFFLINE)" if _offline() else None
            if why is None:
                try:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    torch.hub.download_url_to_file(FID_WEIGHTS_URL, str(path), progress=False)
                except Exception as error:  # noqa: BLE001 - urllib raises many types
                    why = f"downloading it failed ({type(error).__name__}: {str(error).splitlines()[0][:200]})"
            if why is not None:
                raise ConfigError(
                    f"logging.fid_inception: unset, so the FID monitor reads the Inception weights from {path}, "
                    f"which does not exist and {why} (download {FID_WEIGHTS_URL} and set logging.fid_inception to "
                    "the file, or set logging.fid_every=0)")
    if log.cknna_every and config.run.mode == "sit" and not config.data.features:
        raise ConfigError("logging.cknna_every: CKNNA compares the model with the teacher, and run.mode=sit has "
                          "none (set logging.cknna_every=0, or use a mode with a teacher)")


class TrainingMonitor:
    def __init__(self, config: Config, run_dir: Path, device: torch.device,
                 held_out_batch: Callable[[int], dict[str, torch.Tensor]]) -> None:
        self.config = config
        self.run_dir = run_dir
        self.device = device
        self._held_out_batch = held_out_batch  # n → a fixed batch of n samples (the data order's first)
        self._batch: dict[str, torch.Tensor] | None = None
        self._codec = None
        self._fid_state = None  # (Inception extractor, real-image statistics), built on first use
        self.failed: dict[str, str] = {}  # monitor → why it was switched off

    def due(self, step: int) -> bool:
        log = self.config.logging
        return any(every > 0 and step % every == 0 for every in (log.sample_every, log.cknna_every, log.fid_every))

    def __call__(self, step: int, ema_model: nn.Module, encoders: list[nn.Module],
                 log_line: Callable[[str], None] = print, sink: MetricsWriter | None = None) -> dict:
        """The monitors due at ``step``. One that raises is logged and switched off; the run goes on. (``due``
        does not change with that: every rank still takes part in the EMA gather at the monitors' steps.)
        ``sink`` (rank 0's ``MetricsWriter``) also receives the grids as images and FID/CKNNA as scalars."""
        log = self.config.logging
        out: dict = {}
        jobs = (
            ("samples", log.sample_every, True, lambda: self._sample_grids(step, ema_model, sink)),
            ("cknna", log.cknna_every, bool(encoders) or self.config.data.features,  # precomputed: no encoder
             lambda: self._cknna(ema_model, encoders)),
            ("fid", log.fid_every, True, lambda: self._fid(ema_model)),
        )
        for name, every, possible, run in jobs:
            if every <= 0 or step % every or not possible or name in self.failed:
                continue
            try:
                out[name] = run()
                if name != "samples":
                    extra = {"cknna_t": log.cknna_t} if name == "cknna" else {"fid_samples": log.fid_samples}
                    with (self.run_dir / "monitor.jsonl").open("a") as f:
                        f.write(json.dumps({"step": step, **extra, name: out[name]}) + "\n")
                    if sink is not None:
                        sink.scalars(step, _tracker_scalars(name, out[name]))
            except Exception as error:  # noqa: BLE001 - a monitor's failure must never end the run
                where = traceback.extract_tb(error.__traceback__)[-1]
                self.failed[name] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
                log_line(f"monitor {name} ({MONITORS[name]}) failed at step {step} and is off for the rest of "
                         f"the run: {self.failed[name]} ({Path(where.filename).name}:{where.lineno}); training "
                         "goes on")
        return out

    @torch.no_grad()
    def _fid(self, model: nn.Module) -> float:
        """FID between ``fid_samples`` EMA samples (ODE, fixed noise and uniform labels) and as many training
        images; the real statistics are computed once."""
        from erw_fast.evaluation.evaluator import compute_activations
        from erw_fast.evaluation.fid import GaussianStats
        from erw_fast.evaluation.inception import build_fid_inception
        from erw_fast.sampling import euler_sampler

        m, log = self.config.model, self.config.logging
        if self._fid_state is None:
            extractor = build_fid_inception(weights_path=log.fid_inception, device=self.device)
            real = self._held_out_batch(log.fid_samples)["images"].permute(0, 2, 3, 1).cpu().numpy()
            self._fid_state = (extractor, GaussianStats.from_features(compute_activations(extractor, real).pool))
        extractor, real_stats = self._fid_state
        g = torch.Generator().manual_seed(self.config.run.seed + 4244)
        noise = torch.randn(log.fid_samples, m.in_channels, m.input_size, m.input_size, generator=g)
        labels = torch.randint(0, m.num_classes, (log.fid_samples,), generator=g)
        cls = _class_token_noise(model, log.fid_samples, g)
        was_training = model.training
        model.eval()
        try:
            latents = euler_sampler(model, noise.to(self.device), labels.to(self.device), num_steps=log.sample_steps,
                                    path_type=self.config.diffusion.path_type,
                                    cls_latents=cls.to(self.device) if cls is not None else None)
        finally:
            model.train(was_training)
        images = self._decoder().decode(latents.float()).permute(0, 2, 3, 1).numpy()
        fake_stats = GaussianStats.from_features(compute_activations(extractor, images).pool)
        return round(fake_stats.frechet_distance(real_stats), 4)

    def _decoder(self):
        if self._codec is None:
            from erw_fast.codecs import build_codec, choose_codec

            m = self.config.model
            choice = choose_codec(self.config.logging.sample_vae, self.config)
            if int(os.environ.get("RANK", "0")) == 0:
                print(f"sample monitors: {choice.note}", flush=True)
            self._codec = build_codec(choice.name, device=self.device, image_size=self.config.data.image_size,
                                      latent_size=m.input_size, latent_channels=m.in_channels, scale=choice.scale)
        return self._codec

    def sample_inputs(self, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The grids' fixed (noise, labels, REG class-token noise), the same at every step and for every scale."""
        m, log = self.config.model, self.config.logging
        g = torch.Generator().manual_seed(self.config.run.seed + 4242)
        noise = torch.randn(log.sample_count, m.in_channels, m.input_size, m.input_size, generator=g)
        labels = torch.arange(log.sample_count) % m.num_classes
        return noise, labels, _class_token_noise(model, log.sample_count, g)

    def sample_scales(self) -> tuple[float, ...]:
        """The guidance scales of the grids: 1 (none), then logging.sample_cfg_scale unless it is 1."""
        cfg = self.config.logging.sample_cfg_scale
        return (1.0,) if cfg == 1.0 else (1.0, cfg)

    @torch.no_grad()
    def sample_grid(self, model: nn.Module, cfg_scale: float = 1.0) -> torch.Tensor:
        """One uint8 (H, W, 3) grid of the EMA at ``cfg_scale`` (guided over the whole time range, as REPA's
        training-time grids), from the fixed inputs."""
        from erw_fast.sampling import sample_grid

        noise, labels, cls = self.sample_inputs(model)
        return sample_grid(model, labels.to(self.device), noise.to(self.device), self._decoder().decode,
                           num_steps=self.config.logging.sample_steps, path_type=self.config.diffusion.path_type,
                           cfg_scale=cfg_scale, cls_noise=cls.to(self.device) if cls is not None else None)

    def _sample_grids(self, step: int, model: nn.Module, sink: MetricsWriter | None = None) -> list[str]:
        """``samples/step_NNNNNNN.png`` (no guidance) and ``samples/step_NNNNNNN_cfgS.png``; to the trackers as
        ``samples`` and ``samples_cfg``."""
        import matplotlib.image

        paths = []
        for scale in self.sample_scales():
            grid = self.sample_grid(model, scale).cpu().numpy()
            suffix = "" if scale == 1.0 else f"_cfg{scale:g}"
            path = self.run_dir / "samples" / f"step_{step:07d}{suffix}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            matplotlib.image.imsave(path, grid)
            paths.append(str(path))
            if sink is not None:
                tag, caption = ("samples", "no guidance") if scale == 1.0 else ("samples_cfg", f"cfg {scale:g}")
                sink.image(tag, step, grid, caption=f"step {step}, {caption}")
        return paths

    @torch.no_grad()
    def _cknna(self, model: nn.Module, encoders: list[nn.Module]) -> list[float]:
        from erw_fast.encoders.teacher import Teacher, feature_patches
        from erw_fast.evaluation.layerwise import layerwise_cknna, sit_layer_features

        if self._batch is None:
            self._batch = self._held_out_batch(self.config.logging.cknna_samples)
        batch = self._batch
        latents, labels = batch["latents"].to(self.device), batch["labels"].to(self.device)
        g = torch.Generator().manual_seed(self.config.run.seed + 4243)
        noise = torch.randn(latents.shape, generator=g).to(self.device)
        cls_noise = _class_token_noise(model, latents.shape[0], g)
        with_cls = cls_noise is not None  # REG: the first encoder's CLS is the model's class token
        feats = Teacher(encoders[:1], patches=feature_patches(self.config)).targets(
            {k: v.to(self.device) for k, v in batch.items()}, slice(None), with_cls=with_cls)[0]
        cls = feats[:, 0] if with_cls else None
        feats = feats[:, int(with_cls):]
        was_training = model.training
        model.eval()
        try:
            layers = sit_layer_features(model, latents, labels, self.config.logging.cknna_t, noise,
                                        path_type=self.config.diffusion.path_type, cls_token=cls,
                                        cls_noise=cls_noise.to(self.device) if with_cls else None)
        finally:
            model.train(was_training)
        return [round(v, 6) for v in layerwise_cknna(layers, feats, topk=min(10, latents.shape[0] - 1))]


def _class_token_noise(model: nn.Module, n: int, generator: torch.Generator) -> torch.Tensor | None:
    """A REG model's fixed class-token noise (N(0, I), drawn after the monitor's other draws); None for a SiT."""
    dim = getattr(model, "cls_token_dim", None)
    return torch.randn(n, dim, generator=generator) if dim is not None else None


def _tracker_scalars(name: str, value: float | list[float]) -> dict[str, float]:
    """A monitor's result as tracker scalars: ``fid``; CKNNA per SiT block (``cknna/block_NN``, 1-based as in
    the papers' layer plots) and its maximum over blocks."""
    if name == "cknna":
        return {**{f"cknna/block_{i + 1:02d}": v for i, v in enumerate(value)}, "cknna/max": max(value)}
    return {name: value}
