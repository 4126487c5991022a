"""One REPA step with every alignment-family piece at once (iREPA's conv k=3 projector and spatial z-score targets,
U-REPA's manifold term, HASTE's attention distillation on a pair of gathered heads), computed in fp32 on a device
and compared with the same step whose model and teacher run in float64 on the CPU (the losses keep their own fp32
math): the loss terms and every gradient.

The CUDA case is a GPU first-light check (``benchmarks/first_light.sh`` stage 2): the attention-logit capture
beside the fused attention kernel, the conv projector and the fp32 losses under CUDA, against a float64 reference.
"""

from __future__ import annotations

import pytest
import torch
from _trainer_helpers import tiny_config

from erw_fast.encoders.teacher import load_teacher
from erw_fast.phases import plan_phases
from erw_fast.randomness import StepDraw

FAMILY = ("run.mode=repa", "alignment.projector=conv", "alignment.projector_kernel_size=3",
          "alignment.target_norm=spatial_zscore", "alignment.zscore_alpha=0.6", "alignment.manifold_weight=3.0",
          "haste.attn_weight=0.5", "haste.student_blocks=[2, 3]", "haste.teacher_blocks=[1, 2]",
          "haste.student_heads=[1, 0]", "haste.schedule=hard_stop", "haste.stop_step=10")


def _step(tmp_path, device: torch.device, dtype: torch.dtype) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """The phase's loss parts and the gradients of one step (the same weights and draws on every device)."""
    config = tiny_config(tmp_path, "family", *FAMILY, "model.attn_backend=sdpa")
    teacher = load_teacher(config, torch.device("cpu"), config.model.num_tokens(), lambda line: None)
    phase = plan_phases(config, teacher, "torch")[0]
    torch.manual_seed(0)
    model = phase.build_model(config.model.sit_kwargs(teacher.z_dims, "sdpa", config.alignment))
    for p in model.parameters():  # adaLN-Zero starts as the identity: give every block something to do
        p.data.add_(0.05 * torch.randn_like(p))
    model = model.to(device=device, dtype=dtype).train()
    for encoder in teacher.encoders:
        encoder.to(device=device, dtype=dtype)
    g = torch.Generator().manual_seed(1)
    b, m = 4, config.model
    batch = {"latents": torch.randn(b, m.in_channels, m.input_size, m.input_size, generator=g),
             "labels": torch.randint(0, m.num_classes, (b,), generator=g),
             "images": torch.randint(0, 256, (b, 3, 64, 64), generator=g, dtype=torch.uint8)}
    draw = StepDraw(t=torch.rand(b, generator=g), noise=torch.randn(b, m.in_channels, m.input_size, m.input_size,
                                                                     generator=g),
                    drop_labels=torch.tensor([0, 1, 0, 0]))
    batch = {k: v.to(device) if v.dtype == torch.uint8 or not v.is_floating_point() else v.to(device, dtype)
             for k, v in batch.items()}
    draw = StepDraw(t=draw.t.to(device, dtype), noise=draw.noise.to(device, dtype),
                    drop_labels=draw.drop_labels.to(device))
    sl = slice(None)
    loss, parts = phase.loss(model, batch, sl, phase.targets(batch, sl), draw, 0)
    loss.backward()
    grads = {n: p.grad.detach().to("cpu", torch.float64) for n, p in model.named_parameters() if p.grad is not None}
    return {k: float(v.detach()) for k, v in parts.items()}, grads


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_the_family_step_in_fp32_matches_float64(tmp_path, device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    dev = torch.device(device)
    if dev.type == "cuda":  # the float64 reference has no TF32: neither may the fp32 step
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    parts, grads = _step(tmp_path, dev, torch.float32)
    ref_parts, ref_grads = _step(tmp_path, torch.device("cpu"), torch.float64)
    assert set(parts) == {"loss", "loss_diffusion", "loss_align", "loss_manifold", "loss_attn"}
    for key, value in parts.items():
        assert value == pytest.approx(ref_parts[key], rel=1e-4, abs=1e-6), key
    assert set(grads) == set(ref_grads) and any(n.startswith("projectors.0.projection_layer") for n in grads)
    for name, grad in grads.items():
        ref = ref_grads[name]
        scale = ref.abs().max().clamp_min(1e-6)
        assert ((grad - ref).abs().max() / scale).item() <= 1e-3, name
