"""Labelled audio for fine-tuning: a centre crop of each clip, its target, batched with lengths.

:class:`LabelledData` reads a manifest (or label folders, see :mod:`.manifests`) and serves
train / valid / test loaders of ``(waveforms [B, N] zero-padded, n_samples [B], targets)``;
targets are class indices ``[B]`` (single-label) or multi-hot ``[B, C]`` (multi-label). Clips
longer than ``crop_seconds`` are centre-cropped (the reference's 12 s ``FinetuneTrainTransform``,
for training and evaluation alike); shorter ones are kept whole, not padded.
"""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ..audio import SAMPLE_RATE, centre_crop, load_audio
from ..errors import InputError
from .manifests import LabelledItem, LabelledSet, groups_note, read_labelled, split_items
from .sampling import label_balanced_weights, resumable_loader

__all__ = ["LabelledClips", "LabelledData", "collate_clips"]

SAMPLINGS = ("shuffle", "balanced")


class LabelledClips(Dataset):
    """``(waveform [N] float32, target)`` per item, decoded at 16 kHz and centre-cropped."""

    def __init__(self, items: list[LabelledItem], targets: Tensor, crop_seconds: float) -> None:
        self.items = items
        self.targets = targets
        self.samples = int(round(crop_seconds * SAMPLE_RATE))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        path = self.items[index].path
        waveform, _ = load_audio(path, SAMPLE_RATE)
        return torch.from_numpy(np.ascontiguousarray(centre_crop(waveform, self.samples))), self.targets[index]


def collate_clips(batch: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor, Tensor]:
    """``(waveforms [B, N_max] zero-padded, n_samples [B], targets [B] or [B, C])``."""
    waves, targets = zip(*batch)
    lengths = torch.tensor([len(w) for w in waves])
    return torch.nn.utils.rnn.pad_sequence(list(waves), batch_first=True), lengths, torch.stack(list(targets))


class LabelledData(L.LightningDataModule):
    """Train / valid / test clips of a labelled manifest for ``atst-train finetune``.

    ``manifest``: a CSV/TSV (``path``, ``label`` or ``labels``, optional ``split`` and ``group``) or
    a folder of label folders. ``valid_manifest`` / ``test_manifest``: separate files for those
    splits (their labels must occur in ``manifest``). Without a split column or files, whole groups
    are held out: ``test_share`` for test, then ``valid_share`` of the rest for validation
    (seeded by ``seed``). ``batch_size`` is per device. ``sampling``: ``"shuffle"`` (each training clip
    once per epoch) or ``"balanced"`` (as many draws, with replacement, weighted so that rare labels
    come up about as often as common ones: the reference's AudioSet sampler, see :mod:`.sampling`).
    """

    def __init__(
        self,
        manifest: str,
        valid_manifest: str | None = None,
        test_manifest: str | None = None,
        crop_seconds: float = 12.0,
        batch_size: int = 128,
        num_workers: int = 4,
        test_share: float = 0.3,
        valid_share: float = 0.15,
        seed: int = 0,
        sampling: str = "shuffle",
    ) -> None:
        super().__init__()
        if sampling not in SAMPLINGS:
            raise InputError(f"--data.sampling {sampling!r}: use one of {', '.join(SAMPLINGS)}")
        self.sampling = sampling
        self.seed = seed
        self.crop_seconds = crop_seconds
        self.batch_size = batch_size
        self.num_workers = num_workers
        data = read_labelled(manifest)
        extra = {name: (path, read_labelled(path)) for name, path in (("valid", valid_manifest), ("test", test_manifest)) if path}
        splits, self.split_description = split_items(
            data, seed=seed, test_share=0.0 if "test" in extra else test_share,
            valid_share=0.0 if "valid" in extra else valid_share,
        )
        for name, (path, other) in extra.items():
            unknown = sorted(set(other.label_names) - set(data.label_names))
            if unknown:
                raise InputError(f"{path!r}: labels {unknown[:5]} do not occur in {manifest!r}; every class needs training clips")
            if other.multi_label != data.multi_label:
                raise InputError(f"{manifest!r} and its {name} manifest disagree on 'label' / 'labels' (single / multi-label)")
            splits[name] = list(other.items)
        self.split_description += f"; {groups_note(data)}"
        self.data: LabelledSet = data
        self.splits = splits
        self.label_names: list[str] = list(data.label_names)
        self.multi_label: bool = data.multi_label

    def _dataset(self, name: str) -> LabelledClips:
        items = self.splits[name]
        return LabelledClips(items, self.data.targets(items), self.crop_seconds)

    def _loader(self, name: str, shuffle: bool, balanced: bool = False) -> DataLoader:
        if not self.splits[name]:
            raise InputError(f"no {name} clips: give a {name} split in the manifest or a --data.{name}_manifest")
        dataset = self._dataset(name)
        options = dict(batch_size=self.batch_size, num_workers=self.num_workers, collate_fn=collate_clips, drop_last=False,
                       persistent_workers=self.num_workers > 0,
                       generator=torch.Generator().manual_seed(self.seed))  # worker seeds: not from the global generator
        if not shuffle:
            return DataLoader(dataset, shuffle=False, **options)
        # balanced: as many draws as clips, weighted so that rare labels come up about as often as common ones
        weights = label_balanced_weights(dataset.targets) if balanced else None
        return resumable_loader(dataset, self.trainer, seed=self.seed, weights=weights, **options)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True, balanced=self.sampling == "balanced")

    def val_dataloader(self) -> DataLoader:
        return self._loader("valid", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

