"""SiT samplers (REPA's Euler / Heun ODE and Euler–Maruyama SDE) and a fixed-noise sample grid for monitoring.

Conventions (pinned by the golden tensors of the reference implementation):
- t runs from 1 (noise) to 0 (data); the model predicts the velocity v = α′_t·x0 + σ′_t·ε of the path.
- The state is integrated in float64; the model is called in its own dtype (the dtype of its parameters,
  falling back to that of `latents`) with t cast to that dtype. Samplers return the float64 state.
- ODE grid: ``linspace(1, 0, N + 1)`` in float64. Heun's corrector is skipped on the last step (it would need
  v at t = 0). SDE grid: ``linspace(1, 0.04, N)``, N − 1 stochastic steps, then one deterministic Euler step
  from 0.04 to 0. The SDE diffusion coefficient is w(t) = 2t and its drift is v − ½·w·score(v).
- Classifier-free guidance: when ``cfg_scale > 1`` and ``guidance_low ≤ t_cur ≤ guidance_high`` (t_cur = the
  time at the start of the step, also for Heun's corrector), one batched forward runs on ``[x; x]`` with labels
  ``[y; null]`` (null = ``model.num_classes``) and the output becomes ``u + s·(c − u)`` on all channels. The ODE
  guides the velocity, the SDE the drift (as the reference does).
- REG (a class-token SiT, ``cls_latents`` given): the class token is a second state, integrated jointly from its
  own N(0, I) start on the same grid with the same update; the model sees it at every call and returns its
  velocity. Its guidance uses ``cls_cfg_scale`` when > 0, else the conditional output alone (REG's rule; only
  when the latent is guided at all). SDE: each step draws the latent's noise, then the class token's. REG ships
  only the SDE; the ODE with the joint state is this project's extension.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Sequence

import torch
from torch import nn

from erw_fast.objectives.interpolants import PATH_TYPES, Interpolant

__all__ = [
    "SDE_LAST_T",
    "diffusion_coefficient",
    "euler_maruyama_sampler",
    "euler_sampler",
    "make_image_grid",
    "ode_time_grid",
    "sample_grid",
    "score_from_velocity",
    "sde_time_grid",
]

SDE_LAST_T = 0.04  # the SDE integrates stochastically down to this t, then takes one deterministic step to 0

ModelFn = Callable[..., torch.Tensor]
Outputs = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]

# Compiled forwards, one per model, so repeated sampler calls (one per batch) reuse the compiled graph.
_COMPILED: weakref.WeakKeyDictionary[nn.Module, ModelFn] = weakref.WeakKeyDictionary()


# ---------------------------------------------------------------------------------------------- building blocks


def ode_time_grid(num_steps: int) -> torch.Tensor:
    """float64 ``linspace(1, 0, num_steps + 1)``: the ODE's step boundaries."""
    _check_steps(num_steps)
    return torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)


def sde_time_grid(num_steps: int) -> torch.Tensor:
    """float64 ``linspace(1, 0.04, num_steps)`` followed by 0: the SDE's step boundaries."""
    _check_steps(num_steps)
    grid = torch.linspace(1.0, SDE_LAST_T, num_steps, dtype=torch.float64)
    return torch.cat([grid, torch.zeros(1, dtype=torch.float64)])


def diffusion_coefficient(t: float) -> float:
    """w(t) = 2t, the reference SDE's diffusion coefficient (noise enters as sqrt(w)·dW)."""
    return 2.0 * t


def score_from_velocity(
    v: torch.Tensor, x: torch.Tensor, t: torch.Tensor | float, path_type: str = "linear"
) -> torch.Tensor:
    """∇ log p_t(x) from the velocity: with x = α·x0 + σ·ε and v = α′·x0 + σ′·ε, eliminating x0 gives
    score = (α/α′ · v − x) / (σ² − α/α′ · σ′·σ). Linear: ((t − 1)·v − x) / t; cosine: the denominator is 1.
    """
    if isinstance(t, float):
        t = torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)
    t = t.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)
    alpha, sigma, d_alpha, d_sigma = Interpolant(path_type).coefficients(t)
    ratio = alpha / d_alpha
    var = sigma * sigma - ratio * d_sigma * sigma
    return (ratio * v - x) / var


