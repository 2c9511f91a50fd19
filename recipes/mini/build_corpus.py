"""Build the atst-frame-mini training corpus and its held-out labelled evaluation set.

Every recording comes from a Debian package (installed with apt-get when ``--install`` is given)
and is openly licensed; nothing is downloaded from anywhere else and nothing is written into the
repository. Output, under ``--out`` (default ``~/atst-mini-data``):

- ``train/**.flac`` + ``train.csv`` (path, duration, package, licence, source): 16 kHz mono FLAC
  segments of 4-10 s (long recordings are cut, short sounds of one source are strung together with
  short gaps), for ``atst-train frame --data.path train.csv``;
- ``eval/**.flac`` + ``eval.csv`` (path, label, split, group, duration, package, licence, source):
  labelled clips of at most 4 s for ``atst-probe``; ``split`` is train/test for the probe, made by
  ``group`` (the source recording, or the drum kit), so no recording is on both sides.

How the held-out set stays held out: each source below is either a training source or an
evaluation source, never both; evaluation sources are other packages, other languages and
speakers, other drum kits, other tilesets or other voice packs than any training source; and a
training file whose bytes equal an evaluation file (games ship copies) is dropped from training.

Deterministic (seeded) and idempotent: a finished build (``.complete`` holding the recipe's
fingerprint) is left as it is; ``--force`` rebuilds.

    python recipes/mini/build_corpus.py --install [--out DIR] [--force]
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import random
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile

from atst_features.audio import SAMPLE_RATE, load_audio
from atst_features.errors import AudioDecodeError, EmptyAudioError

SEED = 20261202
AUDIO = re.compile(r"\.(wav|ogg|oga|opus|flac)$", re.IGNORECASE)
EVAL_CLIPS_PER_LABEL = 80
SEGMENT_SECONDS = (4.0, 10.0)  # training pieces: long recordings cut into 4-10 s, short ones joined
GAP_SECONDS = 0.25
EVAL_CLIP_SECONDS = 4.0
MIN_SECONDS = 0.3
SILENCE_RMS = 1e-4

PACKAGES = [
    "asterisk-core-sounds-en-wav", "asterisk-core-sounds-fr-wav", "asterisk-core-sounds-es-wav",
    "asterisk-core-sounds-ru-wav", "asterisk-core-sounds-it-wav", "asterisk-moh-opsound-wav",
    "wesnoth-1.16-music", "warzone2100-music", "xmoto-data", "supertuxkart-data", "supertux-data",
    "hedgewars-data", "megaglest-data", "freedroidrpg-data", "hydrogen-drumkits", "lmms-common",
    "pingus-data", "sound-theme-freedesktop", "oxygen-sounds",
]
DRUMKITS = Path("/usr/share/hydrogen/data/drumkits")
TILESETS = Path("/usr/share/games/megaglest/tilesets")
VOICES = Path("/usr/share/games/hedgewars/Data/Sounds/voices")


@dataclass(frozen=True)
class Source:
    """A set of recordings: ``label`` None for training, a class name for evaluation.
    ``max_minutes``: cap on the training minutes taken from it (music would dominate otherwise);
    ``clips_per_file``: evaluation clips cut from one recording."""

    name: str
    package: str
    roots: tuple[Path, ...]
    label: str | None = None
    max_minutes: float | None = None
    clips_per_file: int = 1
    drums: bool = False


def _alternate(folder: Path) -> tuple[tuple[Path, ...], tuple[Path, ...]]:
    """Sub-folders in sorted order, split into (even, odd) positions: training and evaluation."""
    names = sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
    return tuple(names[0::2]), tuple(names[1::2])


def sources() -> list[Source]:
    snd = Path("/usr/share/asterisk/sounds")
    kits_train, kits_eval = _alternate(DRUMKITS)
    tiles_train, tiles_eval = _alternate(TILESETS)
    voices_train, voices_eval = _alternate(VOICES)
    games = Path("/usr/share/games")
    return [
        # ---- training sources
        Source("speech-en", "asterisk-core-sounds-en-wav", (snd / "en_US_f_Allison",)),
        Source("speech-fr", "asterisk-core-sounds-fr-wav", (snd / "fr_CA_f_June",)),
        Source("speech-es", "asterisk-core-sounds-es-wav", (snd / "es_MX_f_Allison",)),
        Source("hold-music", "asterisk-moh-opsound-wav", (Path("/usr/share/asterisk/moh"),)),
        Source("wesnoth-music", "wesnoth-1.16-music", (games / "wesnoth/1.16/data/core/music",), max_minutes=45),
        Source("supertuxkart-music", "supertuxkart-data", (games / "supertuxkart/data/music",), max_minutes=40),
        Source("supertuxkart-sounds", "supertuxkart-data", (games / "supertuxkart/data/sfx", games / "supertuxkart/data/tracks", games / "supertuxkart/data/library", games / "supertuxkart/data/karts")),
        Source("supertux-music", "supertux-data", (games / "supertux2/music",), max_minutes=40),
        Source("supertux-sounds", "supertux-data", (games / "supertux2/sounds", games / "supertux2/speech")),
        Source("hedgewars-music", "hedgewars-data", (games / "hedgewars/Data/Music",), max_minutes=40),
        Source("hedgewars-sounds", "hedgewars-data", (games / "hedgewars/Data/Sounds",) + voices_train),
        Source("megaglest-units", "megaglest-data", (games / "megaglest/techs", games / "megaglest/data")),
        Source("megaglest-ambience", "megaglest-data", tiles_train),
        Source("drum-loops", "hydrogen-drumkits", kits_train, drums=True),
        Source("lmms-samples", "lmms-common", (Path("/usr/share/lmms/samples"),)),
        Source("pingus-sounds", "pingus-data", (games / "pingus/data/sounds",)),
        # ---- evaluation sources (labelled; none of these recordings is in training)
        Source("eval-speech", "asterisk-core-sounds-ru-wav,asterisk-core-sounds-it-wav",
               (snd / "ru_RU_f_IvrvoiceRU", snd / "it_IT_m_Carlo"), label="speech"),
        Source("eval-music", "warzone2100-music,xmoto-data",
               (games / "warzone2100/music", games / "xmoto/Textures/Musics"), label="music", clips_per_file=3),
        Source("eval-drums", "hydrogen-drumkits", kits_eval, label="drums", drums=True),
        Source("eval-ambience", "megaglest-data", tiles_eval, label="nature_ambience", clips_per_file=3),
        Source("eval-voices", "hedgewars-data", voices_eval, label="character_voice"),
        Source("eval-alerts", "sound-theme-freedesktop,oxygen-sounds",
               (Path("/usr/share/sounds/freedesktop"), Path("/usr/share/sounds")), label="desktop_alert"),
        Source("eval-robot-sfx", "freedroidrpg-data", (Path("/usr/share/freedroidrpg/data/sound/effects"),),
               label="game_effect"),
    ]


def licence_of(package: str) -> str:
    """The distinct ``License:`` fields of a package's Debian copyright file ("see ..." if none)."""
    found: list[str] = []
    for name in package.split(","):
        path = Path("/usr/share/doc", name, "copyright")
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        for match in re.findall(r"^License:[ \t]*(\S.*)$", text, flags=re.MULTILINE):
            if match.strip() not in found:
                found.append(match.strip())
    shown = "; ".join(found[:6]) + ("; ..." if len(found) > 6 else "")
    return f"{shown or 'see copyright file'} (/usr/share/doc/<package>/copyright)"


