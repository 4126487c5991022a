"""What the golden-tensor tests share: "≤ 1e-5 relative" = the largest absolute difference over the largest absolute
reference value, in float64."""

from __future__ import annotations

import torch

RTOL = 1e-5


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().to(torch.float64), b.detach().to(torch.float64)
    return ((a - b).abs().max() / b.abs().max()).item()


def check_step(engine, model: torch.nn.Module, loss: torch.Tensor, golden: dict) -> dict[str, torch.Tensor]:
    """Backward and the engine's step on ``loss``, checked against a golden step: the parameters with a gradient are
    exactly those in ``golden["grads"]`` (the frozen ``pos_embed`` never), each gradient and the clipping norm
    ≤ RTOL relative. Returns the gradients."""
    engine.backward(loss)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert set(grads) == set(golden["grads"]) and "pos_embed" not in grads
    for name, grad in grads.items():
        assert rel_err(grad, golden["grads"][name]) <= RTOL, name
    outcome = engine.step(loss)
    assert rel_err(outcome.grad_norm, golden["grad_norm"]) <= RTOL
    return grads