def _check_steps(num_steps: int) -> None:
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")


def _check_common(path_type: str, cfg_scale: float, guidance_low: float, guidance_high: float,
                  cls_cfg_scale: float = 0.0) -> None:
    if path_type not in PATH_TYPES:
        raise ValueError(f"unknown path_type {path_type!r}; choose one of {PATH_TYPES}")
    if cfg_scale < 1.0:
        raise ValueError(f"cfg_scale must be ≥ 1 (1 disables guidance), got {cfg_scale}")
    if guidance_low > guidance_high:
        raise ValueError(f"guidance_low ({guidance_low}) must not exceed guidance_high ({guidance_high})")
    if cls_cfg_scale < 0:
        raise ValueError(f"cls_cfg_scale must be ≥ 0 (0: the class token follows the conditional output), got "
                         f"{cls_cfg_scale}")


def _check_class_token(model: nn.Module | ModelFn, latents: torch.Tensor, cls_latents: torch.Tensor | None) -> None:
    """A class-token model samples only with its class-token state, and a plain one only without."""
    dim = getattr(model, "cls_token_dim", None)
    if cls_latents is None:
        if dim is not None:
            raise ValueError(f"this SiT has a class token (REG): pass cls_latents= (N(0, I), shaped ({latents.shape[0]}"
                             f", {dim}))")
        return
    if isinstance(model, nn.Module) and dim is None:
        raise ValueError("cls_latents given, but the model has no class token")
    if cls_latents.dim() != 2 or cls_latents.shape[0] != latents.shape[0] or (dim and cls_latents.shape[1] != dim):
        raise ValueError(f"cls_latents must be (N, {dim or 'Dc'}) with N = {latents.shape[0]}, got "
                         f"{tuple(cls_latents.shape)}")


def _model_dtype(model: nn.Module | ModelFn, latents: torch.Tensor) -> torch.dtype:
    if isinstance(model, nn.Module):
        for p in model.parameters():
            if p.is_floating_point():
                return p.dtype
    return latents.dtype


def _null_label(model: nn.Module | ModelFn, null_label: int | None) -> int:
    if null_label is not None:
        return null_label
    num_classes = getattr(model, "num_classes", None)
    if num_classes is None:
        raise ValueError("classifier-free guidance needs the null label: the model has no `num_classes`, "
                         "pass null_label=")
    return int(num_classes)


