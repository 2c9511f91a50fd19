"""Writes a small sound event detection case and its PSDS computed by psds_eval, the reference that
``tests/test_psds.py`` holds ``atst-score --scores`` (sed_scores_eval) to.

Not run by the tests. Run it in an environment with psds_eval 0.5.3, which needs numpy < 2.4 and
pandas < 3 (``pip install psds_eval==0.5.3 'numpy<2.4' 'pandas<3' matplotlib``):

    python tests/data/psds_case/make_reference.py

It writes, beside itself: ``reference.tsv`` (events of 24 clips, three classes, a few clips without
events), ``scores/<clip>.tsv`` (frame score tables, 40 ms frames, scores with two decimals) and
``psds_eval.json`` (PSDS1 and PSDS2 with the DCASE 2021-2024 settings). psds_eval approximates PSDS
from detections at chosen thresholds; at every distinct score (at most 101 here) it gives the exact
value, as sed_scores_eval's own tests use it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import psds_eval

HERE = Path(__file__).parent
CLASSES = ["alarm", "dog", "speech"]
HOP = 0.04
SCENARIOS = {"PSDS1": dict(dtc_threshold=0.7, gtc_threshold=0.7, cttc_threshold=0.3, alpha_ct=0.0),
             "PSDS2": dict(dtc_threshold=0.1, gtc_threshold=0.1, cttc_threshold=0.3, alpha_ct=0.5)}


def case(rng: np.random.RandomState):
    """``(events, durations, scores)``: per clip its events, seconds and [frames, classes] scores."""
    events, durations, scores = {}, {}, {}
    for index in range(24):
        name = f"clip_{index:02d}"
        seconds = 10.0 if index % 5 else 7.3
        frames = int(np.ceil(seconds / HOP))
        truth = np.zeros((frames, len(CLASSES)))
        clip_events = []
        for c, label in enumerate(CLASSES):
            start = 0.0
            for _ in range(rng.randint(0, 3) if index % 7 else 0):
                onset = round(start + rng.uniform(0.1, 2.0), 2)
                offset = round(min(onset + rng.uniform(0.3, 2.5), seconds), 2)
                if onset >= seconds - 0.2:
                    break
                clip_events.append((onset, offset, label))
                truth[int(onset / HOP) : int(np.ceil(offset / HOP)), c] = 1.0
                start = offset
        noise = np.apply_along_axis(lambda x: np.convolve(x, np.ones(15) / 15, mode="same"), 0, rng.rand(frames, len(CLASSES)))
        score = np.clip(np.array([0.35, 0.26, 0.18]) * truth + 0.6 * noise + 0.04 * rng.randn(frames, len(CLASSES)), 0, 1)
        events[name], durations[name], scores[name] = clip_events, seconds, np.round(score, 2)
    return events, durations, scores


def detections(scores: dict, durations: dict, threshold: float) -> pd.DataFrame:
    """Events where a class's score exceeds ``threshold``: runs of frames, as sed_scores_eval cuts them."""
    rows = []
    for name, score in scores.items():
        for c, label in enumerate(CLASSES):
            active = np.concatenate([[False], score[:, c] > threshold, [False]])
            changes = np.flatnonzero(active[1:] != active[:-1])
            for first, stop in zip(changes[::2], changes[1::2]):
                rows.append((f"{name}.wav", first * HOP, min(stop * HOP, durations[name]), label))
    return pd.DataFrame(rows, columns=["filename", "onset", "offset", "event_label"])


def main() -> None:
    events, durations, scores = case(np.random.RandomState(20261207))
    lines = ["filename\tonset\toffset\tevent_label"]
    for name, clip_events in events.items():
        lines += [f"{name}.wav\t{onset:.2f}\t{offset:.2f}\t{label}" for onset, offset, label in clip_events] or [f"{name}.wav\t\t\t"]
    (HERE / "reference.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (HERE / "scores").mkdir(exist_ok=True)
    for name, score in scores.items():
        rows = ["onset\toffset\t" + "\t".join(CLASSES)]
        for index, values in enumerate(score):
            onset, offset = index * HOP, min((index + 1) * HOP, durations[name])
            rows.append(f"{onset:.6f}\t{offset:.6f}\t" + "\t".join(f"{v:.2f}" for v in values))
        (HERE / "scores" / f"{name}.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")

    # As the DCASE baselines: only clips with events are scored.
    scored = [name for name, clip_events in events.items() if clip_events]
    truth = pd.DataFrame([(f"{n}.wav", on, off, label) for n in scored for on, off, label in events[n]],
                         columns=["filename", "onset", "offset", "event_label"])
    metadata = pd.DataFrame([(f"{n}.wav", durations[n]) for n in scored], columns=["filename", "duration"])
    kept = {n: scores[n] for n in scored}
    thresholds = np.unique(np.concatenate([s.ravel() for s in kept.values()]))[:-1] - 1e-9  # ">" as ">=" of each score
    results = {}
    for scenario, settings in SCENARIOS.items():
        evaluator = psds_eval.PSDSEval(**{k: v for k, v in settings.items() if k != "alpha_ct"}, ground_truth=truth,
                                       metadata=metadata, class_names=CLASSES)
        for threshold in thresholds:
            evaluator.add_operating_point(detections(kept, durations, threshold), info={"threshold": threshold})
        value = evaluator.psds(alpha_ct=settings["alpha_ct"], alpha_st=1.0, max_efpr=100).value
        results[scenario] = float(value)
    results["versions"] = {"psds_eval": "0.5.3", "numpy": np.__version__, "pandas": pd.__version__}
    results["clips_scored"] = len(scored)
    results["operating_points"] = int(len(thresholds))
    (HERE / "psds_eval.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
