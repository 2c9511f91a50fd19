"""What every supervised training of an ATST encoder shares (fine-tuning, C2F distillation, sound
event detection): the model built from a pretrained source with a new head, the front end, SGD
with the reference's layer-wise learning-rate groups, a linear warmup then a per-step cosine to
1e-6, the learning rate scaled by the global batch / 256, and seeded augmentation generators.
"""

from __future__ import annotations

import dataclasses

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import InputError
from ..config import ModelConfig
from ..model import ATSTModel
from .objective import FINAL_LR, cosine_schedule

__all__ = ["MOMENTUM", "SupervisedTraining", "layerwise_groups", "model_from_source"]

MOMENTUM = 0.9


def model_from_source(
    init: str, labels: list[str], *, multi_label: bool, head_type: str = "clip", drop_path_rate: float = 0.1,
    kind: str | None = None, head_norm: bool = False,
) -> ATSTModel:
    """The encoder of ``init`` (any :func:`~atst_features.load_model` source, or ``random:SOURCE``: its
    architecture with random weights, as atst-probe spells it) with a new head for ``labels``
    (``head_type`` "clip": LinearHead; "events": EventHead), in float32; ``mask_embed`` (pretraining
    only) frozen. ``kind`` overrides the model kind (default: a C2F source becomes "frame")."""
    from ..loading import read_model_source

    contents, random_weights = read_model_source(init)
    encoder = dataclasses.replace(contents.config.encoder, drop_path_rate=drop_path_rate)
    if encoder.n_prompts:
        raise InputError(f"{init!r}: training encoders with prompt tokens is not supported")
    kind = kind or ("frame" if contents.config.kind == "c2f" else contents.config.kind)
    if kind == "c2f" and encoder.cls_token:
        raise InputError(f"{init!r} is an ATST-Clip model; a C2F student starts from ATST-Frame")
    config = ModelConfig(kind, encoder, contents.config.frontend, len(labels), tuple(labels), multi_label, head_type,
                         head_norm)
    model = ATSTModel(config)
    if not random_weights:
        model.encoder.load_state_dict({k: v.float() for k, v in contents.encoder_state.items()})
    model.encoder.mask_embed.requires_grad_(False)
    return model


def layerwise_groups(model: ATSTModel, decay: float = 0.75, freeze_embed: bool = False, extra=()) -> list[dict]:
    """SGD parameter groups with the reference's layer-wise ``lr_scale`` for a ``depth``-block model:
    embeddings (patch, positions, CLS / prompts) ``decay ** depth`` (or frozen), block ``i``
    ``decay ** (depth - i)``, the final norm ``decay``, the head (and the modules in ``extra``) 1.
    Each group has a ``name``; frozen parameters (``requires_grad`` False) are left out."""
    depth = model.depth
    sections: dict[str, list] = {"embeddings": []}
    sections.update({f"block.{i}": [] for i in range(depth)})
    sections.update({"norm": [], "head": []})
    for name, parameter in model.encoder.named_parameters():
        if not parameter.requires_grad:
            continue
        if name.startswith("blocks."):
            sections[f"block.{name.split('.')[1]}"].append(parameter)
        elif name.startswith("norm."):
            sections["norm"].append(parameter)
        elif not freeze_embed:
            sections["embeddings"].append(parameter)
    for module in (model.head, *extra):
        if module is not None:
            sections["head"] += [p for p in module.parameters() if p.requires_grad]
    scales = {"embeddings": decay**depth, "norm": decay, "head": 1.0}
    scales.update({f"block.{i}": decay ** (depth - i) for i in range(depth)})
    return [{"params": params, "lr_scale": scales[name], "name": name} for name, params in sections.items() if params]


class SupervisedTraining(L.LightningModule):
    """Base of the supervised LightningModules; subclasses set ``self.model`` (an ATSTModel with a
    head) and define ``training_step``, calling :meth:`update_learning_rate` first.
    Needs ``learning_rate``, ``max_epochs``, ``warmup_epochs``, ``layer_decay`` and ``seed`` in
    ``hparams`` (and optionally ``freeze_embed``)."""

    model: ATSTModel

    def extra_head_modules(self) -> tuple:
        """Trainable modules besides the model's encoder and head (lr scale 1)."""
        return ()

    def parameter_groups(self) -> list[dict]:
        h = self.hparams
        if h.layer_decay > 0:
            return layerwise_groups(self.model, h.layer_decay, h.get("freeze_embed", False), self.extra_head_modules())
        params = [p for p in self.model.parameters() if p.requires_grad]
        params += [p for m in self.extra_head_modules() for p in m.parameters() if p.requires_grad]
        return [{"params": params, "lr_scale": 1.0, "name": "all"}]

    def configure_optimizers(self):
        trainer = self.trainer
        batch = getattr(trainer.datamodule, "batch_size", None) if trainer.datamodule is not None else None
        if batch is None:
            raise InputError("the data module must expose batch_size (per device) to scale the learning rate")
        self._peak_lr = self.hparams.learning_rate * batch * trainer.world_size * trainer.accumulate_grad_batches / 256
        return torch.optim.SGD(self.parameter_groups(), lr=self._peak_lr, momentum=MOMENTUM, weight_decay=0.0)

    def schedule_steps(self) -> tuple[int, int]:
        """(optimizer steps of the whole run, warmup steps). Asked of the trainer once training runs, not
        when the optimizer is made: asking earlier makes Lightning load the training data before a
        resumed run has restored the loader's position, and the run would repeat its epoch's batches."""
        if getattr(self, "_schedule_steps", None) is None:
            total = max(1, int(self.trainer.estimated_stepping_batches))
            epochs = max(1, self.trainer.max_epochs or self.hparams.max_epochs)
            warmup = self.hparams.get("warmup_steps")
            self._schedule_steps = total, int(round(total * self.hparams.warmup_epochs / epochs)) if warmup is None else warmup
        return self._schedule_steps

    def learning_rate_at(self, step: int) -> float:
        total, warmup = self.schedule_steps()
        return cosine_schedule(step, self._peak_lr, FINAL_LR, total, warmup)

    def update_learning_rate(self) -> float:
        lr = self.learning_rate_at(self.global_step)
        for group in self.trainer.optimizers[0].param_groups:
            group["lr"] = lr * group["lr_scale"]
        return lr

    def on_fit_start(self) -> None:
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(self.hparams.seed * 100_003 + self.global_rank)
        self.rng = np.random.default_rng([self.hparams.seed, self.global_rank])

    def spectrograms(self, waveforms: Tensor, n_samples: Tensor) -> tuple[Tensor, Tensor]:
        """Normalised log-mel ``[B, F, T]`` and valid frames ``[B]`` (short clips padded to the minimum)."""
        minimum = self.model.min_samples
        if waveforms.shape[-1] < minimum:
            waveforms = F.pad(waveforms, (0, minimum - waveforms.shape[-1]))
        with torch.no_grad():
            return self.model.frontend(waveforms.float(), n_samples.clamp(min=minimum))

    def gather(self, *tensors: Tensor) -> list[Tensor]:
        """Concatenate a validation epoch's tensors over processes (the distributed sampler pads every
        rank to the same count), on the CPU."""
        if self.trainer.world_size == 1:
            return [t.cpu() for t in tensors]
        return [self.all_gather(t.to(self.device)).flatten(0, 1).cpu() for t in tensors]
