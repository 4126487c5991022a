"""Parity with iREPA's reference code (../shared/golden/irepa, End2End-Diffusion/iREPA ``ldm/``): the conv
projector under iREPA's key names inside our SiT, the spatial z-score of the teacher's patch tokens as
``Teacher.targets`` applies it (precomputed and online features), and the cosine loss with its gradients through
``AlignmentObjective``.

"≤ 1e-5 relative" = the largest absolute difference over the largest absolute reference value.
"""

from __future__ import annotations

import json

import pytest
import torch
from _golden_helpers import RTOL, rel_err
from torch import nn

from erw_fast.encoders.teacher import Teacher
from erw_fast.models import SiT
from erw_fast.objectives import AlignmentObjective
from erw_fast.objectives.target_norm import TargetNorm


@pytest.fixture(scope="module")
def irepa(golden_dir):
    root = golden_dir / "irepa"
    cfg = json.loads((root / "config.json").read_text())
    return cfg, _flat(torch.load(root / "irepa_projector_loss.pt", weights_only=True))


def _flat(tree: dict, prefix: str = "") -> dict:
    """{'k1': {'loss': …}} → {'k1.loss': …}, the README's key names."""
    out = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


class _RecordedEncoder(nn.Module):
    """An online encoder that returns the recorded teacher tokens (CLS first with ``with_cls``)."""

    def __init__(self, patches: torch.Tensor, cls: torch.Tensor) -> None:
        super().__init__()
        self.patches, self.cls, self.embed_dim = patches, cls, patches.shape[-1]

    def forward(self, images: torch.Tensor, with_cls: bool = False) -> torch.Tensor:
        rows = images[:, 0, 0, 0].long()  # the images carry their row index
        if with_cls:
            return torch.cat([self.cls[rows, None], self.patches[rows]], dim=1)
        return self.patches[rows]

    def num_patches(self) -> int:
        return self.patches.shape[1]


def _sit_with_golden_projector(cfg: dict, g: dict, k: int) -> SiT:
    """A one-block SiT on an 8×8 token grid whose conv projector is loaded from the golden state dict, strictly,
    under the SiT key prefix ``projectors.0.``."""
    grid, patch = cfg["grid"], 2
    model = SiT(input_size=grid * patch, patch_size=patch, in_channels=4, hidden_size=cfg["hidden_size"], depth=1,
                num_heads=4, num_classes=10, z_dims=[cfg["z_dim"]], encoder_depth=1, projector="conv",
                projector_kernel_size=k)
    # iREPA's constructor keywords build the same model (a conv named without a kernel has iREPA's default 3).
    irepa = SiT(input_size=grid * patch, patch_size=patch, in_channels=4, hidden_size=cfg["hidden_size"], depth=1,
                num_heads=4, num_classes=10, z_dims=[cfg["z_dim"]], encoder_depth=1, projection_layer_type="conv",
                **({} if k == 3 else {"proj_kwargs_kernel_size": k}))
    assert {n: v.shape for n, v in irepa.state_dict().items()} == {n: v.shape for n, v in model.state_dict().items()}
    sd = model.state_dict()
    ours = sorted(key for key in sd if key.startswith("projectors."))
    assert ours == ["projectors.0.projection_layer.bias", "projectors.0.projection_layer.weight"]
    for name in ("weight", "bias"):
        sd[f"projectors.0.projection_layer.{name}"] = g[f"k{k}.state_dict.projection_layer.{name}"]
    model.load_state_dict(sd, strict=True)
    return model


