"""Pretraining data: random crops of raw audio, decoded in DataLoader workers.

Sources: a folder of audio files (searched recursively), a manifest (one path per line, or a
CSV/TSV with a path column and an optional ``duration`` column in seconds), or WebDataset tar
shards (``data/shard-{000000..000099}.tar``; members with an audio suffix, one per sample) for
streaming at cluster scale. Each item is one random crop per entry of ``crop_seconds`` (ATST-Frame:
one 10 s crop; ATST-Clip: two independent crops), at 16 kHz; a clip shorter than a crop is
right-padded with zeros, as the reference does. Spectrograms and augmentations are computed later,
in batch, on the training device (see :mod:`atst_features.training.module`).

Folders and manifests are read in a resumable order with a seed per crop (see
:mod:`.sampling`): a resumed run trains on the crops the interrupted one would have. Shards are an
endless random stream: a resumed run draws new crops (not the interrupted run's). Unreadable files
are skipped and counted (:meth:`PretrainingData.unreadable_files`).
"""

from __future__ import annotations

import io
import random
import warnings
from pathlib import Path

import lightning as L
import soundfile
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset

from ..audio import SAMPLE_RATE, load_audio
from ..errors import AudioDecodeError, EmptyAudioError, InputError
from ..inputs import AUDIO_SUFFIXES, read_manifest, scan_folder
from .sampling import resumable_loader

__all__ = ["AudioCrops", "ShardCrops", "PretrainingData", "SAMPLE_RATE"]

SUBSET_SEED = 1234  # the reference shuffles its key list with this seed before taking a subset


def _fit(waveform: Tensor, samples: int) -> Tensor:
    """Right-pad with zeros (or cut) to exactly ``samples``."""
    if len(waveform) >= samples:
        return waveform[:samples]
    return torch.nn.functional.pad(waveform, (0, samples - len(waveform)))


def _random_crop(waveform: Tensor, samples: int) -> Tensor:
    if len(waveform) <= samples:
        return _fit(waveform, samples)
    start = int(torch.randint(len(waveform) - samples + 1, ()).item())
    return waveform[start : start + samples]


class _SkipCount:
    """Files skipped as unreadable, counted across DataLoader worker processes: one slot of a
    shared-memory tensor per worker (slot 0: the main process)."""

    SLOTS = 257

    def __init__(self) -> None:
        self.counts = torch.zeros(self.SLOTS, dtype=torch.int64).share_memory_()

    def add(self) -> None:
        worker = torch.utils.data.get_worker_info()
        self.counts[0 if worker is None else 1 + worker.id % (self.SLOTS - 1)] += 1

    def total(self) -> int:
        return int(self.counts.sum())


class AudioCrops(Dataset):
    """Random crops from a list of audio files; only the cropped segments are decoded. An item is
    ``dataset[index]`` (offsets from torch's global generator) or ``dataset[index, seed]`` (from
    ``seed``: see :class:`~.sampling.ResumableSampler`)."""

    def __init__(self, files: list[tuple[Path, float | None]], crop_seconds: list[float]) -> None:
        if not files:
            raise InputError("no audio files to train on")
        self.files = files
        self.crop_seconds = list(crop_seconds)
        self.skipped = _SkipCount()
        self._warned = 0

    def __len__(self) -> int:
        return len(self.files)

    def _crop(self, path: Path, duration: float | None, seconds: float, generator: torch.Generator | None) -> Tensor:
        samples = int(seconds * SAMPLE_RATE)
        if duration is None:
            duration = soundfile.info(str(path)).duration
        if duration <= seconds:
            waveform, _ = load_audio(path, SAMPLE_RATE)
            return _fit(torch.from_numpy(waveform), samples)
        offset = float(torch.rand((), generator=generator).item()) * (duration - seconds)
        waveform, _ = load_audio(path, SAMPLE_RATE, offset=offset, duration=seconds)
        return _fit(torch.from_numpy(waveform), samples)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Tensor, ...]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        for attempt in range(len(self.files)):  # a broken file is skipped, with a warning, not fatal
            path, duration = self.files[(index + attempt) % len(self.files)]
            try:
                return tuple(self._crop(path, duration, seconds, generator) for seconds in self.crop_seconds)
            except (AudioDecodeError, EmptyAudioError, soundfile.LibsndfileError, RuntimeError) as error:
                self.skipped.add()
                if self._warned < 20:
                    warnings.warn(f"skipping unreadable training file: {error}", stacklevel=2)
                    self._warned += 1
        raise InputError("no readable audio file in the training set (see the warnings above)")


