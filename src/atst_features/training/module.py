"""LightningModules for ATST-Clip and ATST-Frame self-supervised pretraining (the paper's recipe).

Each training step: log-mel spectrograms of the raw crops, Mixup and RandomResizeCrop (and the span
mask for ATST-Frame) computed in batch on the device, then the student (encoder, projector,
predictor) predicts the EMA teacher's projected output of the other view (BYOL, 2 - 2 cos).
Schedules are functions of the optimizer step, so a resumed run continues every one of them.

Defaults reproduce the reference's effective behaviour, defects included; each known defect that
can be fixed is an option: ``teacher_eval`` (the reference runs its EMA teacher in training mode,
with DropPath and batch-statistics BatchNorm), ``ema_buffers`` (the reference does not average the
teacher's BatchNorm statistics), ``exact_mask_ratio`` (fairseq's spans mask about 50 %, not the
nominal 65 %, and never the last token), ``canvas_value`` (the crop canvas is 0 in the normalised
domain, -14.5 dB, not silence).
"""

from __future__ import annotations

from abc import abstractmethod

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from ..encoder import EncoderConfig
from ..errors import InputError
from ..frontend import FrontendConfig, LogMelFrontend
from .augment import Mixup, RandomResizeCrop, span_masks
from .objective import (
    FINAL_LR,
    Branch,
    cosine_schedule,
    cross_view_loss,
    ema_update,
    output_std,
    parameter_groups,
)

__all__ = ["ATSTPretraining", "ClipPretraining", "FramePretraining"]

WEIGHT_DECAY = (0.04, 0.4)  # cosine from the first to the second value over the run


def _check_crops(batch, expected: int):
    if len(batch) != expected:
        raise InputError(
            f"this method takes {expected} crop(s) per item, the data gives {len(batch)}: "
            f"set data.crop_seconds to {'[10.0]' if expected == 1 else '[train_len, 6.0]'}"
        )
    return batch


class _BYOLPair(torch.nn.Module):
    """``student`` and its EMA ``teacher``; the names give the official checkpoint layout."""

    def __init__(self, encoder: EncoderConfig, hidden_dim: int, out_dim: int) -> None:
        super().__init__()
        self.student = Branch(encoder, hidden_dim, out_dim, predictor=True)
        self.teacher = Branch(encoder, hidden_dim, out_dim, predictor=False)
        self.teacher.load_state_dict(self.student.state_dict(), strict=False)  # all but the predictor
        self.teacher.requires_grad_(False)


