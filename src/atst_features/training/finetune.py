"""Fine-tuning of a pretrained ATST encoder with a linear head (the paper's clip-level protocol).

The reference's ``FineTuningPLModule`` (section 7.2 of ``docs/atst-reference.md``): the log-mel
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

import dataclasses

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..model import ATSTModel, ModelConfig
from .augment import LabelMixup, RandomResizeCrop
from .metrics import score
from .objective import cosine_schedule

__all__ = ["FineTuning", "layerwise_groups"]

FINAL_LR = 1e-6
MOMENTUM = 0.9


def layerwise_groups(model: ATSTModel, decay: float = 0.75, freeze_embed: bool = False) -> list[dict]:
    """SGD parameter groups with the reference's layer-wise ``lr_scale`` for a ``depth``-block model:
    embeddings (patch, positions, CLS / prompts) ``decay ** depth`` (or frozen), block ``i``
    ``decay ** (depth - i)``, the final norm ``decay``, the head 1. Each group has a ``name``.
    ``mask_embed`` (pretraining only) is left out."""
    depth = model.depth
    sections: dict[str, list] = {"embeddings": []}
    sections.update({f"block.{i}": [] for i in range(depth)})
    sections.update({"norm": [], "head": []})
    for name, parameter in model.encoder.named_parameters():
        if name == "mask_embed" or not parameter.requires_grad:
            continue
        if name.startswith("blocks."):
            sections[f"block.{name.split('.')[1]}"].append(parameter)
        elif name.startswith("norm."):
            sections["norm"].append(parameter)
        elif not freeze_embed:
            sections["embeddings"].append(parameter)
    if model.head is not None:
        sections["head"] = list(model.head.parameters())
    scales = {"embeddings": decay**depth, "norm": decay, "head": 1.0}
    scales.update({f"block.{i}": decay ** (depth - i) for i in range(depth)})
    return [{"params": params, "lr_scale": scales[name], "name": name} for name, params in sections.items() if params]


class FineTuning(L.LightningModule):
    """An ATST encoder from ``init`` (any :func:`~atst_features.load_model` source) with a new
    :class:`~atst_features.model.LinearHead` for ``labels``, trained end to end.

    ``learning_rate`` is for a global batch of 256 (the peak is scaled by global batch / 256, as
    the reference scales by ``nproc * batch / 256``). ``layer_decay`` 0 turns layer-wise decay off.
    ``mixup``: memory-bank mixup (``mixup_alpha``, ``mixup_memory`` items, each item mixed with
    probability ``mixup_ratio``) then RandomResizeCrop
    (``resize_crop``, on by default with mixup as in the reference).
    """

    def __init__(
        self,
        init: str,
        labels: list[str] | None = None,
        multi_label: bool = False,
        learning_rate: float = 0.5,
        max_epochs: int = 50,
        warmup_epochs: int = 5,
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
        from ..loading import read_source

        if not labels:
            raise ValueError("FineTuning needs the label names (atst-train finetune takes them from --data.manifest)")
        self.save_hyperparameters()
        contents, _ = read_source(init)
        encoder = dataclasses.replace(contents.config.encoder, drop_path_rate=drop_path_rate)
        if encoder.n_prompts:
            raise ValueError(f"{init!r}: fine-tuning encoders with prompt tokens is not supported")
        kind = "frame" if contents.config.kind == "c2f" else contents.config.kind
        config = ModelConfig(kind, encoder, contents.config.frontend, len(labels), tuple(labels), multi_label)
        self.model = ATSTModel(config)
        self.model.encoder.load_state_dict({k: v.float() for k, v in contents.encoder_state.items()})
        self.model.encoder.mask_embed.requires_grad_(False)
        self.mixup = LabelMixup(mixup_alpha, mixup_memory, int(crop_seconds * 100) + 1, mixup_ratio) if mixup else None
        self.crop = RandomResizeCrop() if (mixup if resize_crop is None else resize_crop) else None
        self.generator: torch.Generator | None = None
        self.rng: np.random.Generator | None = None
        self._outputs: dict[str, list] = {}

    # ------------------------------------------------------------------ features
    @property
    def bce(self) -> bool:
        """Whether the loss is BCE (multi-label tasks and mixup), else cross-entropy."""
        return self.hparams.multi_label or self.mixup is not None

    def spectrograms(self, waveforms: Tensor, n_samples: Tensor) -> tuple[Tensor, Tensor]:
        """Normalised log-mel ``[B, F, T]`` and valid frames ``[B]`` (short clips padded to the minimum)."""
        frontend = self.model.frontend
        if waveforms.shape[-1] < frontend.min_samples:
            waveforms = F.pad(waveforms, (0, frontend.min_samples - waveforms.shape[-1]))
        with torch.no_grad():
            return frontend(waveforms.float(), n_samples.clamp(min=frontend.min_samples))

    def features(self, mel: Tensor, n_frames: Tensor) -> Tensor:
        """The last block's clip feature ``[B, E]``, differentiable: per window, the token mean
        (ATST-Clip: ``[CLS, token mean]``); windows that count are averaged with equal weights."""
        encoder = self.model.encoder
        cls, patch = encoder.config.cls_token, encoder.config.patch_frames
        window = ATSTModel.clip_chunk if cls else ATSTModel.frame_window
        total = mel.new_zeros(len(mel), self.model.clip_embedding_size(1), dtype=torch.float32)
        counted = mel.new_zeros(len(mel), dtype=torch.float32)
        for first in range(0, mel.shape[-1], window):
            valid = (n_frames - first).clamp(0, window)
            tokens = valid // patch
            keep = tokens > 0 if first == 0 else (tokens > 0) & (valid > window // 2)
            if not bool(keep.any()):
                continue
            rows = keep.nonzero()[:, 0]
            chunk = mel[rows, :, first : first + window]
            n_tokens = tokens[rows]
            out = encoder(chunk, n_tokens, 1)
            positions = torch.arange(out.tokens[0].shape[1], device=mel.device)
            mask = (positions[None, :] < n_tokens[:, None]).to(out.tokens[0].dtype)
            mean = torch.einsum("bpd,bp->bd", out.tokens[0], mask) / n_tokens[:, None]
            feature = torch.cat([out.cls[0], mean], dim=1) if cls else mean
            total = total.index_add(0, rows, feature.float())
            counted = counted.index_add(0, rows, torch.ones_like(rows, dtype=torch.float32))
        return total / counted[:, None]

    def logits(self, waveforms: Tensor, n_samples: Tensor) -> Tensor:
        mel, n_frames = self.spectrograms(waveforms, n_samples)
        return self.model.head(self.features(mel, n_frames))

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        trainer = self.trainer
        batch = getattr(trainer.datamodule, "batch_size", None) if trainer.datamodule is not None else None
        if batch is None:
            raise ValueError("the data module must expose batch_size (per device) to scale the learning rate")
        self._peak_lr = self.hparams.learning_rate * batch * trainer.world_size * trainer.accumulate_grad_batches / 256
        self._total_steps = max(1, int(trainer.estimated_stepping_batches))
        self._warmup_steps = int(round(self._total_steps * self.hparams.warmup_epochs / max(1, self.hparams.max_epochs)))
        if self.hparams.layer_decay > 0:
            groups = layerwise_groups(self.model, self.hparams.layer_decay, self.hparams.freeze_embed)
        else:
            groups = [{"params": [p for n, p in self.model.named_parameters() if p.requires_grad], "lr_scale": 1.0, "name": "all"}]
        return torch.optim.SGD(groups, lr=self._peak_lr, momentum=MOMENTUM, weight_decay=0.0)

    def learning_rate_at(self, step: int) -> float:
        return cosine_schedule(step, self._peak_lr, FINAL_LR, self._total_steps, self._warmup_steps)

    def on_fit_start(self) -> None:
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(self.hparams.seed * 100_003 + self.global_rank)
        self.rng = np.random.default_rng([self.hparams.seed, self.global_rank])

    def training_step(self, batch, batch_idx: int) -> Tensor:
        waveforms, n_samples, targets = batch
        lr = self.learning_rate_at(self.global_step)
        for group in self.trainer.optimizers[0].param_groups:
            group["lr"] = lr * group["lr_scale"]
        mel, n_frames = self.spectrograms(waveforms, n_samples)
        y = targets.float() if self.hparams.multi_label else targets
        if self.bce and not self.hparams.multi_label:
            y = F.one_hot(targets, len(self.hparams.labels)).float()
        if self.mixup is not None:
            mel, y = self.mixup(mel, y, self.rng)
        if self.crop is not None:
            mel = self.crop(mel, self.generator)
        logits = self.model.head(self.features(mel, n_frames))
        loss = F.binary_cross_entropy_with_logits(logits, y) if self.bce else F.cross_entropy(logits, y)
        size = len(targets)
        self.log_dict({"loss": loss, "lr": lr}, prog_bar=True, batch_size=size)
        if not self.hparams.multi_label:
            hits = (logits.argmax(dim=1) == targets).float().mean()
            self.log("train_accuracy", hits, on_step=False, on_epoch=True, prog_bar=True, batch_size=size)
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
        if self.trainer.world_size > 1:  # the distributed sampler pads every rank to the same count
            logits = self.all_gather(logits.to(self.device)).flatten(0, 1).cpu()
            targets = self.all_gather(targets.to(self.device)).flatten(0, 1).cpu()
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
