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
from the reference, has no F1 and is left out of the average rather than counted as 0; ``per_class``
shows it). :attr:`DetectionScores.macro_f1_all` counts them as 0, and ``undetected`` /
``unreferenced`` name them.
``tests/test_sed.py`` checks both against sed_eval 0.2.1 when it is installed (its dcase_util
dependency needs setuptools' ``pkg_resources``, which recent setuptools no longer ship, hence this
implementation).

- **PSDS** (polyphonic sound detection score, Bilen et al., ICASSP 2020) is not computed here but by
  ``sed_scores_eval`` (Ebbers, Haeb-Umbach, Serizel, ICASSP 2022; the ``psds`` extra), exactly, from
  frame score tables: one TSV per audio file (``onset offset <class> ...``, a row per frame, the
  format ``sed_scores_eval.io.read_sed_scores`` reads), written by ``atst-detect --scores DIR``
  (:func:`write_score_table`). :data:`PSDS_SCENARIOS` holds the DCASE 2021-2024 task 4 settings.
"""

from __future__ import annotations

import csv
import math
import os
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import InputError
from .events import Event

__all__ = ["PSDS_SCENARIOS", "Counts", "DetectionScores", "event_based", "psds", "psds_of_scenarios", "read_score_tables", "segment_based",
           "write_score_table"]

# The DCASE 2021-2024 task 4 scenarios (the baselines' settings), both up to 100 false positives per hour.
PSDS_SCENARIOS = {
    "PSDS1": dict(dtc_threshold=0.7, gtc_threshold=0.7, cttc_threshold=None, alpha_ct=0.0, alpha_st=1.0, max_efpr=100.0),
    "PSDS2": dict(dtc_threshold=0.1, gtc_threshold=0.1, cttc_threshold=0.3, alpha_ct=0.5, alpha_st=1.0, max_efpr=100.0),
}


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
        """Mean F1 of the classes with reference and detected events (sed_eval's class-wise average)."""
        values = [c.f1 for c in self.per_class.values() if not math.isnan(c.f1)]
        return float(np.mean(values)) if values else float("nan")

    @property
    def macro_f1_all(self) -> float:
        """Mean F1 of every class, one without detections or without references counting 0."""
        values = [2 * c.tp / (2 * c.tp + c.fp + c.fn) for c in self.per_class.values() if c.tp + c.fp + c.fn]
        return float(np.mean(values)) if values else float("nan")

    @property
    def undetected(self) -> list[str]:
        """Classes of the reference without detections."""
        return [label for label, c in self.per_class.items() if c.tp + c.fp == 0 and c.fn]

    @property
    def unreferenced(self) -> list[str]:
        """Detected classes without reference events."""
        return [label for label, c in self.per_class.items() if c.tp + c.fn == 0 and c.fp]

    def to_dict(self) -> dict:
        """The scores as JSON takes them: an undefined value (NaN) is None."""
        def number(value: float) -> float | None:
            return None if math.isnan(value) else value

        return {"micro_f1": number(self.micro_f1), "macro_f1": number(self.macro_f1),
                "macro_f1_all": number(self.macro_f1_all), "undetected": self.undetected, "unreferenced": self.unreferenced,
                "per_class": {label: {"f1": number(c.f1), "precision": number(c.precision), "recall": number(c.recall),
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


# ---------------------------------------------------------------------------------------------- PSDS
def write_score_table(path: str | os.PathLike, probabilities: np.ndarray, labels, hop: float, duration: float) -> None:
    """One file's frame scores as ``sed_scores_eval`` reads them: a TSV with the header ``onset offset
    <labels...>`` and a row per frame ``i`` of ``probabilities [T, C]``, covering ``[i hop, (i + 1) hop)``
    seconds; the last one ends at ``duration`` (the audio's length: PSDS counts false positives per
    hour of it), also where the frames stop a few milliseconds short of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = np.asarray(probabilities, dtype=np.float64)
    with open(path, "w", encoding="utf-8", newline="") as stream:
        writer = csv.writer(stream, delimiter="\t", lineterminator="\n")
        writer.writerow(["onset", "offset", *labels])
        for index, row in enumerate(rows):
            onset = index * hop
            offset = duration if index == len(rows) - 1 else min((index + 1) * hop, duration)
            if offset > onset:
                writer.writerow([f"{onset:.6f}", f"{offset:.6f}", *(f"{value:.6f}" for value in row)])


def read_score_tables(folder: str | os.PathLike) -> dict[str, tuple[np.ndarray, np.ndarray, list[str]]]:
    """The score tables under ``folder`` (searched recursively): ``{file id: (frame edges [T + 1] in s,
    scores [T, C], labels)}``, the id being the path below ``folder`` without ``.tsv`` (as a reference
    file name without its audio suffix)."""
    folder = Path(folder)
    tables = {}
    for path in sorted(folder.rglob("*.tsv")):
        name = str(path.relative_to(folder).with_suffix(""))
        try:
            rows = list(csv.reader(path.read_text(encoding="utf-8").splitlines(), delimiter="\t"))
            header, values = rows[0], np.array(rows[1:], dtype=np.float64)
        except (OSError, UnicodeDecodeError, ValueError, IndexError) as error:
            raise InputError(f"{str(path)!r}: not a score table ({str(error)[:80]}); write them with atst-detect --scores") from None
        if header[:2] != ["onset", "offset"] or values.ndim != 2 or len(values) == 0 or values.shape[1] != len(header):
            raise InputError(f"{str(path)!r}: expected a header 'onset offset <classes>' and a row of numbers per frame")
        tables[name] = (np.append(values[:, 0], values[-1, 1]), values[:, 2:], header[2:])
    if not tables:
        raise InputError(f"{str(folder)!r} holds no score tables (*.tsv); write them with atst-detect --scores {folder}")
    return tables


def _check_scorer() -> None:
    """:class:`InputError` unless a working ``sed_scores_eval`` is installed: version 0.0.4 (the newest
    on PyPI) fails under pandas 3, whose arrays are read-only (fixed upstream, not released)."""
    from importlib import metadata

    try:
        scorer, pandas = metadata.version("sed_scores_eval"), metadata.version("pandas")
    except metadata.PackageNotFoundError:
        raise InputError("PSDS needs sed_scores_eval: pip install 'atst-features[psds]'") from None
    if scorer in ("0.0.3", "0.0.4") and int(pandas.split(".")[0]) >= 3:
        raise InputError(f"sed_scores_eval {scorer} fails with pandas {pandas}: pip install 'pandas<3'")


def _file_id(filename: str) -> str:
    """A reference file name as a score table's id: without its audio suffix."""
    return filename.rsplit(".", 1)[0] if "." in Path(filename).name else filename


def psds(reference: dict[str, list[Event]], tables: dict[str, tuple[np.ndarray, np.ndarray, list[str]]],
         scenario: str = "PSDS1") -> tuple[float, dict[str, float]]:
    """PSDS of a :data:`PSDS_SCENARIOS` scenario and its per-class values, computed by ``sed_scores_eval``
    from ``tables`` (:func:`read_score_tables`) against ``reference`` events (by file name, as
    :func:`~atst_features.events.read_strong_labels` gives them). As the DCASE baselines, the files
    scored are the reference's files with events; each needs a table (other tables are left out).
    Durations are the tables' last offsets."""
    return psds_of_scenarios(reference, tables, (scenario,))[scenario]


def psds_of_scenarios(reference: dict[str, list[Event]], tables: dict[str, tuple[np.ndarray, np.ndarray, list[str]]],
                      scenarios=tuple(PSDS_SCENARIOS)) -> dict[str, tuple[float, dict[str, float]]]:
    """:func:`psds` of each of ``scenarios``, the checks and score tables prepared once for all."""
    _check_scorer()
    with warnings.catch_warnings():  # its sed_eval -> dcase_util imports warn about setuptools' pkg_resources
        warnings.simplefilter("ignore")
        from sed_scores_eval.base_modules.scores import create_score_dataframe
        from sed_scores_eval.intersection_based import psds as exact_psds

    truth = {_file_id(name): events for name, events in reference.items() if events}
    if not truth:
        raise InputError("the reference holds no events to score")
    missing = sorted(set(truth) - set(tables))
    if missing:
        raise InputError(f"no score table for {len(missing)} reference file(s), e.g. {missing[0]!r}: score the files the "
                         "reference lists (atst-detect --scores)")
    labels = next(iter(tables.values()))[2]
    unknown = sorted({e.label for events in truth.values() for e in events} - set(labels))
    if unknown or any(table[2] != labels for table in tables.values()):
        raise InputError(f"the score tables' classes {labels[:5]}... must be the same in every table and include the "
                         f"reference's; not there: {unknown[:5]}")
    tables = {name: tables[name] for name in truth}
    ground_truth = {name: [(e.onset, e.offset, e.label) for e in events] for name, events in truth.items()}
    for name, events in ground_truth.items():
        for label in labels:
            spans = sorted((onset, offset) for onset, offset, event_label in events if event_label == label)
            if any(later[0] <= earlier[1] for earlier, later in zip(spans, spans[1:])):
                raise InputError(f"the reference has overlapping or touching {label!r} events in {name!r}; merge them")
    scores = {name: create_score_dataframe(values, edges, labels) for name, (edges, values, _) in tables.items()}
    durations = {name: float(edges[-1]) for name, (edges, _, _) in tables.items()}
    results = {}
    for scenario in scenarios:
        value, per_class, *_ = exact_psds(scores, ground_truth, durations, unit_of_time="hour",
                                          **PSDS_SCENARIOS[scenario])
        results[scenario] = float(value), {label: float(v) for label, v in per_class.items()}
    return results
