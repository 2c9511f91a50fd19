"""Frame-level sound event detection (the paper's DESED and AudioSet-strong protocols, section 7.3).

Data (:class:`EventData`): an audio folder with a strong-label TSV in the DESED format
(``filename onset offset event_label``) and/or a weak-label TSV (``filename event_labels``, labels
separated by commas), read by :mod:`atst_features.events`. Each clip gives its first
``clip_seconds`` (10 s, one encoder window; a warning line says how many clips are longer); a strong
clip gets per-token targets (a token, 40 ms for the official models, is active when an event covers
at least half of it, or lies within it), computed from the model's own token spacing, a weak clip
clip-level targets.

Model (:class:`SoundEventDetection`): the last block's frame tokens into an
:class:`~atst_features.heads.EventHead` (strong: per-token sigmoid; weak: attention pooling). Loss:
BCE of the strong output on strongly labelled clips plus BCE of the weak output on weakly labelled
ones. ``mode``: ``freeze`` trains the head only, ``last`` the last block, the final norm and the head
(the reference's DESED "fine-tune"), ``full`` everything with layer-wise learning-rate decay
(its AudioSet-strong recipe). ``teacher``: an event model (e.g. ATST-Clip fine-tuned the same way)
whose strong and weak outputs the student also fits, the C2F frame-level loss of section 6.4:
``0.5 * supervised + 0.5 * (BCE(strong_s, strong_t) + BCE(weak_s, weak_t)) / 2``.
"""

from __future__ import annotations

import random
from pathlib import Path

import lightning as L
import numpy as np
import soundfile
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ..audio import SAMPLE_RATE, load_audio
from ..errors import InputError
from ..events import read_strong_labels, read_weak_labels
from .progress import say
from .sampling import resumable_loader
from .supervised import SupervisedTraining, layerwise_groups, model_from_source

__all__ = ["EventData", "SoundEventDetection", "event_targets", "frame_targets", "weak_targets"]

MODES = ("freeze", "last", "full")


def event_targets(clips: list[list[tuple[float, float, str]] | None], index: dict[str, int], n_tokens: int,
                  hop: float) -> Tensor:
    """``[B, n_tokens, C]`` 0/1 targets of each clip's ``(onset, offset, label)`` events (None: no strong
    labels), every event of the batch at once: token ``i`` covers ``[hop i, hop (i + 1))`` s (``hop``:
    the model's token spacing in seconds) and is active for an event covering at least half of it,
    or lying inside it."""
    targets = torch.zeros(len(clips), n_tokens, len(index))
    rows = [(row, onset, offset, index[label]) for row, events in enumerate(clips) for onset, offset, label in events or ()]
    if not rows:
        return targets
    row, onset, offset, label = torch.tensor(rows, dtype=torch.float64).T
    starts = torch.arange(n_tokens, dtype=torch.float64) * hop
    overlap = torch.minimum(starts + hop, offset[:, None]) - torch.maximum(starts, onset[:, None])  # [events, tokens]
    inside = (starts <= onset[:, None]) & (offset[:, None] <= starts + hop) & (offset > onset)[:, None]
    event, token = ((overlap >= hop / 2 - 1e-9) | inside).nonzero(as_tuple=True)
    targets[row[event].long(), token, label[event].long()] = 1.0
    return targets


def frame_targets(events: list[tuple[float, float, str]], index: dict[str, int], n_tokens: int, hop: float) -> Tensor:
    """``[n_tokens, C]``: :func:`event_targets` of one clip."""
    return event_targets([events], index, n_tokens, hop)[0]


def weak_targets(clips: list[list[str] | None], index: dict[str, int]) -> Tensor:
    """``[B, C]`` multi-hot targets of each clip's labels (None: no weak labels, all 0)."""
    targets = torch.zeros(len(clips), len(index))
    for row, labels in enumerate(clips):
        targets[row, [index[label] for label in labels or ()]] = 1.0
    return targets


