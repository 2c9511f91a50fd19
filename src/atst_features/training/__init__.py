"""Self-supervised pretraining of ATST-Clip and ATST-Frame (install with ``pip install atst-features[train]``).

- :mod:`.data`: crops of raw audio from folders, manifests or WebDataset shards;
- :mod:`.augment`: Mixup, RandomResizeCrop and span masks, batched on the device;
- :mod:`.objective`: heads, BYOL loss, EMA teacher, schedules, parameter groups;
- :mod:`.module`: the LightningModules :class:`ClipPretraining` and :class:`FramePretraining`;
- :mod:`.cli`: the ``atst-train`` command and its presets;
- :mod:`.manifests`: labelled audio (CSV/TSV manifests, label folders);
- :mod:`.probe`: the ``atst-probe`` linear probe of frozen clip embeddings.

The core package never imports this one.
"""

from importlib import import_module

__all__ = ["ClipPretraining", "FramePretraining", "PretrainingData"]
_HOMES = {"PretrainingData": ".data", "ClipPretraining": ".module", "FramePretraining": ".module"}


def __getattr__(name: str):
    # Lazy, so that `atst-probe` and the manifests load without importing Lightning.
    if name in _HOMES:
        return getattr(import_module(_HOMES[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