def files_of(source: Source) -> list[Path]:
    found = []
    for root in source.roots:
        if root.is_file():
            found.append(root)
        elif root.is_dir():
            # /usr/share/sounds holds the freedesktop folder too; the alert source lists both once.
            walk = root.rglob("*") if root != Path("/usr/share/sounds") else root.glob("*")
            found.extend(p for p in walk if p.is_file() and AUDIO.search(p.name))
    return sorted(set(found))


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def decode(path: Path) -> np.ndarray | None:
    """16 kHz mono float32, or None for unreadable, too short or silent files."""
    try:
        waveform, _ = load_audio(path, SAMPLE_RATE)
    except (AudioDecodeError, EmptyAudioError):
        return None
    if len(waveform) < MIN_SECONDS * SAMPLE_RATE or float(np.sqrt(np.mean(waveform**2))) < SILENCE_RMS:
        return None
    peak = float(np.abs(waveform).max())
    return waveform / peak * 0.9 if peak > 1.0 else waveform


def drum_loops(kit_files: list[Path], seconds: float, count: int, rng: random.Random) -> list[np.ndarray]:
    """Beats played from one kit's recorded one-shots: a 16th-note grid at a random tempo, kick-like
    samples on the beats, snare-like on the back beats, hats on eighths, random extra hits."""
    samples = [(p, decode(p)) for p in kit_files]
    samples = [(p.name.lower(), w[: SAMPLE_RATE * 2]) for p, w in samples if w is not None]
    if not samples:
        return []
    pick = {
        role: [w for n, w in samples if re.search(pattern, n)] or [w for _, w in samples]
        for role, pattern in (("kick", r"kick|bd|bass"), ("snare", r"snare|sd|clap"), ("hat", r"hat|hh|ride|cym"))
    }
    loops = []
    for _ in range(count):
        out = np.zeros(int(seconds * SAMPLE_RATE) + SAMPLE_RATE * 2, dtype=np.float32)
        step = 60.0 / rng.uniform(80, 170) / 4
        kick, snare, hat = (rng.choice(pick[r]) for r in ("kick", "snare", "hat"))
        for index in range(int(seconds / step)):
            hits = []
            if index % 8 == 0 or rng.random() < 0.08:
                hits.append(kick)
            if index % 8 == 4 or rng.random() < 0.05:
                hits.append(snare)
            if index % 2 == 0:
                hits.append(hat)
            if rng.random() < 0.06:
                hits.append(rng.choice(samples)[1])
            start = int(index * step * SAMPLE_RATE)
            for hit in hits:
                out[start : start + len(hit)] += hit * rng.uniform(0.5, 1.0)
        out = out[: int(seconds * SAMPLE_RATE)]
        peak = float(np.abs(out).max())
        loops.append(out / peak * 0.9 if peak > 0 else out)
    return loops