class _EventClips(Dataset):
    """``(waveform [N], strong events as (onset, offset, label) or None, weak labels or None)`` per clip."""

    def __init__(self, root: Path, clips: list[tuple[str, list | None, list | None]], clip_seconds: float) -> None:
        self.root, self.clips = root, clips
        self.samples = int(round(clip_seconds * SAMPLE_RATE))

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, item: int):
        name, strong, weak = self.clips[item]
        waveform, _ = load_audio(self.root / name, SAMPLE_RATE)
        waveform = torch.from_numpy(np.ascontiguousarray(waveform[: self.samples]))
        events = None if strong is None else [(event.onset, event.offset, event.label) for event in strong]
        return waveform, events, weak


def _seconds(path: Path) -> float:
    """The duration in a file's header; 0 for an unreadable one (the loader reports it when it decodes it)."""
    try:
        return soundfile.info(str(path)).duration
    except (RuntimeError, OSError):
        return 0.0


def _collate(batch):
    """``(waveforms [B, N], n_samples [B], strong events per clip, weak labels per clip)``: the module
    makes the targets, on the model's tokens and in the order of its labels (:func:`event_targets`)."""
    waves, strong, weak = zip(*batch)
    return (torch.nn.utils.rnn.pad_sequence(list(waves), batch_first=True), torch.tensor([len(w) for w in waves]),
            list(strong), list(weak))


