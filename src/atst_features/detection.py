"""Sound event detection with a model's frame-level head: probabilities per token over windows of
audio of any length, and events with the model's own post-processing.

A model's ``config.detection`` (all optional; :data:`DEFAULTS` otherwise) says how:

- ``windows``: how audio longer than one encoder window (10 s for the official models) runs.
  ``"spectrogram"``: the whole file's spectrogram is cut into windows every ``hop_seconds``, padded
  tokens masked (ours). ``"audio"``: every window is an independent clip of
  :attr:`~atst_features.model.ATSTModel.window_samples` samples with a spectrogram of its own (its
  own 80 dB floor), the last one zero-padded to the full length and run unmasked, as models
  fine-tuned on 10 s clips are run by their authors (PretrainedSED's ``inference.py``: windows every
  10 s). Either way, where windows overlap, token probabilities are averaged.
- ``hop_seconds``: seconds between window starts, a multiple of one token (40 ms), at most a window;
- ``median``: median filter length in frames, one number or ``{label: number, "*": default}``;
- ``threshold``: probability threshold, likewise;
- ``combine``: how events come from overlapping windows. ``"average"``: from the frame probabilities
  averaged over the windows, median-filtered and thresholded; ``"union"``: each window's probabilities
  median-filtered and thresholded on their own, and a frame active where any window says so (ATST-SED's
  ``inference.py``; its windows keep their place on the 64 ms grid here, where it drifts by 0.875
  frames per window). Event scores are the averaged probabilities' either way.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Iterator

import numpy as np
import torch
from torch import Tensor, nn

from .errors import InputError
from .events import Event, decode_events, median_filter, per_class
from .windows import FiniteCheck, Window, plan_windows

__all__ = ["DEFAULTS", "WINDOWS", "check_settings", "detect_events", "event_probabilities", "frame_seconds", "settings",
           "timestamps"]

WINDOWS = ("spectrogram", "audio")
DEFAULTS = {"windows": "spectrogram", "hop_seconds": 5.0, "median": 7, "threshold": 0.5, "combine": "average"}
COMBINE = ("average", "union")


def check_settings(detection: dict, labels: tuple[str, ...]) -> None:
    """:class:`InputError` unless ``detection`` holds only the settings above, each of its type and
    range (per-class values named by ``labels``, or ``"*"``)."""
    unknown = sorted(set(detection) - set(DEFAULTS))
    if unknown:
        raise InputError(f"unknown detection settings {unknown}; known: {sorted(DEFAULTS)}")
    if detection.get("windows", "spectrogram") not in WINDOWS:
        raise InputError(f"detection windows must be one of {WINDOWS}, got {detection['windows']!r:.40}")
    if detection.get("combine", "average") not in COMBINE:
        raise InputError(f"detection combine must be one of {COMBINE}, got {detection['combine']!r:.40}")
    hop = detection.get("hop_seconds", 5.0)
    if isinstance(hop, bool) or not isinstance(hop, (int, float)) or not 0 < hop <= 3600:
        raise InputError(f"detection hop_seconds must be a positive number of seconds, got {hop!r:.40}")
    for name, kind, low, high in (("median", int, 1, 10_000), ("threshold", (int, float), 0, 1)):
        value = detection.get(name, DEFAULTS[name])
        values = value.values() if isinstance(value, dict) else [value]
        if isinstance(value, dict) and (not value or not set(value) <= {*labels, "*"}):
            raise InputError(f"detection {name} per class must name some of the model's labels (or '*'), "
                             f"got {sorted(value)[:5]}")
        if not all(isinstance(v, kind) and not isinstance(v, bool) and low <= v <= high for v in values):
            raise InputError(f"detection {name} must be a number in [{low}, {high}] or {{label: number}}, got {value!r:.60}")


def settings(model) -> dict:
    """The model's detection settings: its ``config.detection`` over its kind of head's, over :data:`DEFAULTS`."""
    spec = model.head_spec
    return {**DEFAULTS, **(spec.detection if spec is not None else {}), **model.config.detection}


def _hop_tokens(model, hop_seconds: float) -> int:
    """``hop_seconds`` in tokens; :class:`InputError` unless in (0, one window]."""
    tokens = int(round(hop_seconds * 1000 / model.frame_hop_ms))
    window_tokens = model.frame_window // model.config.encoder.patch_frames
    if isinstance(hop_seconds, bool) or not 0 < tokens <= window_tokens:
        raise InputError(f"hop_seconds must be in (0, {window_tokens * model.frame_hop_ms / 1000:g}], got {hop_seconds!r}")
    return tokens


def _frame_samples(model) -> int:
    """Samples per output frame: the head's own (ATST-SED: 1024), else one token's (640)."""
    return getattr(model.head, "frame_samples", model.config.encoder.patch_frames * model.config.frontend.hop_length)


def frame_seconds(model) -> float:
    """Seconds between the head's output frames (0.04 for a frame per token)."""
    return _frame_samples(model) / model.sample_rate