def _forward_fn(model: nn.Module | ModelFn, compile: bool) -> Outputs:
    """``(x, t, y, cls) -> (v, class-token velocity or None)``: SiT returns ``(v, zs)``, a class-token SiT
    ``(v, zs, cls_out)`` when given ``cls_token=``; optionally torch.compiled."""
    fn: ModelFn = model
    if compile:
        if not isinstance(model, nn.Module):
            raise TypeError("compile=True needs an nn.Module model")
        if model not in _COMPILED:
            _COMPILED[model] = torch.compile(model)
        fn = _COMPILED[model]

    def outputs(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                cls: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if cls is None:
            out = fn(x, t, y)
            return (out[0] if isinstance(out, (tuple, list)) else out), None
        out = fn(x, t, y, cls_token=cls)
        return out[0], out[-1]

    return outputs


class _Guided:
    """Evaluates the model at one time with or without CFG, in the reference's batching and dtype. The state is
    ``[x]``, or ``[x, cls]`` for a class-token model (REG), each guided with its own scale."""

    def __init__(
        self, model: nn.Module | ModelFn, latents: torch.Tensor, y: torch.Tensor, cfg_scale: float,
        guidance_low: float, guidance_high: float, null_label: int | None, compile: bool,
        cls_cfg_scale: float = 0.0,
    ) -> None:
        self.forward = _forward_fn(model, compile)
        self.dtype = _model_dtype(model, latents)
        self.cfg_scale, self.low, self.high = cfg_scale, guidance_low, guidance_high
        self.scales = (cfg_scale, cls_cfg_scale)  # per state; a class-token scale ≤ 0: the conditional output
        self.y = y
        self.y_cfg = None
        if cfg_scale > 1.0:
            null = torch.full_like(y, _null_label(model, null_label))
            self.y_cfg = torch.cat([y, null])

    def active(self, t_cur: float) -> bool:
        return self.y_cfg is not None and self.low <= t_cur <= self.high

    def inputs(self, states: Sequence[torch.Tensor], guided: bool) -> list[torch.Tensor]:
        return [torch.cat([s, s]) for s in states] if guided else list(states)

    def outputs(self, states: Sequence[torch.Tensor], t: float, guided: bool) -> list[torch.Tensor]:
        """The model's outputs (float64), one per state, on the (un)doubled batch ``states``."""
        x = states[0]
        y = self.y_cfg if guided else self.y
        t_in = torch.full((x.shape[0],), t, dtype=torch.float64, device=x.device).to(self.dtype)
        cls = states[1].to(self.dtype) if len(states) > 1 else None
        v, cls_v = self.forward(x.to(self.dtype), t_in, y, cls)
        return [v.to(torch.float64)] + ([cls_v.to(torch.float64)] if cls is not None else [])

    def combine(self, outs: Sequence[torch.Tensor], guided: bool) -> list[torch.Tensor]:
        if not guided:
            return list(outs)
        combined = []
        for out, scale in zip(outs, self.scales, strict=False):
            cond, uncond = out.chunk(2)
            combined.append(uncond + scale * (cond - uncond) if scale > 0 else cond)
        return combined

    def velocity(self, states: Sequence[torch.Tensor], t: float, guided: bool) -> list[torch.Tensor]:
        """The (guided) velocity of every state at ``t``."""
        return self.combine(self.outputs(self.inputs(states, guided), t, guided), guided)


# ---------------------------------------------------------------------------------------------- samplers


@torch.no_grad()
def euler_sampler(
    model: nn.Module | ModelFn,
    latents: torch.Tensor,
    y: torch.Tensor,
    num_steps: int = 20,
    heun: bool = False,
    cfg_scale: float = 1.0,
    guidance_low: float = 0.0,
    guidance_high: float = 1.0,
    path_type: str = "linear",
    *,
    null_label: int | None = None,
    compile: bool = False,
    cls_latents: torch.Tensor | None = None,
    cls_cfg_scale: float = 1.5,
    return_cls: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Probability-flow ODE from t = 1 (``latents`` ~ N(0, I)) to t = 0 with Euler or Heun steps.

    ``path_type`` is accepted for reference compatibility: the ODE only needs the velocity, so it does not
    enter. Returns the float64 state at t = 0. A class-token model (REG) needs ``cls_latents`` ~ N(0, I), (N, Dc):
    the class token is integrated jointly (this project's extension: REG has no ODE sampler); ``return_cls``
    returns (latent, class token).
    """
    _check_common(path_type, cfg_scale, guidance_low, guidance_high, cls_cfg_scale)
    _check_class_token(model, latents, cls_latents)
    grid = ode_time_grid(num_steps).tolist()  # Python floats are the float64 grid values exactly
    g = _Guided(model, latents, y, cfg_scale, guidance_low, guidance_high, null_label, compile, cls_cfg_scale)
    states = [s.to(torch.float64) for s in (latents, cls_latents) if s is not None]
    for i in range(num_steps):
        t_cur, t_next = grid[i], grid[i + 1]
        guided = g.active(t_cur)
        d_cur = g.velocity(states, t_cur, guided)
        nxt = [s + (t_next - t_cur) * d for s, d in zip(states, d_cur, strict=True)]
        if heun and i < num_steps - 1:
            # The corrector reuses the guidance decision of t_cur (reference behaviour).
            d_prime = g.velocity(nxt, t_next, guided)
            nxt = [s + (t_next - t_cur) * (0.5 * d + 0.5 * dp) for s, d, dp in zip(states, d_cur, d_prime, strict=True)]
        states = nxt
    return (states[0], states[1]) if return_cls and cls_latents is not None else states[0]


@torch.no_grad()
def euler_maruyama_sampler(
    model: nn.Module | ModelFn,
    latents: torch.Tensor,
    y: torch.Tensor,
    num_steps: int = 20,
    heun: bool = False,
    cfg_scale: float = 1.0,
    guidance_low: float = 0.0,
    guidance_high: float = 1.0,
    path_type: str = "linear",
    noises: torch.Tensor | Sequence[torch.Tensor] | None = None,
    *,
    generator: torch.Generator | None = None,
    null_label: int | None = None,
    compile: bool = False,
    cls_latents: torch.Tensor | None = None,
    cls_cfg_scale: float = 1.5,
    cls_noises: torch.Tensor | Sequence[torch.Tensor] | None = None,
    return_cls: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Reverse-time SDE dx = [v − ½·w·score] dt + sqrt(w) dW̄, w(t) = 2t, by Euler–Maruyama.

    ``noises``: the ``num_steps − 1`` standard-normal draws (each shaped like ``latents``) to use instead of
    sampling, in step order (replays a recorded run). Otherwise they are drawn in float64 from ``generator``
    (the global RNG when None, like the reference's ``randn_like``). ``heun`` is accepted for reference
    compatibility and ignored. Returns the float64 state at t = 0.

    REG (a class-token model): ``cls_latents`` ~ N(0, I), (N, Dc), is the class token's start; it follows the
    same SDE with its own noise (``cls_noises`` to replay; drawn after the latent's each step otherwise) and
    ``cls_cfg_scale`` (REG's generate.py default 1.5; ≤ 0: the conditional drift). ``return_cls`` returns
    (latent, class token); REG itself returns only the latent.
    """
    _check_common(path_type, cfg_scale, guidance_low, guidance_high, cls_cfg_scale)
    _check_class_token(model, latents, cls_latents)
    grid = sde_time_grid(num_steps).tolist()
    n_stochastic = num_steps - 1
    replay = [noises] + ([cls_noises] if cls_latents is not None else [])
    for name, recorded in zip(("noises", "cls_noises"), replay, strict=False):
        if recorded is not None and len(recorded) != n_stochastic:
            raise ValueError(f"{name} holds {len(recorded)} draws, the SDE with num_steps={num_steps} takes "
                             f"{n_stochastic}")
    g = _Guided(model, latents, y, cfg_scale, guidance_low, guidance_high, null_label, compile, cls_cfg_scale)
    states = [s.to(torch.float64) for s in (latents, cls_latents) if s is not None]

    def drift(states: list[torch.Tensor], t_cur: float) -> list[torch.Tensor]:
        guided = g.active(t_cur)
        inputs = g.inputs(states, guided)
        outs = g.outputs(inputs, t_cur, guided)
        w = diffusion_coefficient(t_cur)
        return g.combine([v - 0.5 * w * score_from_velocity(v, x, t_cur, path_type)
                          for v, x in zip(outs, inputs, strict=True)], guided)

    for i in range(n_stochastic):
        t_cur, t_next = grid[i], grid[i + 1]
        dt = t_next - t_cur
        eps = [_step_noise(recorded, i, x, generator) for recorded, x in zip(replay, states, strict=True)]
        d_cur = drift(states, t_cur)
        states = [x + d * dt + math.sqrt(diffusion_coefficient(t_cur)) * (e * math.sqrt(abs(dt)))
                  for x, d, e in zip(states, d_cur, eps, strict=True)]
    # Last step, deterministic: the mean of the final transition (no noise is added at t = 0).
    t_cur, t_next = grid[-2], grid[-1]
    states = [x + (t_next - t_cur) * d for x, d in zip(states, drift(states, t_cur), strict=True)]
    return (states[0], states[1]) if return_cls and cls_latents is not None else states[0]


def _step_noise(recorded: torch.Tensor | Sequence[torch.Tensor] | None, i: int, x: torch.Tensor,
                generator: torch.Generator | None) -> torch.Tensor:
    """Step ``i``'s standard-normal draw for state ``x``: the recorded one, or a float64 draw."""
    if recorded is None:
        return torch.randn(x.shape, generator=generator, dtype=torch.float64, device=x.device)
    eps = recorded[i].to(device=x.device, dtype=torch.float64)
    if eps.shape != x.shape:
        raise ValueError(f"noises[{i}] has shape {tuple(eps.shape)}, expected {tuple(x.shape)}")
    return eps


# ---------------------------------------------------------------------------------------------- monitoring


def make_image_grid(
    images: torch.Tensor, nrow: int | None = None, padding: int = 2, pad_value: int = 0
) -> torch.Tensor:
    """uint8 (N, 3, H, W) → one uint8 (rows·(H+p)+p, nrow·(W+p)+p, 3) image, row-major, ``nrow`` per row."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be uint8 (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
    n, _, h, w = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    grid = torch.full((3, rows * (h + padding) + padding, nrow * (w + padding) + padding), pad_value,
                      dtype=torch.uint8)
    for k in range(n):
        r, c = divmod(k, nrow)
        top, left = padding + r * (h + padding), padding + c * (w + padding)
        grid[:, top : top + h, left : left + w] = images[k].cpu()
    return grid.permute(1, 2, 0).contiguous()


@torch.no_grad()
def sample_grid(
    model: nn.Module,
    labels: torch.Tensor,
    noise: torch.Tensor,
    decode: Callable[[torch.Tensor], torch.Tensor],
    *,
    num_steps: int = 50,
    mode: str = "ode",
    heun: bool = False,
    cfg_scale: float = 1.0,
    guidance_low: float = 0.0,
    guidance_high: float = 1.0,
    path_type: str = "linear",
    seed: int = 0,
    nrow: int | None = None,
    cls_noise: torch.Tensor | None = None,
    cls_cfg_scale: float = 1.5,
) -> torch.Tensor:
    """Sample fixed ``labels`` from fixed ``noise`` and tile the decoded images into one uint8 (H, W, 3) grid.

    For watching a run: the same inputs at every call make grids comparable across steps. The model runs in
    eval mode (no label dropout) and its previous mode is restored. ``decode`` maps float32 latents to uint8
    (N, 3, H, W) images. The SDE draws its noise from a generator seeded with ``seed``. A class-token model (REG)
    also takes the class token's fixed starting noise ``cls_noise`` (N, Dc).
    """
    was_training = model.training
    model.eval()
    try:
        kwargs = dict(num_steps=num_steps, heun=heun, cfg_scale=cfg_scale, guidance_low=guidance_low,
                      guidance_high=guidance_high, path_type=path_type, cls_latents=cls_noise,
                      cls_cfg_scale=cls_cfg_scale)
        if mode == "ode":
            latents = euler_sampler(model, noise, labels, **kwargs)
        elif mode == "sde":
            generator = torch.Generator(device=noise.device).manual_seed(seed)
            latents = euler_maruyama_sampler(model, noise, labels, generator=generator, **kwargs)
        else:
            raise ValueError(f"unknown sampler mode {mode!r}; choose 'ode' or 'sde'")
        images = decode(latents.to(torch.float32))
    finally:
        model.train(was_training)
    return make_image_grid(images, nrow=nrow)
