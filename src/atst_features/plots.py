"""Pictures of what a detector hears in a clip: its spectrogram, the event probabilities of the classes
that matter, the events found and, if given, the reference events (``atst-detect --plot [--reference]``
draws the same). Needs matplotlib."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .errors import InputError
from .events import per_class

__all__ = ["MAX_PLOTTED_CLASSES", "check_reference", "plot_events"]

MAX_PLOTTED_CLASSES = 10  # an AudioSet detector has hundreds: a legend of them all is unreadable


def _classes_to_draw(probabilities: np.ndarray, events, labels: list[str]) -> list[int]:
    """Class indices, in the model's order: every class with events (detected or reference ones), then
    the most probable ones up to :data:`MAX_PLOTTED_CLASSES` (all of a model with that many or fewer)."""
    if len(labels) <= MAX_PLOTTED_CLASSES:
        return list(range(len(labels)))
    chosen = list(dict.fromkeys(labels.index(e.label) for e in events))
    peaks = probabilities.max(axis=0) if len(probabilities) else np.zeros(len(labels))
    for index in np.argsort(-peaks, kind="stable"):
        if len(chosen) >= MAX_PLOTTED_CLASSES:
            break
        if index not in chosen:
            chosen.append(int(index))
    return sorted(chosen)


def check_reference(reference, labels) -> None:
    """:class:`InputError` unless every label of the ``reference`` events is one of ``labels`` (the model's);
    the message names the others and close matches."""
    per_class({**dict.fromkeys({e.label for e in reference}, 0.0), "*": 0.0}, labels, "reference")


def _colours(count: int) -> list:
    """``count`` distinct colours: matplotlib's default ten (tab10), then their light variants (tab20),
    then, for more than 20, evenly spaced along the perceptual colormap turbo."""
    from matplotlib import colormaps

    if count > 20:
        return [colormaps["turbo"](index / (count - 1)) for index in range(count)]
    pairs = colormaps["tab20"].colors  # (tab10 colour, its light variant) * 10
    return list(pairs[0::2] + pairs[1::2])[:count]


def plot_events(model, audio, path: str | os.PathLike, *, sample_rate: int | None = None, title: str | None = None,
                events=None, probabilities: np.ndarray | None = None, reference=None, **settings) -> list[str]:
    """Save a PNG of one clip at ``path``: the model's log-mel spectrogram, the (median-filtered)
    probabilities ``[T, C]`` of the classes with events and then the most probable ones (up to
    :data:`MAX_PLOTTED_CLASSES`), each in its own colour, and the events as bars. ``audio``: a file or
    one waveform; ``events`` and ``probabilities``: already computed, else
    :func:`~atst_features.detection.detect_events` runs with ``settings`` (threshold, median, ...).
    ``reference``: the clip's reference events (:class:`~atst_features.events.Event`, labels of the
    model), drawn hatched under the detected ones. Returns the labels drawn."""
    from .detection import detect_events, frame_seconds

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("plotting needs matplotlib: pip install matplotlib") from None
    waves, _ = model._prepare(audio, sample_rate)  # decoded once, for the detection and the spectrogram
    if len(waves) != 1:
        raise InputError(f"plot_events draws one clip, got {len(waves)}")
    wave = waves[0]
    if events is None or probabilities is None:
        (events,), (probabilities,) = detect_events(model, wave, sample_rate=model.sample_rate, **settings)
    if title is None:
        title = str(audio) if isinstance(audio, (str, os.PathLike)) else ""
    labels = list(model.labels)
    check_reference(reference or [], labels)
    drawn = _classes_to_draw(probabilities, [*events, *(reference or [])], labels)
    colours = _colours(len(drawn))
    with torch.inference_mode():
        mel, _ = model.frontend(wave[None])
    seconds = wave.numel() / model.sample_rate
    figure, axes = plt.subplots(3, 1, figsize=(10, 6.5), sharex=True, gridspec_kw={"height_ratios": [2, 2, 1.2]})
    axes[0].imshow(mel[0].cpu().numpy(), origin="lower", aspect="auto", extent=(0, seconds, 0, mel.shape[1]), cmap="magma")
    axes[0].set(ylabel="mel bin", title=title)
    times = (np.arange(len(probabilities)) + 0.5) * frame_seconds(model)
    for row, index in enumerate(drawn):
        axes[1].plot(times, probabilities[:, index], label=labels[index], linewidth=1.2, color=colours[row])
    shown = "" if len(drawn) == len(labels) else f" ({len(drawn)} of {len(labels)} classes)"
    axes[1].set(ylabel="probability" + shown, ylim=(0, 1))
    axes[1].legend(loc="upper right", fontsize=7, ncol=min(len(drawn), 4))
    # a row per class: its detected events; with a reference, its reference events below them, hatched
    lanes = [(events, 0.0, {})] if reference is None else [(events, 0.2, {}), (reference, -0.2, {"hatch": "//", "alpha": 0.45})]
    for found, shift, style in lanes:
        for event in found:
            row = drawn.index(labels.index(event.label))
            axes[2].barh(row + shift, event.offset - event.onset, left=event.onset, color=colours[row],
                         height=0.7 if reference is None else 0.36, **style)
    axes[2].set(yticks=range(len(drawn)), yticklabels=[labels[i] for i in drawn], xlabel="time (s)", xlim=(0, seconds),
                ylim=(-0.6, len(drawn) - 0.4), ylabel="" if reference is None else "detected / reference (hatched)")
    figure.tight_layout()
    figure.savefig(Path(path), dpi=110)
    plt.close(figure)
    return [labels[i] for i in drawn]
