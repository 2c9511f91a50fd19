"""Fine-tuning of a pretrained ATST encoder with a linear head (the paper's clip-level protocol).

The reference's ``FineTuningPLModule`` (``docs/reference-notes.md#fine-tuning``): the log-mel
spectrogram of a 12 s centre crop; the feature of the last block (ATST-Frame / C2F: the mean of the
frame tokens; ATST-Clip: its CLS output and token mean), averaged over windows of 10 s (Frame) or
6 s (Clip) of which the first always counts and a later one when it holds more than half a window;
``LinearHead``; SGD with momentum 0.9 and no weight decay; a per-step cosine learning rate after a
linear warmup of ``warmup_epochs``; layer-wise learning-rate decay; the encoder in training mode
(DropPath). Optional memory-bank mixup followed by RandomResizeCrop (``mixup``), which switches
the loss to BCE on mixed one-hot targets. Cross-entropy otherwise; BCE for multi-label tasks.

Not reproduced from the reference (defects): ATST-Clip's first-chunk mean shrink; mixup and RRC
silently skipped for NSynth and US8K; one-hot targets of 100 classes in the memory-bank mixup.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import InputError
from ..model import ATSTModel
from .augment import LabelMixup, RandomResizeCrop
from .metrics import score
from .supervised import SupervisedTraining, layerwise_groups, model_from_source

__all__ = ["FineTuning", "clip_feature", "layerwise_groups"]


def clip_feature(model: ATSTModel, mel: Tensor, n_frames: Tensor) -> Tensor:
    """The last block's clip feature ``[B, E]`` as the reference's fine-tuning computes it,
    differentiable: per window (10 s; ATST-Clip 6 s), the token mean (ATST-Clip: ``[CLS, token
    mean]``); the first window and later ones holding more than half a window are averaged with
    equal weights."""
    encoder = model.encoder
    cls, patch = encoder.config.cls_token, encoder.config.patch_frames
    window = model.clip_chunk if cls else model.frame_window
    total = mel.new_zeros(len(mel), model.clip_embedding_size(1), dtype=torch.float32)
    counted = mel.new_zeros(len(mel), dtype=torch.float32)
    for first in range(0, mel.shape[-1], window):
        valid = (n_frames - first).clamp(0, window)
        tokens = valid // patch
        keep = tokens > 0 if first == 0 else (tokens > 0) & (valid > window // 2)
        if not bool(keep.any()):
            continue
        rows = keep.nonzero()[:, 0]
        n_tokens = tokens[rows]
        out = encoder(mel[rows, :, first : first + window], n_tokens, 1)
        positions = torch.arange(out.tokens[0].shape[1], device=mel.device)
        mask = (positions[None, :] < n_tokens[:, None]).to(out.tokens[0].dtype)
        mean = torch.einsum("bpd,bp->bd", out.tokens[0], mask) / n_tokens[:, None]
        feature = torch.cat([out.cls[0], mean], dim=1) if cls else mean
        total = total.index_add(0, rows, feature.float())
        counted = counted.index_add(0, rows, torch.ones_like(rows, dtype=torch.float32))
    return total / counted[:, None]


class FineTuning(SupervisedTraining):
    """An ATST encoder from ``init`` (any :func:`~atst_features.load_model` source, or ``random:SOURCE``) with a new
    :class:`~atst_features.heads.LinearHead` for ``labels``, trained end to end.

    ``learning_rate`` is for a global batch of 256 (the peak is scaled by global batch / 256, as
    the reference scales by ``nproc * batch / 256``). ``warmup_steps`` overrides ``warmup_epochs``
    (for step-based runs, ``--trainer.max_steps``). ``layer_decay`` 0 turns layer-wise decay off.
    ``mixup``: memory-bank mixup (``mixup_alpha``, ``mixup_memory`` items, each item mixed with
    probability ``mixup_ratio``) then RandomResizeCrop
    (``resize_crop``, on by default with mixup as in the reference).
    """

    model_kind: str | None = None  # None: the kind of the source (C2F sources become "frame")

    def __init__(
        self,
        init: str,
        labels: list[str] | None = None,
        multi_label: bool = False,
        learning_rate: float = 0.5,
        max_epochs: int = 50,
        warmup_epochs: int = 5,
        warmup_steps: int | None = None,
        layer_decay: float = 0.75,
        freeze_embed: bool = False,
        drop_path_rate: float = 0.1,
        mixup: bool = False,
        mixup_alpha: float = 0.5,
        mixup_memory: int = 5000,
        mixup_ratio: float = 1.0,
        resize_crop: bool | None = None,
        crop_seconds: float = 12.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not labels:
            raise InputError(f"{type(self).__name__} needs the label names (atst-train takes them from --data.manifest)")
        self.save_hyperparameters()
        self.model = model_from_source(init, labels, multi_label=multi_label, drop_path_rate=drop_path_rate,
                                       kind=self.model_kind)
        crop_frames = self.model.frontend.n_frames(round(crop_seconds * self.model.sample_rate))  # what the bank keeps per clip
        self.mixup = LabelMixup(mixup_alpha, mixup_memory, crop_frames, mixup_ratio) if mixup else None
        self.crop = RandomResizeCrop() if (mixup if resize_crop is None else resize_crop) else None
        self._outputs: dict[str, list] = {}

    # ------------------------------------------------------------------ features
    @property
    def bce(self) -> bool:
        """Whether the loss is BCE (multi-label tasks and mixup), else cross-entropy."""
        return self.hparams.multi_label or self.mixup is not None

    def features(self, mel: Tensor, n_frames: Tensor) -> Tensor:
        return clip_feature(self.model, mel, n_frames)

    def logits(self, waveforms: Tensor, n_samples: Tensor) -> Tensor:
        mel, n_frames = self.spectrograms(waveforms, n_samples)
        return self.model.head(self.features(mel, n_frames))

    # ------------------------------------------------------------------ training
    def inputs(self, batch) -> tuple[Tensor, Tensor, Tensor]:
        """A training batch's augmented spectrograms ``[B, F, T]``, valid frames ``[B]`` and targets:
        class indices for cross-entropy, (mixed) one-hot or multi-hot floats for BCE."""
        waveforms, n_samples, targets = batch
        mel, n_frames = self.spectrograms(waveforms, n_samples)
        y = targets.float() if self.hparams.multi_label else targets
        if self.bce and not self.hparams.multi_label:
            y = F.one_hot(targets, len(self.hparams.labels)).float()
        if self.mixup is not None:
            mel, y = self.mixup(mel, y, self.rng, n_frames)
        if self.crop is not None:
            mel = self.crop(mel, self.generator, n_frames)
        return mel, n_frames, y

    def loss(self, logits: Tensor, y: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(logits, y) if self.bce else F.cross_entropy(logits, y)

    def log_training(self, loss: Tensor, lr: float, logits: Tensor, targets: Tensor, **extra) -> None:
        size = len(targets)
        self.log_dict({"loss": loss, "lr": lr, **extra}, prog_bar=True, batch_size=size)
        if not self.hparams.multi_label:
            hits = (logits.argmax(dim=1) == targets).float().mean()
            self.log("train_accuracy", hits, on_step=False, on_epoch=True, prog_bar=True, batch_size=size)

    def training_step(self, batch, batch_idx: int) -> Tensor:
        lr = self.update_learning_rate()
        mel, n_frames, y = self.inputs(batch)
        logits = self.model.head(self.features(mel, n_frames))
        loss = self.loss(logits, y)
        self.log_training(loss, lr, logits, batch[2])
        return loss

    # ------------------------------------------------------------------ evaluation
    def _evaluate(self, stage: str, batch) -> None:
        waveforms, n_samples, targets = batch
        self._outputs.setdefault(stage, []).append((self.logits(waveforms, n_samples).float().cpu(), targets.cpu()))

    def _finish(self, stage: str) -> None:
        outputs = self._outputs.pop(stage, [])
        if not outputs:
            return
        logits = torch.cat([o[0] for o in outputs])
        targets = torch.cat([o[1] for o in outputs])
        logits, targets = self.gather(logits, targets)
        value = score(logits, targets, self.hparams.multi_label)
        metric = "mAP" if self.hparams.multi_label else "accuracy"
        self.log_dict({f"{stage}_score": value, f"{stage}_{metric}": value}, prog_bar=True, sync_dist=False)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._evaluate("valid", batch)

    def on_validation_epoch_end(self) -> None:
        self._finish("valid")

    def test_step(self, batch, batch_idx: int) -> None:
        self._evaluate("test", batch)

    def on_test_epoch_end(self) -> None:
        self._finish("test")
