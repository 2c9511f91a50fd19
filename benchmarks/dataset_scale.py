"""Dataset scale: atst-embed on many 1 s files into tar shards, against the model alone, with memory over the run.

Writes ``--files`` WAV files of 1 s (16 kHz, 16-bit, 1000 per folder; seeded noise and tones), then
1. model alone: 1 s waveforms (``--alone-files`` of them; all windows are alike), held in memory,
   embedded in the pools atst-embed hands the model (``POOL_BATCHES * batch_size`` windows), the
   model's time only;
2. ``atst-embed DATA -d OUT --format tar`` in a fresh process, its speed from its own summary line
   (model loading excluded, as in 1), and the resident memory of the process and its workers sampled
   every 0.5 s: the peak while the first 10 % of the shards were written and while the last 10 % were;
3. with ``--kill-at F``: the command is killed with SIGKILL once a fraction F of the shards is complete,
   then run again to the end (its speed is then the second run's; memory: first tenth from the first
   run, last tenth from the second).
Then checks that the shards hold every input exactly once.
Printed with the machine and the matmul peaks.

    python benchmarks/dataset_scale.py [--files 100000] [--model atst-frame-mini] [--level clip] [--kill-at 0.5]
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile
import torch

from atst_features import load_model
from atst_features.cli.pipeline import POOL_BATCHES
from atst_features.shards import complete_shards, completed_inputs

sys.path.insert(0, str(Path(__file__).parent))
from embed_speed import describe_peaks, machine, matmul_peaks  # noqa: E402

SECONDS = 1.0
RATE = 16000


def write_files(folder: Path, count: int) -> list[Path]:
    rng = np.random.default_rng(0)
    t = np.arange(int(SECONDS * RATE)) / RATE
    paths = []
    for index in range(count):
        audio = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 2000) * t) + 0.05 * rng.standard_normal(t.size)
        path = folder / f"{index // 1000:04d}" / f"{index:07d}.wav"
        path.parent.mkdir(exist_ok=True)
        soundfile.write(path, audio.astype(np.float32), RATE, subtype="PCM_16")
        paths.append(path)
    return paths


def model_alone(model, count: int, level: str, batch_size: int) -> float:
    """Audio-seconds per second of the model alone on ``count`` 1 s waveforms, in atst-embed's pools."""
    method = {"clip": model.get_clip_embedding, "frame": model.get_frame_embeddings, "both": model.get_embeddings}[level]
    pool = POOL_BATCHES * batch_size
    waves = [torch.randn(int(SECONDS * RATE)) * 0.1 for _ in range(pool)]
    method(waves, batch_size=batch_size)  # warm-up
    elapsed = 0.0
    for first in range(0, count, pool):
        part = waves[: min(pool, count - first)]
        start = time.perf_counter()
        method(part, batch_size=batch_size)
        elapsed += time.perf_counter() - start
    return count * SECONDS / elapsed


def tree_rss_mib(pid: int) -> float:
    """Resident memory of ``pid`` and its descendants (MiB), from /proc."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    children[int(stat.read().rsplit(")", 1)[1].split()[1])].append(int(entry))
            except OSError:
                continue
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        todo.extend(children.get(current, []))
        try:
            with open(f"/proc/{current}/status") as status:
                total += int(re.search(r"VmRSS:\s+(\d+)", status.read()).group(1))
        except (OSError, AttributeError):
            continue
    return total / 1024


def run_embed(command: list[str], out: Path, shards: int, kill_at: float | None = None):
    """Run ``command``; return its stderr and the peak memory (MiB) of the first and last tenth of its shards."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    first = last = 0.0
    while process.poll() is None:
        done = len(complete_shards(out)) if out.is_dir() else 0
        if kill_at is not None and done >= kill_at * shards:
            process.send_signal(signal.SIGKILL)
            break
        rss = tree_rss_mib(process.pid)
        if done < 0.1 * shards:
            first = max(first, rss)
        elif done >= 0.9 * shards - 1:
            last = max(last, rss)
        time.sleep(0.5)
    _, stderr = process.communicate()
    return stderr, first, last


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--model", default="atst-frame-mini")
    parser.add_argument("--level", default="clip", choices=["clip", "frame", "both"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--files-per-tar", type=int, default=1000)
    parser.add_argument("--extra", default="", help="more atst-embed options, e.g. '--num-workers 2 --jobs 2'")
    parser.add_argument("--kill-at", type=float, default=None, help="kill the run once this fraction of shards is done")
    parser.add_argument("--alone-files", type=int, default=10_000, help="windows the model alone is timed on")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {describe_peaks(matmul_peaks(torch.device('cpu')))}")
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        (scratch / "data").mkdir()
        start = time.perf_counter()
        paths = write_files(scratch / "data", args.files)
        print(f"{args.files} files of {SECONDS:g} s written in {time.perf_counter() - start:.0f} s; model {args.model}, "
              f"level {args.level}, batch {args.batch_size}, {args.files_per_tar} files per tar")
        alone_files = min(args.files, args.alone_files)
        alone = model_alone(load_model(args.model, device="cpu"), alone_files, args.level, args.batch_size)
        print(f"model alone: {alone:.1f} audio-s/s (on {alone_files} windows of 1 s; every window is alike)")
        shards = -(-args.files // args.files_per_tar)
        out = scratch / "out"
        command = [sys.executable, "-m", "atst_features", str(scratch / "data"), "-d", str(out), "--model", args.model,
                   "--device", "cpu", "--level", args.level, "--batch-size", str(args.batch_size), "--format", "tar",
                   "--files-per-tar", str(args.files_per_tar), *args.extra.split()]
        if args.kill_at is not None:  # killed part-way, then run again to the end
            _, first, _ = run_embed(command, out, shards, args.kill_at)
            print(f"killed (SIGKILL) with {len(completed_inputs(out))} inputs in complete shards; running it again")
            stderr, _, last = run_embed(command, out, shards)
        else:
            stderr, first, last = run_embed(command, out, shards)
        summary = stderr.strip().splitlines()[-1]
        embedded = int(summary.split()[0])
        cli = embedded * SECONDS / float(re.search(r"in ([\d.]+) s\)", summary).group(1))
        print(f"atst-embed {args.extra}: {cli:.1f} audio-s/s, {cli / alone:.2f} of the model alone ({summary})")
        print(f"resident memory (process and workers), peak: {first:.0f} MiB in the first 10 % of the shards, "
              f"{last:.0f} MiB in the last 10 %")
        held = collections.Counter(line.split("\t")[0] for index in sorted(out.glob("*.index.tsv"))
                                   for line in index.read_text().splitlines()[1:])
        once = set(held) == {os.path.abspath(path) for path in paths} and max(held.values()) == 1
        print(f"the shards hold every input exactly once: {once} ({len(held)} inputs, {sum(held.values())} samples, "
              f"{len(complete_shards(out))} shards)")

if __name__ == "__main__":
    main()
