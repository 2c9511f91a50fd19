"""From frame probabilities to sound events: median filter, thresholds, event decoding, TSV files.

Frame ``i`` of a probability curve covers ``[i * hop, (i + 1) * hop)`` seconds (ATST: 40 ms
tokens). An event is a run of frames whose (median-filtered) probability is at or above the
class threshold; runs separated by less than ``min_gap`` are merged, and events shorter than
``min_length`` are dropped. The DESED TSV format is ``filename onset offset event_label`` with a
header; we add a ``score`` column (the mean probability of the event's frames). One reader serves
detections, references and training labels (:func:`read_strong_labels`), with one set of rules.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError

__all__ = ["Event", "decode_events", "median_filter", "per_class", "read_events", "read_strong_labels", "read_weak_labels",
           "write_events"]


@dataclass(frozen=True)
class Event:
    """One detected (or reference) event: times in seconds, its label and score."""

    filename: str
    onset: float
    offset: float
    label: str
    score: float = 1.0


def per_class(value, labels: tuple[str, ...] | list[str], name: str) -> np.ndarray:
    """A number, or a mapping ``{label: number}`` (missing labels: its ``"*"`` entry, else an error),
    as one value per class."""
    if isinstance(value, dict):
        unknown = sorted(set(value) - set(labels) - {"*"})
        if unknown:
            import difflib

            close = {label: difflib.get_close_matches(label, labels, n=1, cutoff=0.5) for label in unknown}
            hints = ", ".join(f"{label!r} -> {found[0]!r}" for label, found in close.items() if found)
            raise InputError(f"{name}: unknown labels {unknown}{f' (did you mean {hints}?)' if hints else ''}; "
                             f"the model's labels are {list(labels)}")
        missing = [label for label in labels if label not in value and "*" not in value]
        if missing:
            raise InputError(f"{name}: no value for {missing}; give one per label or a default ('*')")
        return np.array([float(value.get(label, value.get("*"))) for label in labels])
    return np.full(len(labels), float(value))


def median_filter(probabilities: np.ndarray, sizes) -> np.ndarray:
    """Median over ``sizes`` frames (one int, or one per class), centred, per class, on ``[T, C]``
    probabilities, equal to ``scipy.ndimage.median_filter(x, size=(size, 1))``: edges mirrored
    (``a b c | c b a``), the upper of the two middle values for even sizes. Size 1: unchanged."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    sizes = np.broadcast_to(np.asarray(sizes, dtype=int), (probabilities.shape[1],))
    out = probabilities.copy()
    for c, size in enumerate(sizes):
        if size <= 1:
            continue
        before = size // 2
        after = size - 1 - before
        padded = np.pad(probabilities[:, c], (before, after), mode="symmetric")
        windows = np.lib.stride_tricks.sliding_window_view(padded, size)
        out[:, c] = np.partition(windows, size // 2, axis=1)[:, size // 2]  # even sizes: the upper median
    return out


def decode_events(
    probabilities: np.ndarray,
    labels: tuple[str, ...] | list[str],
    *,
    filename: str = "",
    hop: float = 0.04,
    threshold=0.5,
    median=1,
    min_gap: float = 0.0,
    min_length: float = 0.0,
) -> list[Event]:
    """Events of ``probabilities [T, C]`` (frame ``i`` covers ``[i * hop, (i + 1) * hop)`` s), sorted
    by onset: per class, median-filtered (``median`` frames, one size or ``{label: size}``), at or
    above ``threshold`` (one value or ``{label: value}``), gaps shorter than ``min_gap`` s closed,
    events shorter than ``min_length`` s dropped. ``score``: the mean filtered probability."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if probabilities.ndim != 2 or probabilities.shape[1] != len(labels):
        raise InputError(f"probabilities must be [T, {len(labels)}], got {list(probabilities.shape)}")
    thresholds = per_class(threshold, labels, "threshold")
    sizes = per_class(median, labels, "median").astype(int)
    filtered = median_filter(probabilities, sizes)
    events = []
    for c, label in enumerate(labels):
        active = np.concatenate([[False], filtered[:, c] >= thresholds[c], [False]])
        changes = np.flatnonzero(active[1:] != active[:-1])
        runs = [[start, stop] for start, stop in zip(changes[::2], changes[1::2])]  # frames [start, stop)
        merged: list[list[int]] = []
        for run in runs:
            if merged and (run[0] - merged[-1][1]) * hop < min_gap - 1e-9:
                merged[-1][1] = run[1]
            else:
                merged.append(run)
        for start, stop in merged:
            if (stop - start) * hop < min_length - 1e-9:
                continue
            score = float(filtered[start:stop, c].mean())
            events.append(Event(filename, round(start * hop, 3), round(stop * hop, 3), label, round(score, 4)))
    return sorted(events, key=lambda e: (e.filename, e.onset, e.label))


def write_events(events: list[Event], path_or_stream, *, score: bool = True) -> None:
    """DESED-style TSV: ``filename onset offset event_label`` (and ``score``) with a header."""
    def write(stream) -> None:
        writer = csv.writer(stream, delimiter="\t", lineterminator="\n")
        writer.writerow(["filename", "onset", "offset", "event_label"] + (["score"] if score else []))
        for e in events:
            writer.writerow([e.filename, f"{e.onset:.3f}", f"{e.offset:.3f}", e.label] + ([f"{e.score:.4f}"] if score else []))

    if isinstance(path_or_stream, (str, os.PathLike)):
        with open(path_or_stream, "w", encoding="utf-8", newline="") as stream:
            write(stream)
    else:
        write(path_or_stream)


def _tsv_rows(path: Path, header: list[str], what: str) -> list[tuple[int, list[str]]]:
    """``(line number, cells)`` of the non-blank rows of a UTF-8 TSV file that starts with ``header``."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"{str(path)!r}: cannot read the {what} ({error})") from None
    rows = list(csv.reader(lines, delimiter="\t"))
    if not rows or [cell.strip() for cell in rows[0][: len(header)]] != header:
        raise InputError(f"{str(path)!r}: expected a TSV header {' '.join(header)!r}")
    return [(number, row) for number, row in enumerate(rows[1:], start=2) if any(cell.strip() for cell in row)]


def _event_rows(path: Path) -> list[tuple[str, Event | None]]:
    """``(filename, event)`` per row of a DESED-style TSV, in file order; None for a row with an empty
    onset (a file without events)."""
    rows = []
    for number, row in _tsv_rows(path, ["filename", "onset", "offset", "event_label"], "event list"):
        row = row + [""] * (5 - len(row))
        if not row[1].strip():
            rows.append((row[0].strip(), None))
            continue
        try:
            onset, offset = float(row[1]), float(row[2])
            score = float(row[4]) if row[4].strip() else 1.0
        except ValueError:
            raise InputError(f"{str(path)!r} line {number}: onset, offset and score must be numbers, got {row[1:5]}") from None
        if not 0 <= onset <= offset:
            raise InputError(f"{str(path)!r} line {number}: need 0 <= onset <= offset, got {onset}, {offset}")
        if not row[3].strip():
            raise InputError(f"{str(path)!r} line {number}: empty event_label")
        rows.append((row[0].strip(), Event(row[0].strip(), onset, offset, row[3].strip(), score)))
    return rows


def read_strong_labels(path: str | os.PathLike) -> dict[str, list[Event]]:
    """The events of a DESED-style TSV (``filename onset offset event_label`` [``score``], header
    required) by file; a row with an empty onset lists a file without events (as DESED writes
    them), which maps to ``[]``. :class:`InputError` names the line of a row whose times are not
    numbers with ``0 <= onset <= offset``, or whose label is empty."""
    events: dict[str, list[Event]] = {}
    for filename, event in _event_rows(Path(path)):
        events.setdefault(filename, []).extend([event] if event is not None else [])
    return events


def read_events(path: str | os.PathLike) -> list[Event]:
    """Every event of a DESED-style TSV, in the order of its rows (rules: :func:`read_strong_labels`)."""
    return [event for _, event in _event_rows(Path(path)) if event is not None]


def read_weak_labels(path: str | os.PathLike) -> dict[str, list[str]]:
    """``{filename: [label, ...]}`` of a weak-label TSV (``filename event_labels``, labels separated by commas)."""
    labels = {}
    for _, row in _tsv_rows(Path(path), ["filename", "event_labels"], "label file"):
        cell = row[1] if len(row) > 1 else ""
        labels[row[0].strip()] = [label.strip() for label in cell.split(",") if label.strip()]
    return labels
