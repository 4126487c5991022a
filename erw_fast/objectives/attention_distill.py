"""HASTE's attention distillation (arXiv 2505.16792): the student SiT's attention distributions of some blocks
are pulled towards a frozen teacher's (DINOv2) by a soft cross-entropy, averaged over (student block, teacher
block) pairs. Blocks are counted from 1; student head ``student_heads[i]`` is paired with teacher head i."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


class _SoftCrossEntropy(torch.autograd.Function):
    """−Σ_k softmax(t)_k · log_softmax(s)_k, mean over rows, in fp32 whatever the logits' dtype.

    Autograd of the plain expression keeps two fp32 maps per block for backward (the log-probabilities and the
    teacher's probabilities); this keeps only the logits as they came (bf16 under autocast) and recomputes both
    softmaxes in backward: d/ds = (softmax(s) − softmax(t)) / rows."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, student: torch.Tensor, teacher: torch.Tensor
                ) -> torch.Tensor:
        ctx.save_for_backward(student, teacher)
        target = teacher.float().softmax(dim=-1)
        return -(target * student.float().log_softmax(dim=-1)).sum(dim=-1).mean()

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        student, teacher = ctx.saved_tensors
        rows = student.numel() // student.shape[-1]
        diff = student.float().softmax(dim=-1) - teacher.float().softmax(dim=-1)
        return (diff * (grad / rows)).to(student.dtype), None


def soft_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """HASTE's per-pair term: rows are (sample, head, query), the distribution is over the last dimension (keys);
    the teacher side is a fixed target (no gradient). 0-d fp32."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"attention maps differ in shape: student {tuple(student_logits.shape)}, teacher "
                         f"{tuple(teacher_logits.shape)} (batch, heads, queries, keys must match)")
    return _SoftCrossEntropy.apply(student_logits, teacher_logits.detach())


@dataclass(frozen=True)
class AttentionDistillation:
    """Which attention maps are distilled: ``student_blocks[i]`` ↔ ``teacher_blocks[i]`` (from 1), and student
    head ``student_heads[j]`` ↔ teacher head j. Calling it on the two lists of maps (in the order of the blocks)
    gives the loss averaged over the pairs."""

    student_blocks: tuple[int, ...]
    teacher_blocks: tuple[int, ...]
    student_heads: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.student_blocks or len(self.student_blocks) != len(self.teacher_blocks):
            raise ValueError(f"student blocks {list(self.student_blocks)} and teacher blocks "
                             f"{list(self.teacher_blocks)} must pair up one to one")
        if not self.student_heads or len(set(self.student_heads)) != len(self.student_heads):
            raise ValueError(f"student heads {list(self.student_heads)} must be distinct and non-empty")

    @property
    def teacher_heads(self) -> tuple[int, ...]:
        return tuple(range(len(self.student_heads)))

    def __call__(self, student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(student) != len(self.student_blocks) or len(teacher) != len(self.teacher_blocks):
            raise ValueError(f"{len(self.student_blocks)} block pairs, got {len(student)} student and "
                             f"{len(teacher)} teacher maps")
        terms = [soft_cross_entropy(s, t) for s, t in zip(student, teacher, strict=True)]
        return torch.stack(terms).sum() / len(terms)
