"""Pictures of what a detector hears in a clip: its spectrogram, the event probabilities of the classes
that matter and the events found (``atst-detect --plot`` draws the same). Needs matplotlib."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .errors import InputError

__all__ = ["MAX_PLOTTED_CLASSES", "plot_events"]

MAX_PLOTTED_CLASSES = 10  # an AudioSet detector has hundreds: a legend of them all is unreadable


def _classes_to_draw(probabilities: np.ndarray, events, labels: list[str]) -> list[int]:
    """Class indices: those with events first (by first onset), then the most probable ones, up to
    :data:`MAX_PLOTTED_CLASSES` (all of a model with that many or fewer), in the model's order."""
    if len(labels) <= MAX_PLOTTED_CLASSES:
        return list(range(len(labels)))
    chosen = list(dict.fromkeys(labels.index(e.label) for e in sorted(events, key=lambda e: e.onset)))
    peaks = probabilities.max(axis=0) if len(probabilities) else np.zeros(len(labels))
    for index in np.argsort(-peaks, kind="stable"):
        if len(chosen) >= MAX_PLOTTED_CLASSES:
            break
        if index not in chosen:
            chosen.append(int(index))
    return sorted(chosen[:MAX_PLOTTED_CLASSES])


def plot_events(model, audio, path: str | os.PathLike, *, sample_rate: int | None = None, title: str | None = None,
                events=None, probabilities: np.ndarray | None = None, **settings) -> list[str]:
    """Save a PNG of one clip at ``path``: the model's log-mel spectrogram, the (median-filtered)
    probabilities ``[T, C]`` of the classes with events and then the most probable ones (at most
    :data:`MAX_PLOTTED_CLASSES`), and the events as bars. ``audio``: a file or one waveform;
    ``events`` and ``probabilities``: already computed, else :func:`~atst_features.detection.detect_events`
    runs with ``settings`` (threshold, median, ...). Returns the labels drawn."""
    from .detection import detect_events, frame_seconds

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("plotting needs matplotlib: pip install matplotlib") from None
    if events is None or probabilities is None:
        (events,), (probabilities,) = detect_events(model, audio, sample_rate=sample_rate, **settings)
    waves, _ = model._prepare(audio, sample_rate)
    if len(waves) != 1:
        raise InputError(f"plot_events draws one clip, got {len(waves)}")
    wave = waves[0]
    if title is None:
        title = str(audio) if isinstance(audio, (str, os.PathLike)) else ""
    labels = list(model.labels)
    drawn = _classes_to_draw(probabilities, events, labels)
    with torch.inference_mode():
        mel, _ = model.frontend(wave[None])
    seconds = wave.numel() / model.sample_rate
    figure, axes = plt.subplots(3, 1, figsize=(10, 6.5), sharex=True, gridspec_kw={"height_ratios": [2, 2, 1.2]})
    axes[0].imshow(mel[0].cpu().numpy(), origin="lower", aspect="auto", extent=(0, seconds, 0, mel.shape[1]), cmap="magma")
    axes[0].set(ylabel="mel bin", title=title)
    times = (np.arange(len(probabilities)) + 0.5) * frame_seconds(model)
    for row, index in enumerate(drawn):
        axes[1].plot(times, probabilities[:, index], label=labels[index], linewidth=1.2, color=f"C{row % 10}")
    shown = "" if len(drawn) == len(labels) else f" ({len(drawn)} of {len(labels)} classes)"
    axes[1].set(ylabel="probability" + shown, ylim=(0, 1))
    axes[1].legend(loc="upper right", fontsize=7, ncol=min(len(drawn), 4))
    for event in events:
        if labels.index(event.label) in drawn:
            row = drawn.index(labels.index(event.label))
            axes[2].barh(row, event.offset - event.onset, left=event.onset, color=f"C{row % 10}", height=0.7)
    axes[2].set(yticks=range(len(drawn)), yticklabels=[labels[i] for i in drawn], xlabel="time (s)", xlim=(0, seconds),
                ylim=(-0.6, len(drawn) - 0.4))
    figure.tight_layout()
    figure.savefig(Path(path), dpi=110)
    plt.close(figure)
    return [labels[i] for i in drawn]
