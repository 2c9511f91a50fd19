"""The BYOL objective of ATST: projector and predictor heads, the loss, the EMA teacher,
the collapse diagnostic, the cosine schedules and the weight-decay parameter groups."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..encoder import ATSTEncoder, EncoderConfig

__all__ = [
    "FINAL_LR",
    "Branch",
    "byol_loss",
    "cross_view_loss",
    "cosine_schedule",
    "ema_update",
    "mlp_head",
    "output_std",
    "parameter_groups",
]

FINAL_LR = 1e-6  # where every learning-rate schedule of the reference ends


def mlp_head(in_dim: int, hidden_dim: int = 4096, out_dim: int = 256) -> nn.Sequential:
    """Linear (no bias) -> BatchNorm1d -> ReLU -> Linear (no bias): the reference's projector/predictor."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim, bias=False),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim, bias=False),
    )


class Branch(nn.Module):
    """Encoder + projector (+ predictor for the student). Attribute names match the official
    checkpoints, so ``model.teacher.encoder.*`` of a training checkpoint is what loading reads."""

    def __init__(self, encoder: EncoderConfig, hidden_dim: int, out_dim: int, predictor: bool) -> None:
        super().__init__()
        self.encoder = ATSTEncoder(encoder)
        self.projector = mlp_head(encoder.embed_dim, hidden_dim, out_dim)
        self.predictor = mlp_head(out_dim, hidden_dim, out_dim) if predictor else None

    def head(self, features: Tensor) -> Tensor:
        """``[N, D]`` encoder outputs -> ``[N, out_dim]``."""
        out = self.projector(features)
        return self.predictor(out) if self.predictor is not None else out


def byol_loss(prediction: Tensor, target: Tensor) -> Tensor:
    """``2 - 2 * mean cos(prediction, target)``: 0 for equal directions, 4 for opposite ones."""
    return 2 - 2 * (F.normalize(prediction, dim=-1) * F.normalize(target, dim=-1)).sum(dim=-1).mean()


def cross_view_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """Symmetric BYOL over two views stacked ``[view 1; view 2]``: each student view predicts the
    other view's teacher output; the mean of the two terms. The teacher is not differentiated."""
    student_1, student_2 = student.chunk(2)
    teacher_1, teacher_2 = teacher.detach().chunk(2)
    return (byol_loss(student_2, teacher_1) + byol_loss(student_1, teacher_2)) / 2


@torch.no_grad()
def output_std(outputs: Tensor) -> Tensor:
    """Collapse diagnostic: per-dimension standard deviation of the L2-normalised outputs, averaged
    over dimensions, across all processes when distributed (about ``1/sqrt(dim)`` when healthy,
    near 0 when collapsed)."""
    y = F.normalize(outputs.detach().float(), dim=-1).reshape(-1, outputs.shape[-1])
    stats = torch.cat([torch.tensor([y.shape[0]], dtype=y.dtype, device=y.device), y.sum(0), (y**2).sum(0)])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(stats)
    count, total, squares = stats[0], stats[1 : 1 + y.shape[1]], stats[1 + y.shape[1] :]
    variance = squares / (count - 1) - total**2 / (count * (count - 1))
    return torch.sqrt(variance + 1e-6).mean()


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float, buffers: bool = False) -> None:
    """``teacher <- momentum * teacher + (1 - momentum) * student`` for every parameter the teacher
    has (the student's predictor has no teacher counterpart); with ``buffers`` also for floating
    buffers (BatchNorm statistics), which the reference leaves to the teacher's own forward passes."""
    students = dict(student.named_parameters())
    for name, parameter in teacher.named_parameters():
        parameter.mul_(momentum).add_(students[name].detach(), alpha=1 - momentum)
    if buffers:
        student_buffers = dict(student.named_buffers())
        for name, buffer in teacher.named_buffers():
            if buffer.is_floating_point():
                buffer.mul_(momentum).add_(student_buffers[name], alpha=1 - momentum)


def cosine_schedule(
    step: int, base: float, final: float, total_steps: int, warmup_steps: int = 0, warmup_start: float = 0.0
) -> float:
    """Value at ``step`` of the reference's ``cosine_scheduler_step``: a linear warmup
    ``linspace(warmup_start, base, warmup_steps)``, then a cosine from ``base`` to ``final`` over
    the remaining steps. Steps at or past the end keep the last value (the reference's array would
    be indexed out of range there)."""
    if step < warmup_steps:
        if warmup_steps == 1:
            return warmup_start
        return warmup_start + (base - warmup_start) * step / (warmup_steps - 1)
    step = min(step, total_steps - 1)
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * progress))


def parameter_groups(module: nn.Module) -> list[dict]:
    """Group 0: trainable weights with more than one dimension that are not biases (weight decay
    follows the schedule); group 1: biases and 1-D parameters (norms), weight decay 0."""
    regularised, plain = [], []
    for name, parameter in module.named_parameters():
        if not parameter.requires_grad:
            continue
        (plain if name.endswith(".bias") or parameter.ndim == 1 else regularised).append(parameter)
    return [{"params": regularised}, {"params": plain, "weight_decay": 0.0}]