class ATSTPretraining(L.LightningModule):
    """What both methods share: networks, front end, schedules, EMA teacher, optimizer, logging.

    ``arch``: ``small`` / ``base`` / ``large``; ``embed_dim``, ``depth`` and ``num_heads`` override
    it (any size). ``learning_rate`` is for a global batch of 256: the peak is scaled by
    ``global batch / 256`` (batch per device x devices x nodes x gradient accumulation).
    ``warmup_steps`` and ``max_steps`` count optimizer steps; ``ema`` is the teacher momentum at
    step 0, raised to 1 by a cosine.
    """

    cls_token: bool

    def __init__(
        self,
        arch: str = "small",
        embed_dim: int | None = None,
        depth: int | None = None,
        num_heads: int | None = None,
        drop_path_rate: float = 0.1,
        projector_hidden_dim: int = 4096,
        projector_out_dim: int = 256,
        learning_rate: float = 5e-4,
        warmup_steps: int = 1300,
        max_steps: int = 39_100,
        ema: float = 0.99,
        mixup: bool = True,
        mixup_ratio: float = 0.4,
        mixup_memory: int = 2000,
        canvas_value: float = 0.0,
        teacher_eval: bool = False,
        ema_buffers: bool = False,
        win_length: int = 1024,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        overrides = {k: v for k, v in dict(embed_dim=embed_dim, depth=depth, num_heads=num_heads).items() if v}
        if embed_dim:
            overrides["mlp_hidden_dim"] = 4 * embed_dim
        self.encoder_config = EncoderConfig.of_size(
            arch, cls_token=self.cls_token, drop_path_rate=drop_path_rate, **overrides
        )
        self.model = _BYOLPair(self.encoder_config, projector_hidden_dim, projector_out_dim)
        self.frontend = LogMelFrontend(FrontendConfig(win_length=win_length))
        self.generator: torch.Generator | None = None

    # ------------------------------------------------------------------ what each method defines
    @abstractmethod
    def views(self, batch) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """``(spectrograms [2B, F, T] as [view 1; view 2], valid tokens [2B] or None, token mask or None)``."""

    @abstractmethod
    def features(self, branch: Branch, views: Tensor, n_tokens: Tensor | None, mask: Tensor | None, student: bool):
        """Encoder outputs that enter the heads: ``[N, D]``."""

    # ------------------------------------------------------------------ schedules
    def peak_learning_rate(self) -> float:
        trainer = self.trainer
        batch = getattr(trainer.datamodule, "batch_size", None) if trainer.datamodule is not None else None
        if batch is None:
            raise InputError("the data module must expose batch_size (per device) to scale the learning rate")
        global_batch = batch * trainer.world_size * trainer.accumulate_grad_batches
        return self.hparams.learning_rate * global_batch / 256

    def learning_rate_at(self, step: int) -> float:
        h = self.hparams
        return cosine_schedule(step, self._peak_lr, FINAL_LR, h.max_steps, h.warmup_steps)

    def weight_decay_at(self, step: int) -> float:
        return cosine_schedule(step, WEIGHT_DECAY[0], WEIGHT_DECAY[1], self.hparams.max_steps)

    def momentum_at(self, step: int) -> float:
        return cosine_schedule(step, self.hparams.ema, 1.0, self.hparams.max_steps)

    # ------------------------------------------------------------------ Lightning hooks
    def configure_optimizers(self):
        self._peak_lr = self.peak_learning_rate()
        return torch.optim.AdamW(
            parameter_groups(self.model.student), lr=self._peak_lr, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-6
        )

    def on_fit_start(self) -> None:
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(self.hparams.seed * 100_003 + self.global_rank)

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.hparams.teacher_eval:
            self.model.teacher.eval()
        return self

    def training_step(self, batch, batch_idx: int) -> Tensor:
        step = self.global_step
        lr, wd = self.learning_rate_at(step), self.weight_decay_at(step)
        for index, group in enumerate(self.trainer.optimizers[0].param_groups):
            group["lr"] = lr
            if index == 0:
                group["weight_decay"] = wd
        with torch.no_grad(), torch.autocast(device_type=self.device.type, enabled=False):
            views, n_tokens, mask = self.views(batch)
        teacher, student = self.model.teacher, self.model.student
        with torch.no_grad():
            targets = teacher.head(self.features(teacher, views, n_tokens, mask, student=False))
        predictions = student.head(self.features(student, views, n_tokens, mask, student=True))
        loss = cross_view_loss(predictions, targets)
        size = len(batch[0])
        self.log_dict(
            {"loss": loss, "lr": lr, "wd": wd, "ema": self.momentum_at(step + 1)},
            prog_bar=True, batch_size=size,
        )
        self.log_dict({"std_student": output_std(predictions), "std_teacher": output_std(targets)}, batch_size=size)
        return loss

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        if getattr(self, "step_skipped", False):  # a skipped bad batch (guards.FiniteSteps): the teacher stays too
            return
        # Right after optimizer step k (once per step under gradient accumulation), before any
        # callback, so a checkpoint written after step k holds the teacher of step k. Lightning
        # counts the step only after this hook (global_step is still k here); the reference applies
        # the momentum of index k + 1 (its hook runs when global_step is already k + 1).
        momentum = self.momentum_at(self.global_step + 1)
        ema_update(self.model.teacher, self.model.student, momentum, self.hparams.ema_buffers)


class FramePretraining(ATSTPretraining):
    """ATST-Frame: one crop per item; view 1 unaugmented, view 2 Mixup + frequency-only
    RandomResizeCrop; one span mask shared by both views; the student sees masked tokens (replaced
    by ``mask_embed``), the teacher does not; the loss is on masked frames only.

    ``mask_ratio`` / ``mask_span`` / ``min_spans``: fairseq "static" spans (about 50 % masked for
    0.65); ``exact_mask_ratio``: non-overlapping spans masking ``mask_ratio`` of the tokens.
    ``freq_scale``: the student view's random frequency crop, as a share of the mel bins
    (the reference's ``(0.6, 1.5)``; ``[1.0, 1.0]`` turns it off: no invariance to spectral zoom).
    ``center_targets`` (not in the reference): the teacher's tokens minus their clip mean enter
    the heads, so a representation that is constant within a clip predicts nothing;
    ``center_positions`` also removes the batch mean at each position (what position alone predicts).
    """

    cls_token = False

    def __init__(
        self,
        mask_ratio: float = 0.65,
        mask_span: int = 5,
        min_spans: int = 2,
        exact_mask_ratio: bool = False,
        freq_scale: list[float] = [0.6, 1.5],  # noqa: B006 - read only; a list for the CLI
        center_targets: bool = False,
        center_positions: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.mixup = Mixup(self.hparams.mixup_ratio, self.hparams.mixup_memory)
        self.crop = RandomResizeCrop(
            (1.0, 1.0), freq_scale=tuple(freq_scale), time_scale=(1.0, 1.0), canvas_value=self.hparams.canvas_value
        )

    def views(self, batch):
        (waveforms,) = _check_crops(batch, 1)
        mel, _ = self.frontend(waveforms)
        augmented = mel
        if self.hparams.mixup:
            augmented = self.mixup(augmented, self.generator)
        augmented = self.crop(augmented, self.generator)
        h = self.hparams
        mask = span_masks(
            len(mel), mel.shape[-1] // self.encoder_config.patch_frames, ratio=h.mask_ratio, span=h.mask_span,
            min_spans=h.min_spans, exact=h.exact_mask_ratio, generator=self.generator, device=mel.device,
        )
        return torch.cat([mel, augmented]), None, torch.cat([mask, mask])

    def features(self, branch, views, n_tokens, mask, student):
        tokens = branch.encoder(views, n_tokens, token_mask=mask if student else None).tokens[0]
        if not student:
            if self.hparams.center_targets:
                tokens = tokens - tokens.mean(dim=1, keepdim=True)
            if self.hparams.center_positions:
                tokens = tokens - tokens.mean(dim=0, keepdim=True)
        return tokens[mask]


class ClipPretraining(ATSTPretraining):
    """ATST-Clip: two independent crops per item (``train_len`` s and 6 s), each through its own
    Mixup and RandomResizeCrop; both padded to the longer one (value 0, masked out of attention);
    the CLS outputs go through the heads."""

    cls_token = True

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.model.student.encoder.mask_embed.requires_grad_(False)  # unused by ATST-Clip; no DDP search
        self.mixups = torch.nn.ModuleList(Mixup(self.hparams.mixup_ratio, self.hparams.mixup_memory) for _ in range(2))
        self.crop = RandomResizeCrop((1.0, 1.5), canvas_value=self.hparams.canvas_value)

    def views(self, batch):
        crops = _check_crops(batch, 2)
        patch = self.encoder_config.patch_frames
        views, n_tokens = [], []
        for waveforms, mixup in zip(crops, self.mixups):
            mel, _ = self.frontend(waveforms)
            if self.hparams.mixup:
                mel = mixup(mel, self.generator)
            views.append(self.crop(mel, self.generator))
            n_tokens.append(torch.full((len(mel),), mel.shape[-1] // patch, device=mel.device))
        width = max(view.shape[-1] for view in views)
        views = [F.pad(view, (0, width - view.shape[-1])) for view in views]
        return torch.cat(views), torch.cat(n_tokens), None

    def features(self, branch, views, n_tokens, mask, student):
        return branch.encoder(views, n_tokens).cls[0]
