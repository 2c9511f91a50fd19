"""Training with ATST (install with ``pip install atst-features[train]``): self-supervised
pretraining, fine-tuning, linear evaluation, C2F distillation and sound event detection.

- :mod:`.data`: crops of raw audio from folders, manifests or WebDataset shards;
- :mod:`.augment`: Mixup, label mixup, RandomResizeCrop and span masks, batched on the device;
- :mod:`.objective`: heads, BYOL loss, EMA teacher, schedules, parameter groups;
- :mod:`.module`: the pretraining LightningModules :class:`ClipPretraining` and :class:`FramePretraining`;
- :mod:`.manifests`: labelled audio (CSV/TSV manifests, label folders) and its splits;
- :mod:`.labelled`: labelled clips for fine-tuning (:class:`LabelledData`);
- :mod:`.sampling`: label-balanced sampling of training clips, as the reference's AudioSet runs;
- :mod:`.supervised`: what supervised trainings share (model from a source, layer-wise groups, schedule);
- :mod:`.finetune`: fine-tuning with layer-wise learning-rate decay (:class:`FineTuning`);
- :mod:`.distill`: ATST-C2F distillation (:class:`Distillation`);
- :mod:`.sed`: sound event detection (:class:`SoundEventDetection`, :class:`EventData`);
- :mod:`.linear_eval`: the paper's linear evaluation of frozen embeddings;
- :mod:`.metrics`: accuracy and mAP as the reference computes them;
- :mod:`.probe`: the ``atst-probe`` command;
- :mod:`.cli`: the ``atst-train`` command and its presets.

The core package never imports this one.
"""

from importlib import import_module

__all__ = [
    "ClipPretraining", "Distillation", "EventData", "FineTuning", "FramePretraining", "LabelledData", "PretrainingData",
    "SoundEventDetection",
]
_HOMES = {
    "Distillation": ".distill",
    "EventData": ".sed",
    "SoundEventDetection": ".sed",
    "PretrainingData": ".data",
    "ClipPretraining": ".module",
    "FramePretraining": ".module",
    "FineTuning": ".finetune",
    "LabelledData": ".labelled",
}


def __getattr__(name: str):
    # Lazy, so that `atst-probe` and the manifests load without importing Lightning.
    if name in _HOMES:
        return getattr(import_module(_HOMES[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
