"""ATST-C2F: fine-tune ATST-Frame on a clip-level task with a frozen fine-tuned ATST-Clip teacher
(``docs/reference-notes.md#c2f-distillation``; the reference's ``module_distill*.py``).

The student (an ATST-Frame encoder from ``init`` with a new LinearHead) and the teacher (any model
with a LinearHead for the same classes, e.g. ATST-Clip fine-tuned with ``atst-train finetune``;
never optimised) see the same augmented batch. With s the student logits, s' the distillation
branch's (= s, or the projector branch with ``project``), t the teacher's, y the labels:

- multi-label tasks or mixup: ``BCE(s', sigmoid(t))`` and ``BCE(s, y)``;
- single-label without mixup: ``CE(s', softmax(t))`` (soft targets) and ``CE(s, y)``;
- loss ``lambda_d * distillation + (1 - lambda_d) * supervised`` (the reference: 0.5; its
  AudioSet script: 1.0, pure distillation).

As in the reference the teacher runs in training mode (DropPath; its head's BatchNorm on batch
statistics, updating its running statistics); ``teacher_eval`` is the fix. Unlike the reference,
the student's ``prompt_embed`` (if any) is optimised with the embeddings; the reference forgets it.
Everything else (optimiser, layer-wise decay, schedule, mixup, selection) is :class:`FineTuning`'s.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import InputError
from ..heads import LinearHead
from .finetune import FineTuning, clip_feature
from .objective import mlp_head

__all__ = ["Distillation", "distillation_loss"]


def distillation_loss(student: Tensor, teacher: Tensor, soft_labels: bool) -> Tensor:
    """``BCE(student, sigmoid(teacher))`` (multi-label or mixup), or, for ``soft_labels`` (single-label),
    the cross-entropy of the student's softmax against the teacher's softmax, averaged over the batch."""
    teacher = teacher.detach().float()
    if soft_labels:
        return F.cross_entropy(student, teacher.softmax(dim=-1))
    return F.binary_cross_entropy_with_logits(student, teacher.sigmoid())


class Distillation(FineTuning):
    """The student is an ATST-Frame encoder (``init``: ATST-Frame, C2F or an atst-train checkpoint of them).
    C2F distillation: the :class:`FineTuning` student plus a frozen ``teacher`` (a model source
    with a tagging head for the same classes). ``lambda_d``: weight of the distillation term.
    ``project``: a separate distillation branch (MLP D -> 4096 -> D with BatchNorm and ReLU, then a
    LinearHead), as the reference's ``--project``. ``teacher_eval``: run the teacher in eval mode."""

    model_kind = "c2f"

    def __init__(
        self,
        init: str,
        teacher: str,
        labels: list[str] | None = None,
        lambda_d: float = 0.5,
        project: bool = False,
        teacher_eval: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(init, labels, **kwargs)
        self.save_hyperparameters()
        from ..loading import load_model

        self.teacher = load_model(teacher, device="cpu")
        self.teacher.require_head("clip", f"the teacher {teacher!r}")
        if self.teacher.config.num_classes != len(self.hparams.labels):
            raise InputError(f"{teacher!r}: the teacher needs a tagging head of {len(self.hparams.labels)} classes "
                             "(fine-tune ATST-Clip on the task first: atst-train finetune)")
        if self.teacher.config.labels and list(self.teacher.config.labels) != list(self.hparams.labels):
            raise InputError(f"{teacher!r}: the teacher's labels {list(self.teacher.config.labels)[:5]}... differ from the data's")
        self.teacher.requires_grad_(False)
        # Lightning keeps the train/eval mode each submodule has at the start of fit: set it here.
        self.teacher.train(not teacher_eval)
        dim = self.model.embed_dim
        self.projector = mlp_head(dim, 4096, dim) if project else None
        self.project_linear = LinearHead(dim, len(self.hparams.labels)) if project else None

    def extra_head_modules(self) -> tuple:
        return tuple(m for m in (self.projector, self.project_linear) if m is not None)

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.hparams.teacher_eval:
            self.teacher.eval()
        return self

    def training_step(self, batch, batch_idx: int) -> Tensor:
        lr = self.update_learning_rate()
        mel, n_frames, y = self.inputs(batch)
        feature = self.features(mel, n_frames)
        logits = self.model.head(feature)
        branch = self.project_linear(self.projector(feature)) if self.projector is not None else logits
        with torch.no_grad():
            teacher_logits = self.teacher.head(clip_feature(self.teacher, mel, n_frames))
        distill = distillation_loss(branch, teacher_logits, soft_labels=not self.bce)
        supervised = self.loss(logits, y)
        loss = self.hparams.lambda_d * distill + (1 - self.hparams.lambda_d) * supervised
        self.log_training(loss, lr, logits, batch[2], distill=distill, supervised=supervised)
        return loss
