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
- ``threshold``: probability threshold, likewise.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor, nn

from .errors import InputError
from .events import Event, decode_events, median_filter, per_class
from .windows import FiniteCheck, Window

__all__ = ["DEFAULTS", "WINDOWS", "check_settings", "detect_events", "event_probabilities", "settings"]

WINDOWS = ("spectrogram", "audio")
DEFAULTS = {"windows": "spectrogram", "hop_seconds": 5.0, "median": 7, "threshold": 0.5}


def check_settings(detection: dict, labels: tuple[str, ...]) -> None:
    """:class:`InputError` unless ``detection`` holds only the settings above, each of its type and
    range (per-class values named by ``labels``, or ``"*"``)."""
    unknown = sorted(set(detection) - set(DEFAULTS))
    if unknown:
        raise InputError(f"unknown detection settings {unknown}; known: {sorted(DEFAULTS)}")
    if detection.get("windows", "spectrogram") not in WINDOWS:
        raise InputError(f"detection windows must be one of {WINDOWS}, got {detection['windows']!r:.40}")
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
    """The model's detection settings: its ``config.detection`` over :data:`DEFAULTS`."""
    return {**DEFAULTS, **model.config.detection}


def _hop_tokens(model, hop_seconds: float) -> int:
    """``hop_seconds`` in tokens; :class:`InputError` unless in (0, one window]."""
    tokens = int(round(hop_seconds * 1000 / model.frame_hop_ms))
    window_tokens = model.frame_window // model.config.encoder.patch_frames
    if isinstance(hop_seconds, bool) or not 0 < tokens <= window_tokens:
        raise InputError(f"hop_seconds must be in (0, {window_tokens * model.frame_hop_ms / 1000:g}], got {hop_seconds!r}")
    return tokens


def event_probabilities(model, waves: list[Tensor], hop_seconds: float | None, batch_size: int
                        ) -> tuple[list[Tensor], list[Tensor]]:
    """``(strong [T_i, C], weak [C])`` of each 16 kHz waveform (already prepared by the model): token
    probabilities averaged where windows overlap, and the head's clip-level pooling of them."""
    options = settings(model)
    hop = _hop_tokens(model, options["hop_seconds"] if hop_seconds is None else hop_seconds)
    counts = [model.num_frame_embeddings(wave.numel()) for wave in waves]
    classes = model.config.num_classes
    sums = [torch.zeros(n, classes, device=model.device) for n in counts]
    weights = [torch.zeros(n, classes, device=model.device) for n in counts]
    covered = [torch.zeros(n, 1, device=model.device) for n in counts]
    windows = _audio_windows if options["windows"] == "audio" else _spectrogram_windows
    with model._inference():
        for item, first, strong, attention in windows(model, waves, hop, batch_size):
            count = min(len(strong), counts[item] - first)
            sums[item][first : first + count] += strong[:count]
            weights[item][first : first + count] += attention[:count]
            covered[item][first : first + count] += 1
    strong = [s / c for s, c in zip(sums, covered)]
    weak = [model.head.pool(p, w / c) for p, w, c in zip(strong, weights, covered)]
    return strong, weak


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
    zero-padded), every ``hop`` tokens, with its own spectrogram and no mask."""
    width, step = model.window_samples, hop * model.config.encoder.patch_frames * model.config.frontend.hop_length
    chunks = []
    for item, wave in enumerate(waves):
        for start in range(0, wave.numel(), step):
            piece = wave[start : start + width]
            chunks.append((item, start, nn.functional.pad(piece, (0, width - piece.numel()))))
            if start + width >= wave.numel():
                break
    samples_per_token = model.config.encoder.patch_frames * model.config.frontend.hop_length
    check = FiniteCheck()
    for first in range(0, len(chunks), batch_size):
        batch = chunks[first : first + batch_size]
        mel, _ = model.frontend(torch.stack([chunk for *_, chunk in batch]))
        with model._autocast():
            output = model.encoder(mel.to(model.dtype), None, 1)
        check.add([Window(item, start, 0) for item, start, _ in batch], output)
        strong, attention = model.head.frame_outputs(output.tokens[0].float())
        for row, (item, start, _) in enumerate(batch):
            yield item, start // samples_per_token, strong[row], attention[row]
    check.refuse(len(waves), model._computes_in_float16)


def detect_events(model, waves: list[Tensor], names: list[str], *, hop_seconds: float | None = None, threshold=None,
                  median=None, min_gap: float = 0.0, min_length: float = 0.0, batch_size: int = 32) -> list[list[Event]]:
    """Events of each waveform (named ``names[i]`` in the events), with the model's post-processing
    for every setting left None: median filter, then threshold (see the module docstring)."""
    options = settings(model)
    labels = model.labels
    sizes = per_class(options["median"] if median is None else median, labels, "median").astype(int)
    threshold = options["threshold"] if threshold is None else threshold
    strong, _ = event_probabilities(model, waves, hop_seconds, batch_size)
    return [decode_events(median_filter(p.cpu().numpy(), sizes), labels, filename=name, hop=model.frame_hop_ms / 1000,
                          threshold=threshold, min_gap=min_gap, min_length=min_length)
            for p, name in zip(strong, names)]