class EventData(L.LightningDataModule):
    """Strongly and/or weakly labelled clips of ``audio`` for ``atst-train sed``.

    ``strong`` / ``weak``: TSV files (see the module docstring); filenames are relative to
    ``audio``. ``valid_strong`` / ``valid_weak``: validation files; without them ``valid_share`` of
    the clips are held out (seeded). Labels are sorted by name. ``batch_size`` is per device.
    """

    def __init__(
        self,
        audio: str,
        strong: str | None = None,
        weak: str | None = None,
        valid_strong: str | None = None,
        valid_weak: str | None = None,
        clip_seconds: float = 10.0,
        valid_share: float = 0.15,
        batch_size: int = 32,
        num_workers: int = 4,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if strong is None and weak is None:
            raise InputError("give --data.strong (onsets and offsets) and/or --data.weak (clip labels)")
        if not 0 < clip_seconds <= 10.0:
            raise InputError(f"clip_seconds must be in (0, 10] (one encoder window), got {clip_seconds}")
        self.root = Path(audio)
        if not self.root.is_dir():
            raise InputError(f"{audio!r}: no such audio folder")
        self.clip_seconds, self.batch_size, self.num_workers, self.seed = clip_seconds, batch_size, num_workers, seed
        train = self._clips(strong, weak)
        if valid_strong or valid_weak:
            valid = self._clips(valid_strong, valid_weak)
        else:
            shuffled = sorted(train)
            random.Random(seed).shuffle(shuffled)
            held = max(1, round(len(shuffled) * valid_share))
            valid, train = shuffled[:held], shuffled[held:]
        labels = {label for _, s, w in train + valid for label in ([e.label for e in s] if s else []) + (w or [])}
        self.label_names: list[str] = sorted(labels)
        self.multi_label = True
        self.splits = {"train": train, "valid": valid}
        self.split_description = ("--data.valid_strong / --data.valid_weak" if valid_strong or valid_weak
                                  else f"valid: {valid_share:.0%} of the clips, seed {seed}")
        self._say_crops(train + valid)

    def _say_crops(self, clips: list[tuple[str, list | None, list | None]]) -> None:
        """One line when clips last longer than ``clip_seconds``: only their first ``clip_seconds`` are used."""
        longer = sum(_seconds(self.root / name) > self.clip_seconds + 1e-3 for name, _, _ in clips)
        if not longer:
            return
        late = sum(event.onset >= self.clip_seconds for _, strong, _ in clips for event in strong or ())
        seconds = f"{self.clip_seconds:g} s"
        say(f"warning: {longer} of {len(clips)} clips last longer than {seconds} (--data.clip_seconds, at most 10: one "
            f"encoder window); only their first {seconds} are used"
            + (f": {late} strong events that start later are left out" if late else ""))

    def _clips(self, strong: str | None, weak: str | None) -> list[tuple[str, list | None, list | None]]:
        strong_labels = read_strong_labels(strong) if strong else {}
        weak_labels = read_weak_labels(weak) if weak else {}
        clips = []
        for name in sorted(set(strong_labels) | set(weak_labels)):
            if not (self.root / name).is_file():
                source = strong if name in strong_labels else weak
                raise InputError(f"{source!r}: no audio file {str(self.root / name)!r}; filenames are relative to --data.audio")
            clips.append((name, strong_labels.get(name), weak_labels.get(name)))
        return clips

    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        dataset = _EventClips(self.root, self.splits[name], self.clip_seconds)
        options = dict(batch_size=self.batch_size, num_workers=self.num_workers, collate_fn=_collate,
                       persistent_workers=self.num_workers > 0,
                       generator=torch.Generator().manual_seed(self.seed))  # worker seeds: not from the global generator
        if not shuffle:
            return DataLoader(dataset, **options)
        return resumable_loader(dataset, self.trainer, seed=self.seed, **options)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("valid", shuffle=False)


def probability_bce(probabilities: Tensor, targets: Tensor) -> Tensor:
    """``F.binary_cross_entropy``, except that NaN probabilities give a NaN loss instead of an error, so
    that a bad batch is skipped (:class:`~.guards.FiniteSteps`) rather than ending the run. For finite
    probabilities the loss and its gradients are ``F.binary_cross_entropy``'s exactly (plus 0)."""
    return F.binary_cross_entropy(probabilities.nan_to_num(0.5), targets) + 0.0 * probabilities.sum()


def _macro_f1(predicted: Tensor, target: Tensor) -> float:
    """Macro F1 over the classes with a positive target or prediction (``[N, C]`` booleans)."""
    tp = (predicted & target).sum(0).double()
    fp = (predicted & ~target).sum(0).double()
    fn = (~predicted & target).sum(0).double()
    present = (tp + fp + fn) > 0
    if not bool(present.any()):
        return float("nan")
    return float((2 * tp / (2 * tp + fp + fn))[present].mean())


class SoundEventDetection(SupervisedTraining):
    """An ATST encoder from ``init`` with a new :class:`~atst_features.heads.EventHead` for
    ``labels``; see the module docstring for ``mode`` and ``teacher``. ``learning_rate`` is per 256
    clips; ``layer_decay`` applies in ``full`` mode. ``head_norm``: standardise the head's input
    (not in the reference; see :class:`~atst_features.heads.EventHead`)."""

    def __init__(
        self,
        init: str,
        labels: list[str] | None = None,
        mode: str = "last",
        learning_rate: float = 0.1,
        max_epochs: int = 100,
        warmup_epochs: int = 5,
        layer_decay: float = 0.75,
        drop_path_rate: float = 0.1,
        teacher: str | None = None,
        head_norm: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not labels:
            raise InputError("SoundEventDetection needs the label names (atst-train sed takes them from the TSV files)")
        if mode not in MODES:
            raise InputError(f"mode must be one of {MODES}, got {mode!r}")
        self.save_hyperparameters()
        self.model = model_from_source(init, labels, multi_label=True, head_type="events", drop_path_rate=drop_path_rate,
                                       head_norm=head_norm)
        encoder = self.model.encoder
        if mode != "full":
            encoder.requires_grad_(False)
            if mode == "last":
                encoder.blocks[-1].requires_grad_(True)
                encoder.norm.requires_grad_(True)
        self.teacher = None
        if teacher is not None:
            from ..loading import load_model

            self.teacher = load_model(teacher, device="cpu")
            self.teacher.require_head("frame", f"the teacher {teacher!r}")
            if list(self.teacher.labels) != list(labels):
                raise InputError(f"{teacher!r}: the teacher must be an event model with the labels {list(labels)}")
            self.teacher.requires_grad_(False)
        self._outputs: list = []

    def parameter_groups(self) -> list[dict]:
        if self.hparams.mode != "full":  # no decay: only the last block, the norm and the head train
            return layerwise_groups(self.model, 1.0)
        return super().parameter_groups()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # the reference's frame-level teacher runs in eval mode, under no_grad
        return self

    def outputs(self, model, mel: Tensor, n_frames: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(strong [B, T, C], weak [B, C], n_tokens [B])`` of one encoder window (at most 10 s)."""
        n_tokens = (n_frames // model.config.encoder.patch_frames).clamp(min=1)
        tokens = model.encoder(mel[..., : model.frame_window], n_tokens, 1).tokens[0].float()
        strong, weak = model.head(tokens, n_tokens)
        return strong, weak, n_tokens

    @staticmethod
    def _token_mask(n_tokens: Tensor, width: int) -> Tensor:
        return torch.arange(width, device=n_tokens.device)[None, :] < n_tokens[:, None]

    def _labelled(self, strong, weak, n_tokens, batch) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The labelled parts of a batch: ``(strong outputs, strong targets)`` over the valid tokens of
        strongly labelled clips, ``(weak outputs, weak targets)`` of weakly labelled ones. Strong
        targets come from each clip's events on the model's own tokens; both follow the model's labels."""
        _, _, events, labels = batch
        index = {label: i for i, label in enumerate(self.hparams.labels)}
        width = strong.shape[1]
        strong_targets = event_targets(events, index, width, self.model.frame_hop_ms / 1000).to(strong.device)
        is_strong = torch.tensor([clip is not None for clip in events], device=strong.device)
        is_weak = torch.tensor([clip is not None for clip in labels], device=strong.device)
        valid = self._token_mask(n_tokens, width) & is_strong[:, None]
        return strong[valid], strong_targets[valid], weak[is_weak], weak_targets(labels, index).to(weak.device)[is_weak]

    @staticmethod
    def _supervised(strong, strong_targets, weak, weak_targets) -> Tensor:
        """BCE of the strong outputs plus BCE of the weak outputs (each when the batch has some)."""
        loss = strong.new_zeros(())
        for outputs, targets in ((strong, strong_targets), (weak, weak_targets)):
            if len(outputs):
                loss = loss + probability_bce(outputs, targets)
        return loss

    def _forward(self, batch):
        """``(mel, n_frames, strong, weak, n_tokens)`` of a batch through the model."""
        mel, n_frames = self.spectrograms(batch[0], batch[1])
        return (mel, n_frames, *self.outputs(self.model, mel, n_frames))

    def _frozen_parts_in_eval_mode(self) -> None:
        """As the reference's DESED training step (``encoder.eval()``, then the trained parts back to
        training): in ``freeze`` and ``last`` mode the encoder parts that do not train run in eval mode,
        without DropPath, so they compute the features they will give at inference. With a teacher the
        whole student trains in training mode, as the reference's C2F module does."""
        if self.teacher is not None or self.hparams.mode == "full":
            return
        encoder = self.model.encoder
        encoder.eval()
        if self.hparams.mode == "last":
            encoder.blocks[-1].train()
            encoder.norm.train()

    def training_step(self, batch, batch_idx: int) -> Tensor:
        self._frozen_parts_in_eval_mode()
        lr = self.update_learning_rate()
        mel, n_frames, strong, weak, n_tokens = self._forward(batch)
        loss = self._supervised(*self._labelled(strong, weak, n_tokens, batch))
        if self.teacher is not None:
            with torch.no_grad():
                teacher_strong, teacher_weak, _ = self.outputs(self.teacher, mel, n_frames)
            valid = self._token_mask(n_tokens, strong.shape[1])
            distill = (probability_bce(strong[valid], teacher_strong[valid]) + probability_bce(weak, teacher_weak)) / 2
            loss = 0.5 * loss + 0.5 * distill
        self.log_dict({"loss": loss, "lr": lr}, prog_bar=True, batch_size=len(batch[0]))
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        _, _, strong, weak, n_tokens = self._forward(batch)
        labelled = self._labelled(strong, weak, n_tokens, batch)
        self.log("valid_loss", self._supervised(*labelled), batch_size=len(batch[0]), sync_dist=True)
        self._outputs.append(tuple(t.cpu() for t in labelled))

    def on_validation_epoch_end(self) -> None:
        outputs, self._outputs = self._outputs, []
        if not outputs:
            return
        strong, strong_targets, weak, weak_targets = (torch.cat([o[i] for o in outputs]) for i in range(4))
        scores = {}
        if len(strong):
            scores["valid_frame_f1"] = _macro_f1(strong >= 0.5, strong_targets > 0.5)
        if len(weak):
            scores["valid_weak_f1"] = _macro_f1(weak >= 0.5, weak_targets > 0.5)
        values = [v for v in scores.values() if not np.isnan(v)]
        scores["valid_score"] = float(np.mean(values)) if values else 0.0
        self.log_dict(scores, prog_bar=True)