class ShardCrops(IterableDataset):
    """Random crops from WebDataset tar shards, sampled with replacement (an endless stream; train
    with ``max_steps``), split across nodes and workers, shuffled in a buffer."""

    def __init__(self, urls: str, crop_seconds: list[float], shuffle_buffer: int = 1000) -> None:
        self.urls = urls
        self.crop_seconds = list(crop_seconds)
        self.shuffle_buffer = shuffle_buffer
        self.skipped = _SkipCount()

    def _crops(self, sample: dict) -> tuple[Tensor, ...] | None:
        for key, value in sample.items():
            if "." + key.lower().rsplit(".", 1)[-1] in AUDIO_SUFFIXES and isinstance(value, bytes):
                try:
                    waveform, _ = load_audio(io.BytesIO(value), SAMPLE_RATE)
                except (AudioDecodeError, EmptyAudioError) as error:
                    self.skipped.add()
                    warnings.warn(f"skipping {sample.get('__key__')}: {error}", stacklevel=2)
                    return None
                waveform = torch.from_numpy(waveform)
                return tuple(_random_crop(waveform, int(seconds * SAMPLE_RATE)) for seconds in self.crop_seconds)
        return None

    def __iter__(self):
        import webdataset as wds

        pipeline = wds.DataPipeline(
            wds.ResampledShards(self.urls),
            wds.tarfile_to_samples(handler=wds.warn_and_continue),
            wds.shuffle(self.shuffle_buffer),
            wds.map(self._crops),
            wds.select(lambda crops: crops is not None),
        )
        return iter(pipeline)


class PretrainingData(L.LightningDataModule):
    """Training crops for ATST pretraining.

    ``path``: a folder, a manifest file (.txt/.csv/.tsv) or WebDataset shards (``*.tar``, brace
    patterns allowed). ``crop_seconds``: one entry per view source, e.g. ``[10.0]`` (ATST-Frame) or
    ``[train_len, 6.0]`` (ATST-Clip). ``batch_size``: per device. ``subset``: train on this many
    files, chosen as the reference does (shuffled with seed 1234); folders and manifests only.
    ``seed``: of the order of each epoch and of the crops (``atst-train`` sets it from ``seed_everything``).
    """

    def __init__(
        self,
        path: str,
        crop_seconds: list[float] = [10.0],  # noqa: B006 - read only; a list for the CLI
        batch_size: int = 64,
        num_workers: int = 8,
        subset: int | None = None,
        shuffle_buffer: int = 1000,
        pin_memory: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.path = path
        self.crop_seconds = list(crop_seconds)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.subset = subset
        self.shuffle_buffer = shuffle_buffer
        self.pin_memory = pin_memory
        self.seed = seed
        self.dataset: Dataset | None = None

    @property
    def is_sharded(self) -> bool:
        return self.path.endswith(".tar") or "{" in self.path

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is not None:
            return
        if self.is_sharded:
            self.dataset = ShardCrops(self.path, self.crop_seconds, self.shuffle_buffer)
            return
        path = Path(self.path)
        if path.is_dir():
            files = [(item.path, None) for item in scan_folder(path)]
        elif path.is_file():
            files = read_manifest(path)
        else:
            raise InputError(f"{self.path!r}: no such folder, manifest or shard pattern")
        if self.subset is not None and self.subset < len(files):
            files = list(files)
            random.Random(SUBSET_SEED).shuffle(files)
            files = files[: self.subset]
        self.dataset = AudioCrops(files, self.crop_seconds)

    def unreadable_files(self) -> int:
        """Files skipped as unreadable so far in this process's training data (all its workers)."""
        return self.dataset.skipped.total() if self.dataset is not None else 0

    def train_dataloader(self) -> DataLoader:
        self.setup()
        options = dict(
            batch_size=self.batch_size, num_workers=self.num_workers, drop_last=True,
            pin_memory=self.pin_memory and torch.cuda.is_available(), persistent_workers=self.num_workers > 0,
            generator=torch.Generator().manual_seed(self.seed),  # worker seeds: not from the global generator
        )
        if self.is_sharded:
            return DataLoader(self.dataset, **options)
        return resumable_loader(self.dataset, self.trainer, seed=self.seed, draw_seeds=True, **options)