@pytest.mark.parametrize("alpha", [0.6, 0.8, 1.0])
def test_spatial_zscore_matches_the_reference_for_precomputed_and_online_features(irepa, alpha):
    cfg, g = irepa
    key = "teacher_normed" if alpha == cfg["zscore_alpha"] else f"teacher_normed_alpha{alpha}"
    reference = g[key]
    patches, cls = g["teacher_patch"], g["teacher_cls"]
    teacher = Teacher([_RecordedEncoder(patches, cls)], TargetNorm("spatial_zscore", alpha))
    images = torch.arange(patches.shape[0]).float().view(-1, 1, 1, 1).expand(-1, 3, 4, 4)
    online = teacher.targets({"images": images}, slice(None))[0]
    cached = teacher.targets({"features": patches}, slice(None))[0]
    assert online.dtype == cached.dtype == torch.float32
    assert rel_err(online, reference) <= RTOL and rel_err(cached, reference) <= RTOL
    torch.testing.assert_close(online, cached, rtol=0, atol=0)  # one function, one place
    # A slice of the batch is normalised on its own images only (the statistics are per image).
    assert rel_err(teacher.targets({"features": patches}, slice(1, 3))[0], reference[1:3]) <= RTOL
    # REG's class token in front: only the patch tokens are normalised, the CLS token passes unchanged.
    with_cls = teacher.targets({"images": images}, slice(None), with_cls=True)[0]
    torch.testing.assert_close(with_cls[:, 0], cls, rtol=0, atol=0)
    assert rel_err(with_cls[:, 1:], reference) <= RTOL
    # 'none' leaves the features as they are.
    plain = Teacher([_RecordedEncoder(patches, cls)]).targets({"features": patches}, slice(None))[0]
    torch.testing.assert_close(plain, patches, rtol=0, atol=0)


@pytest.mark.parametrize("k", [1, 3])
def test_conv_projector_loss_and_gradients_match_the_reference(irepa, k):
    cfg, g = irepa
    model = _sit_with_golden_projector(cfg, g, k)
    projector = model.projectors[0]
    teacher = Teacher(target_norm=TargetNorm("spatial_zscore", cfg["zscore_alpha"]))
    target = teacher.targets({"features": g["teacher_patch"]}, slice(None))
    hidden = g["hidden"].clone().requires_grad_(True)
    proj_out = projector(hidden)
    proj_out.retain_grad()
    assert rel_err(proj_out, g[f"k{k}.proj_out"]) <= RTOL

    objective = AlignmentObjective("cosine", backend="torch")
    loss = float(g["proj_coeff"]) * objective([proj_out], target)
    assert rel_err(loss, g[f"k{k}.loss"]) <= RTOL
    loss.backward()
    assert rel_err(proj_out.grad, g[f"k{k}.grad_proj_out"]) <= RTOL
    assert rel_err(hidden.grad, g[f"k{k}.grad_hidden"]) <= RTOL
    for name in ("weight", "bias"):
        grad = getattr(projector.projection_layer, name).grad
        assert rel_err(grad, g[f"k{k}.grads.projection_layer.{name}"]) <= RTOL

    # Without the normalisation the same projector gives the reference's contrast value.
    with torch.no_grad():
        raw = objective([projector(g["hidden"])], Teacher().targets({"features": g["teacher_patch"]}, slice(None)))
    assert rel_err(raw, g[f"k{k}.loss_unnormalised_target"]) <= RTOL
    assert rel_err(raw, loss) > 100 * RTOL  # the normalisation changes the loss (the test tells them apart)


def test_conv_projector_runs_inside_the_sit_forward(irepa):
    """The full forward's z is the conv projector applied to the hidden state after encoder_depth blocks."""
    cfg, g = irepa
    model = _sit_with_golden_projector(cfg, g, 3).eval()
    torch.manual_seed(0)
    x, t, y = torch.randn(2, 4, 16, 16), torch.rand(2), torch.randint(0, 10, (2,))
    with torch.no_grad():
        _, zs = model(x, t, y)
        h = model.hidden_after(x, t, y)
        grid = h.reshape(2, 8, 8, -1).permute(0, 3, 1, 2)  # tokens row-major on the 8×8 grid
        expected = torch.nn.functional.conv2d(grid, g["k3.state_dict.projection_layer.weight"],
                                              g["k3.state_dict.projection_layer.bias"], padding=1)
    assert rel_err(zs[0], expected.permute(0, 2, 3, 1).reshape(2, 64, -1)) <= RTOL