def _output_frames(model, n_samples: int) -> int:
    head = model.head
    return head.n_frames(n_samples) if hasattr(head, "n_frames") else model.num_frame_embeddings(n_samples)


def timestamps(model, count: int) -> Tensor:
    """The centres of the head's first ``count`` output frames, in ms (tokens: ``40 i + 15``)."""
    samples = _frame_samples(model)
    if hasattr(model.head, "frame_offset_samples"):
        return (torch.arange(count, device=model.device, dtype=torch.float32) * samples
                + model.head.frame_offset_samples) * 1000 / model.sample_rate
    return model._timestamps(count)


def event_probabilities(model, waves: list[Tensor], hop_seconds: float | None, batch_size: int
                        ) -> tuple[list[Tensor], list[Tensor]]:
    """``(strong [T_i, C], weak [C])`` of each 16 kHz waveform (already prepared by the model): frame
    probabilities averaged where windows overlap, and the head's clip-level pooling of them."""
    strong, weak, _ = _over_windows(model, waves, hop_seconds, batch_size)
    return strong, weak


def _over_windows(model, waves: list[Tensor], hop_seconds: float | None, batch_size: int, decide=None):
    """:func:`event_probabilities`, and with ``decide`` (a window's probabilities ``[n, C]`` -> active
    frames ``[n, C]``), the frames active in any window: ``(strong, weak, decisions or None)``."""
    options = settings(model)
    hop = _hop_tokens(model, options["hop_seconds"] if hop_seconds is None else hop_seconds)
    reads_audio = getattr(model.head_spec, "reads_audio", False)
    if reads_audio and options["windows"] != "audio":
        raise InputError(f"a {model.head_spec.title} reads the audio of each window: its detection windows must be 'audio'")
    counts = [_output_frames(model, wave.numel()) for wave in waves]
    classes = model.config.num_classes
    sums = [torch.zeros(n, classes, device=model.device) for n in counts]
    weights = [torch.zeros(n, classes, device=model.device) for n in counts]
    covered = [torch.zeros(n, 1, device=model.device) for n in counts]
    decisions = [torch.zeros(n, classes, dtype=torch.bool) for n in counts] if decide is not None else None
    windows = _audio_windows if options["windows"] == "audio" else _spectrogram_windows
    with model._inference():
        for item, first, strong, attention in windows(model, waves, hop, batch_size):
            count = min(len(strong), counts[item] - first)
            sums[item][first : first + count] += strong[:count]
            weights[item][first : first + count] += attention[:count]
            covered[item][first : first + count] += 1
            if decisions is not None:
                decisions[item][first : first + count] |= decide(strong)[:count]
    strong = [s / c for s, c in zip(sums, covered)]
    weak = [model.head.pool(p, w / c) for p, w, c in zip(strong, weights, covered)]
    return strong, weak, decisions


def _spectrogram_windows(model, waves: list[Tensor], hop: int, batch_size: int) -> Iterator[tuple[int, int, Tensor, Tensor]]:
    """``(item, first token, probabilities [n, C], weights [n, C])`` of each window of the items'
    whole spectrograms, every ``hop`` tokens."""
    patch = model.config.encoder.patch_frames
    for windows, n_tokens, out in model._run_windows(waves, model.frame_window, 1, batch_size, hop=hop * patch):
        strong, attention = model.head.frame_outputs(out.tokens[0].float())
        for row, window in enumerate(windows):
            count = n_tokens[row]
            yield window.item, window.first_frame // patch, strong[row, :count], attention[row, :count]


