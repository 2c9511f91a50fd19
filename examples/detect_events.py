"""Train a sound event detector on strongly labelled scenes, detect events in new audio, score them (CPU).

    python examples/detect_events.py [AUDIO_FOLDER STRONG_TSV] [--out DIR]

With no arguments, scenes of three synthetic classes (beep, buzz, hiss) are written to a temporary
folder: 48 for training and 12 for testing. With your own data, give the audio folder and its
DESED-style TSV (filename, onset, offset, event_label); then detection runs on the training audio.
The events (``events.tsv``) and a plot per file go to --out (default: a new temporary folder, kept);
the training data and the model are removed at the end.
Paper-scale runs use the sed-desed / sed-as-strong presets on a GPU (docs/sound-event-detection.md).
"""

import argparse
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import soundfile

CLASSES = ("beep", "buzz", "hiss")


def write_scenes(root: Path, count: int, seconds: float, seed: int) -> None:
    """``root/audio/sNNN.wav``: faint noise with 1-3 events of the synthetic classes; ``root/strong.tsv``."""
    rng = np.random.default_rng(seed)
    rows = ["filename\tonset\toffset\tevent_label"]
    (root / "audio").mkdir(parents=True, exist_ok=True)
    for index in range(count):
        x = 0.005 * rng.standard_normal(int(seconds * 16000))
        start = 0.2
        for _ in range(rng.integers(1, 4)):
            length = rng.uniform(0.4, 1.2)
            if start + length > seconds - 0.1:
                break
            onset = start + rng.uniform(0, 0.6)
            offset = min(onset + length, seconds - 0.05)
            a, b = int(onset * 16000), int(offset * 16000)
            t = np.arange(b - a) / 16000
            label = CLASSES[rng.integers(3)]
            x[a:b] += {"beep": 0.2 * np.sign(np.sin(2 * np.pi * 1000 * t)), "hiss": 0.15 * rng.standard_normal(b - a),
                       "buzz": 0.3 * np.sign(np.sin(2 * np.pi * 120 * t))}[label]
            rows.append(f"s{index:03d}.wav\t{onset:.3f}\t{offset:.3f}\t{label}")
            start = offset + 0.2
        soundfile.write(root / "audio" / f"s{index:03d}.wav", x.astype(np.float32), 16000)
    (root / "strong.tsv").write_text("\n".join(rows) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="*", type=Path, help="AUDIO_FOLDER STRONG_TSV (default: synthetic scenes)")
    parser.add_argument("--out", type=Path, help="folder for events.tsv and the plots (default: a new temporary folder)")
    args = parser.parse_args()
    if len(args.data) not in (0, 2):
        parser.error("give both AUDIO_FOLDER and STRONG_TSV, or neither")
    out = args.out or Path(tempfile.mkdtemp(prefix="atst-sed-"))
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="atst-sed-work-") as scratch:
        train_detect_score(Path(scratch), args.data, out)
    print(f"events: {out / 'events.tsv'}, plots: {out / 'plots'}")


def train_detect_score(work: Path, data: list[Path], out: Path) -> None:
    """Train on ``data`` (or synthetic scenes written into ``work``), detect into ``out``, score."""
    if data:
        audio, strong = data[0].resolve(), data[1].resolve()
        test_audio, test_strong = audio, strong
    else:
        write_scenes(work / "train", 48, 5.0, seed=0)
        write_scenes(work / "test", 12, 5.0, seed=7)
        audio, strong = work / "train/audio", work / "train/strong.tsv"
        test_audio, test_strong = work / "test/audio", work / "test/strong.tsv"
    quiet = {"cwd": work, "check": True, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    # 1. Train: the last block, the final norm and the event head of atst-frame-mini.
    subprocess.run(["atst-train", "sed", "--config", "sed-tiny", "--data.audio", str(audio), "--data.strong", str(strong),
                    "--trainer.enable_progress_bar", "false"], **quiet)
    best = sorted((work / "runs/sed-tiny/checkpoints").glob("epoch=*.ckpt"))[0]
    # 2. Export, 3. detect (a table per file, a TSV, a plot per file), 4. score.
    subprocess.run(["atst-convert", str(best), "detector"], **quiet)
    subprocess.run(["atst-detect", str(test_audio), "--model", str(work / "detector"), "-o", str(out / "events.tsv"),
                    "--plot", str(out / "plots"), "-q"], check=True)
    subprocess.run(["atst-score", str(test_strong), str(out / "events.tsv")], check=True)


if __name__ == "__main__":
    main()
