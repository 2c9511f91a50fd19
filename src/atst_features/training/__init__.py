"""Self-supervised pretraining of ATST-Clip and ATST-Frame (install with ``pip install atst-features[train]``).

- :mod:`.data`: crops of raw audio from folders, manifests or WebDataset shards;
- :mod:`.augment`: Mixup, RandomResizeCrop and span masks, batched on the device;
- :mod:`.objective`: heads, BYOL loss, EMA teacher, schedules, parameter groups;
- :mod:`.module`: the LightningModules :class:`ClipPretraining` and :class:`FramePretraining`;
- :mod:`.cli`: the ``atst-train`` command and its presets.

The core package never imports this one.
"""

from .data import PretrainingData
from .module import ClipPretraining, FramePretraining

__all__ = ["ClipPretraining", "FramePretraining", "PretrainingData"]