def _audio_windows(model, waves: list[Tensor], hop: int, batch_size: int) -> Iterator[tuple[int, int, Tensor, Tensor]]:
    """The same for windows cut from the audio: each a clip of ``window_samples`` samples (the last
    zero-padded), every ``hop`` tokens, with its own spectrogram and no mask. A window's first frame is
    its start in the head's frames, rounded (ATST-SED's 64 ms frames do not divide a 3 s hop: each
    window is placed within half a frame, none drifts)."""
    width, step = model.window_samples, hop * model.config.encoder.patch_frames * model.config.frontend.hop_length
    # (item, first sample): the windows, cut batch by batch (an hour holds 1 200 windows of 3 s)
    starts = [(item, start) for item, wave in enumerate(waves) for start, _ in plan_windows(wave.numel(), width, step, 1)]
    frame = _frame_samples(model)
    reads_audio = getattr(model.head_spec, "reads_audio", False)
    check = FiniteCheck()
    for first in range(0, len(starts), batch_size):
        batch = starts[first : first + batch_size]
        audio = torch.stack([nn.functional.pad(waves[item][start : start + width],
                                               (0, max(0, start + width - waves[item].numel()))) for item, start in batch])
        mel, _ = model.frontend(audio)
        with model._autocast():
            output = model.encoder(mel.to(model.dtype), None, 1)
        check.add([Window(item, start, 0) for item, start in batch], output)
        tokens = output.tokens[0].float()
        strong, attention = model.head.frame_outputs(tokens, audio) if reads_audio else model.head.frame_outputs(tokens)
        for row, (item, start) in enumerate(batch):
            yield item, int(round(start / frame)), strong[row], attention[row]
    check.refuse(len(waves), model._computes_in_float16)


def detect_events(model, audio, names: list[str] | None = None, *, sample_rate: int | None = None,
                  hop_seconds: float | None = None, threshold=None, median=None, combine: str | None = None,
                  min_gap: float = 0.0, min_length: float = 0.0, batch_size: int = 32
                  ) -> tuple[list[list[Event]], list[np.ndarray]]:
    """Events of each clip of ``audio`` (anything the model takes; named ``names[i]`` in the events,
    default: the file's path, else ""), with the model's post-processing
    for every setting left None: median filter, then threshold, windows combined by averaging or
    union (see the module docstring); and each waveform's median-filtered averaged probabilities
    ``[T, C]``, from which the events' scores come."""
    model.require_head("frame")
    options = settings(model)
    labels = model.labels
    sizes = per_class(options["median"] if median is None else median, labels, "median").astype(int)
    threshold = options["threshold"] if threshold is None else threshold
    thresholds = per_class(threshold, labels, "threshold")
    combine = options["combine"] if combine is None else combine
    if combine not in COMBINE:
        raise InputError(f"combine must be one of {COMBINE}, got {combine!r}")
    seconds = frame_seconds(model)
    waves, _ = model._prepare(audio, sample_rate)
    if names is None:
        names = [str(audio)] if isinstance(audio, (str, os.PathLike)) else [""] * len(waves)

    def decide(strong: Tensor) -> Tensor:
        return torch.from_numpy(median_filter(strong.cpu().numpy(), sizes) >= thresholds)

    strong, _, decisions = _over_windows(model, waves, hop_seconds, batch_size, decide if combine == "union" else None)
    events, curves = [], []
    for index, (probabilities, name) in enumerate(zip(strong, names)):
        filtered = median_filter(probabilities.cpu().numpy(), sizes)
        curves.append(filtered)
        if decisions is None:
            events.append(decode_events(filtered, labels, filename=name, hop=seconds, threshold=threshold,
                                        min_gap=min_gap, min_length=min_length))
            continue
        found = decode_events(decisions[index].numpy().astype(float), labels, filename=name, hop=seconds, threshold=0.5,
                              min_gap=min_gap, min_length=min_length)
        events.append([dataclasses.replace(e, score=round(float(filtered[round(e.onset / seconds) : round(e.offset / seconds),
                                                                          labels.index(e.label)].mean()), 4))
                       for e in found])
    return events, curves
