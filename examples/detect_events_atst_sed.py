"""Detect sound events with ATST-SED (DCASE 2023 task 4: the 10 DESED classes), write them, plot them.

    python examples/detect_events_atst_sed.py [AUDIO ...] [--checkpoint Stage2_wo_ext.ckpt] [--out DIR]

The first run downloads ATST-SED's stage-2 checkpoint from the authors' Google Drive, converts it,
checks it and caches it; later runs need no network. Google Drive refuses a file that was downloaded
too often that day: then download it in a browser (the link is in the README of
github.com/Audio-WestlakeU/ATST-SED) and give it once with --checkpoint; it is installed as
``atst-sed-desed``, with that model's class names and post-processing, exactly as a download would be.

With no AUDIO, the recording that ships in the package (`example_audio()`) is used. Writes ``events.tsv`` and a PNG per file
into --out (default: a new temporary folder).
"""

import argparse
import tempfile
from pathlib import Path

from atst_features import example_audio, install_checkpoint, load_model
from atst_features.detection import detect_events
from atst_features.events import write_events
from atst_features.plots import plot_events

NAME = "atst-sed-desed"
DEMO = example_audio()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("audio", nargs="*", type=Path, default=[DEMO])
    parser.add_argument("--checkpoint", type=Path, help="ATST-SED's Stage2_wo_ext.ckpt, downloaded by hand")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="atst-sed-"))
    out.mkdir(parents=True, exist_ok=True)

    if args.checkpoint is not None:
        print(f"installing {args.checkpoint} as {NAME} ...")
        install_checkpoint(NAME, args.checkpoint)
    model = load_model(NAME, device="cpu")  # first time: download, conversion and checks (a few minutes)
    print(f"{NAME}: {len(model.labels)} classes, post-processing {model.config.detection}")

    found = []
    for path in args.audio:
        # As model.detect_events(path), also giving the median-filtered probabilities [frames, 10] (every 64 ms):
        # 10 s windows every 3 s, each median-filtered and thresholded, their decisions united.
        (events,), (probabilities,) = detect_events(model, path)
        print(f"{path.name}: {len(events)} events")
        for event in events:
            print(f"  {event.onset:6.2f} {event.offset:6.2f}  {event.label:<26} {event.score:.2f}")
        plot_events(model, path, out / f"{path.stem}.png", events=events, probabilities=probabilities)
        print(f"  plot: {out / f'{path.stem}.png'}")
        found.extend(events)
    write_events(found, out / "events.tsv")
    print(f"events: {out / 'events.tsv'}")


if __name__ == "__main__":
    main()