def training_pieces(waveforms: list[np.ndarray], rng: random.Random) -> list[np.ndarray]:
    """Long recordings cut into 4-10 s pieces; short ones strung together (with gaps) up to 4-10 s."""
    low, high = (int(s * SAMPLE_RATE) for s in SEGMENT_SECONDS)
    pieces, pending, pending_len = [], [], 0
    gap = np.zeros(int(GAP_SECONDS * SAMPLE_RATE), dtype=np.float32)
    for waveform in waveforms:
        if len(waveform) >= low:
            count = max(1, round(len(waveform) / high + 0.499))
            pieces.extend(np.array_split(waveform, count))
            continue
        pending += [waveform, gap]
        pending_len += len(waveform) + len(gap)
        if pending_len >= rng.randint(low, high):
            pieces.append(np.concatenate(pending)[:high])
            pending, pending_len = [], 0
    if pending:
        pieces.append(np.concatenate(pending)[:high])
    return pieces


def eval_clips(waveform: np.ndarray, count: int) -> list[np.ndarray]:
    """Up to ``count`` clips of at most 4 s, evenly spaced over the recording."""
    size = int(EVAL_CLIP_SECONDS * SAMPLE_RATE)
    if len(waveform) <= size:
        return [waveform]
    starts = np.linspace(0, len(waveform) - size, min(count, len(waveform) // size)).astype(int)
    return [waveform[s : s + size] for s in starts]


def write(path: Path, waveform: np.ndarray) -> float:
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(str(path), waveform, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    return len(waveform) / SAMPLE_RATE


def fingerprint() -> str:
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


def install() -> None:
    subprocess.run(["apt-get", "update", "-qq"], check=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES], check=True)


def build(out: Path) -> None:
    rng = random.Random(SEED)
    all_sources = sources()
    eval_sources = [s for s in all_sources if s.label]
    eval_hashes = {digest(p) for s in eval_sources for p in files_of(s)}
    eval_roots = {root for s in eval_sources for root in s.roots if root != Path("/usr/share/sounds")}
    train_rows, eval_rows, seen = [], [], set()
    for source in all_sources:
        files = files_of(source)
        if not files:
            raise SystemExit(f"error: no audio for source {source.name!r} in {[str(r) for r in source.roots]}: "
                             f"install its package ({source.package}) or run with --install")
        licence = licence_of(source.package)
        if source.label is None:
            files = [p for p in files if not any(root in p.parents for root in eval_roots)]
            kept = []
            for path in files:  # no copy of an evaluation recording, no duplicate within training
                key = digest(path)
                if key not in eval_hashes and key not in seen:
                    seen.add(key)
                    kept.append(path)
            files = kept
        print(f"{source.name:<22} {len(files):>5} files", file=sys.stderr, flush=True)
        if source.drums:
            kits = sorted({p.relative_to(DRUMKITS).parts[0] for p in files})
            for kit in kits:
                kit_files = [p for p in files if p.relative_to(DRUMKITS).parts[0] == kit]
                seconds = EVAL_CLIP_SECONDS if source.label else 8.0
                loops = drum_loops(kit_files, seconds, 12 if source.label else 40, rng)
                slug = re.sub(r"\W+", "_", kit)
                for index, loop in enumerate(loops):
                    rel = Path("eval" if source.label else "train", source.name, f"{slug}-{index:03d}.flac")
                    duration = write(out / rel, loop)
                    row = dict(path=str(rel), duration=f"{duration:.3f}", package=source.package, licence=licence,
                               source=f"{DRUMKITS / kit} (one-shots arranged by this recipe)")
                    (eval_rows if source.label else train_rows).append(dict(row, label=source.label, group=slug)
                                                                       if source.label else row)
            continue
        order = list(files)
        rng.shuffle(order)
        budget = source.max_minutes * 60 if source.max_minutes else float("inf")
        used, waveforms, clips = 0.0, [], 0
        for path in order:
            if source.label and clips >= EVAL_CLIPS_PER_LABEL:
                break
            waveform = decode(path)
            if waveform is None:
                continue
            if source.label:
                group = hashlib.sha1(str(path).encode()).hexdigest()[:10]
                for index, clip in enumerate(eval_clips(waveform, source.clips_per_file)[: EVAL_CLIPS_PER_LABEL - clips]):
                    clips += 1
                    rel = Path("eval", source.label, f"{path.stem[:40]}-{group}-{index}.flac")
                    duration = write(out / rel, clip)
                    eval_rows.append(dict(path=str(rel), label=source.label, group=group, duration=f"{duration:.3f}",
                                          package=source.package, licence=licence, source=str(path)))
                continue
            if used >= budget:
                break
            used += len(waveform) / SAMPLE_RATE
            waveforms.append((path, waveform))
        for path, waveform in waveforms:
            for index, piece in enumerate(training_pieces([waveform], rng) if len(waveform) >= 4 * SAMPLE_RATE else []):
                rel = Path("train", source.name, f"{path.stem[:40]}-{hashlib.sha1(str(path).encode()).hexdigest()[:8]}-{index}.flac")
                duration = write(out / rel, piece)
                train_rows.append(dict(path=str(rel), duration=f"{duration:.3f}", package=source.package,
                                       licence=licence, source=str(path)))
        short = [w for _, w in waveforms if len(w) < 4 * SAMPLE_RATE]
        for index, piece in enumerate(training_pieces(short, rng)):
            rel = Path("train", source.name, f"joined-{index:04d}.flac")
            duration = write(out / rel, piece)
            train_rows.append(dict(path=str(rel), duration=f"{duration:.3f}", package=source.package,
                                   licence=licence, source=f"{len(short)} short files of {source.name}, joined"))
    assign_probe_splits(eval_rows, rng)
    write_csv(out / "train.csv", train_rows, ["path", "duration", "package", "licence", "source"])
    write_csv(out / "eval.csv", eval_rows, ["path", "label", "split", "group", "duration", "package", "licence", "source"])
    summary(out, train_rows, eval_rows)


def assign_probe_splits(rows: list[dict], rng: random.Random, test_share: float = 0.4) -> None:
    """Per label, whole groups (recordings, kits) go to the probe's train or test split."""
    for label in sorted({r["label"] for r in rows}):
        groups = sorted({r["group"] for r in rows if r["label"] == label})
        rng.shuffle(groups)
        test = set(groups[: max(1, round(len(groups) * test_share))])
        for row in rows:
            if row["label"] == label:
                row["split"] = "test" if row["group"] in test else "train"


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def summary(out: Path, train_rows: list[dict], eval_rows: list[dict]) -> None:
    hours = sum(float(r["duration"]) for r in train_rows) / 3600
    by_package: dict[str, float] = {}
    for row in train_rows:
        by_package[row["package"]] = by_package.get(row["package"], 0.0) + float(row["duration"]) / 60
    labels: dict[str, dict[str, int]] = {}
    for row in eval_rows:
        labels.setdefault(row["label"], {"train": 0, "test": 0})[row["split"]] += 1
    info = {"train_hours": round(hours, 2), "train_pieces": len(train_rows),
            "train_minutes_by_package": {k: round(v, 1) for k, v in sorted(by_package.items())},
            "eval_clips": len(eval_rows), "eval_clips_by_label": labels, "seed": SEED, "recipe": fingerprint()}
    (out / "summary.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(info, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path.home() / "atst-mini-data")
    parser.add_argument("--install", action="store_true", help="apt-get install the source packages first (root)")
    parser.add_argument("--force", action="store_true", help="rebuild even if a finished build is there")
    args = parser.parse_args()
    out = args.out.expanduser().resolve()
    repo = Path(__file__).resolve().parents[2]
    if out == repo or repo in out.parents:
        raise SystemExit(f"error: --out {str(out)!r} is inside the repository; audio never goes there")
    stamp = out / ".complete"
    if not args.force and stamp.is_file() and stamp.read_text().strip() == fingerprint():
        print(f"{out}: corpus already built by this recipe (use --force to rebuild)", file=sys.stderr)
        return
    if args.install:
        install()
    if out.exists():
        for old in ("train", "eval"):
            subprocess.run(["rm", "-rf", str(out / old)], check=True)
    out.mkdir(parents=True, exist_ok=True)
    build(out)
    stamp.write_text(fingerprint() + "\n")


if __name__ == "__main__":
    main()
