"""Sound event detection scores with the definitions of ``sed_eval`` (Mesaros, Heittola, Virtanen,
"Metrics for polyphonic sound event detection", Applied Sciences 2016), in plain numpy.

- **Event-based F1**: per file and class, a detected event matches a reference event when their
  onsets differ by at most ``collar`` seconds and their offsets by at most
  ``max(collar, offset_share * reference length)``; each event matches at most once (a maximum
  bipartite matching, sed_eval's "optimal" matching).
- **Segment-based F1**: per file, time cut into ``segment`` seconds; a class is active in a segment
  that any of its events overlaps; counts over segments and classes.

Micro F1 pools the counts of every class; macro F1 averages the per-class F1 over the classes
that have both reference and detected events (sed_eval's choice: a class never detected, or absent
from the reference, is left out of the average rather than counted as 0; ``per_class`` shows it). ``tests/test_events.py`` checks both against sed_eval 0.2.1 when
it is installed (its dcase_util dependency needs setuptools' ``pkg_resources``, which recent
setuptools no longer ship, hence this implementation).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from .events import Event

__all__ = ["Counts", "DetectionScores", "event_based", "segment_based"]


@dataclass
class Counts:
    """True positives, false positives and false negatives of one class (or of all)."""

    tp: int = 0
    fp: int = 0
    fn: int = 0

    @property
    def f1(self) -> float:
        """``2 tp / (2 tp + fp + fn)``; NaN without detections or without references (as sed_eval)."""
        if self.tp + self.fp == 0 or self.tp + self.fn == 0:
            return float("nan")
        return 2 * self.tp / (2 * self.tp + self.fp + self.fn)

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else float("nan")

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else float("nan")

    def add(self, tp: int, fp: int, fn: int) -> None:
        self.tp, self.fp, self.fn = self.tp + tp, self.fp + fp, self.fn + fn


@dataclass
class DetectionScores:
    """Counts per class, and micro (pooled) and macro (class mean) F1."""

    per_class: dict[str, Counts] = field(default_factory=dict)

    @property
    def micro_f1(self) -> float:
        total = Counts()
        for counts in self.per_class.values():
            total.add(counts.tp, counts.fp, counts.fn)
        return total.f1

    @property
    def macro_f1(self) -> float:
        values = [c.f1 for c in self.per_class.values() if not math.isnan(c.f1)]
        return float(np.mean(values)) if values else float("nan")

    def to_dict(self) -> dict:
        return {"micro_f1": self.micro_f1, "macro_f1": self.macro_f1,
                "per_class": {label: {"f1": c.f1, "precision": c.precision, "recall": c.recall,
                                      "tp": c.tp, "fp": c.fp, "fn": c.fn} for label, c in self.per_class.items()}}


def _grouped(events: list[Event]) -> dict[tuple[str, str], list[Event]]:
    groups: dict[tuple[str, str], list[Event]] = defaultdict(list)
    for event in events:
        groups[(event.filename, event.label)].append(event)
    return groups


def _max_matching(allowed: list[list[int]], n_right: int) -> int:
    """Size of a maximum bipartite matching (augmenting paths); ``allowed[i]``: right nodes of left i."""
    match_of_right = [-1] * n_right

    def augment(left: int, seen: set[int]) -> bool:
        for right in allowed[left]:
            if right in seen:
                continue
            seen.add(right)
            if match_of_right[right] < 0 or augment(match_of_right[right], seen):
                match_of_right[right] = left
                return True
        return False

    return sum(augment(left, set()) for left in range(len(allowed)))


def event_based(reference: list[Event], detected: list[Event], *, collar: float = 0.2,
                offset_share: float = 0.2) -> DetectionScores:
    """Event-based counts and F1 (see the module docstring); labels are those of either list."""
    scores = DetectionScores({label: Counts() for label in sorted({e.label for e in reference + detected})})
    references, detections = _grouped(reference), _grouped(detected)
    for key in set(references) | set(detections):
        refs, dets = references.get(key, []), detections.get(key, [])
        allowed = [
            [j for j, d in enumerate(dets)
             if abs(d.onset - r.onset) <= collar
             and abs(d.offset - r.offset) <= max(collar, offset_share * (r.offset - r.onset))]
            for r in refs
        ]
        matched = _max_matching(allowed, len(dets))
        scores.per_class[key[1]].add(matched, len(dets) - matched, len(refs) - matched)
    return scores


def _activity(events: list[Event], labels: list[str], segments: int, segment: float) -> np.ndarray:
    roll = np.zeros((segments, len(labels)), dtype=bool)
    index = {label: i for i, label in enumerate(labels)}
    for e in events:
        first, last = int(math.floor(e.onset / segment)), int(math.ceil(e.offset / segment))
        roll[first : max(last, first + 1), index[e.label]] = True
    return roll


def segment_based(reference: list[Event], detected: list[Event], *, segment: float = 1.0) -> DetectionScores:
    """Segment-based counts and F1 over ``segment``-second segments (see the module docstring)."""
    labels = sorted({e.label for e in reference + detected})
    scores = DetectionScores({label: Counts() for label in labels})
    files = sorted({e.filename for e in reference + detected})
    for name in files:
        refs = [e for e in reference if e.filename == name]
        dets = [e for e in detected if e.filename == name]
        end = max(e.offset for e in refs + dets)
        segments = max(1, int(math.ceil(end / segment)))
        ref_roll, det_roll = _activity(refs, labels, segments, segment), _activity(dets, labels, segments, segment)
        for c, label in enumerate(labels):
            tp = int((ref_roll[:, c] & det_roll[:, c]).sum())
            scores.per_class[label].add(tp, int(det_roll[:, c].sum()) - tp, int(ref_roll[:, c].sum()) - tp)
    return scores
