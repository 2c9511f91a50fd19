"""Bulk extraction: atst-embed on many short files against the model alone on the same audio.

Writes N WAV files of 1-5 s (uniform, seeded) into a temporary folder, then measures
1. model only: the decoded waveforms already in memory, embedded in pools of the size atst-embed
   uses (``POOL_BATCHES * batch_size`` windows, sorted by length into batches), no decoding, no files;
2. atst-embed: the same files from disk (decoding ahead in threads, writing npz), timed by its own
   summary line (the parent's model loading excluded, as for 1; with --jobs, the jobs' start and
   model loading included).
and prints both in audio-seconds per second and their ratio, with the machine and matmul peaks.

    python benchmarks/bulk_embed.py [--files 2000] [--model base|mini|PATH] [--precision bf16] [--level clip]
        [--device cpu|cuda] [--jobs 1,2]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile
import torch

from atst_features import load_model, save_pretrained
from atst_features.audio import SAMPLE_RATE, load_audio
from atst_features.cli.pipeline import POOL_BATCHES
from atst_features.encoder import EncoderConfig
from atst_features.config import ModelConfig
from atst_features.model import ATSTModel

sys.path.insert(0, str(Path(__file__).parent))
from embed_speed import describe_peaks, machine, matmul_peaks  # noqa: E402


def write_files(folder: Path, count: int, seed: int = 0) -> float:
    """``count`` WAV files of 1-5 s of noisy tones; returns the total seconds."""
    rng = np.random.default_rng(seed)
    total = 0.0
    for index in range(count):
        seconds = float(rng.uniform(1.0, 5.0))
        t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
        audio = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 2000) * t) + 0.05 * rng.standard_normal(t.size)
        soundfile.write(folder / f"{index:05d}.wav", audio.astype(np.float32), SAMPLE_RATE, subtype="PCM_16")
        total += t.size / SAMPLE_RATE
    return total


def model_folder(name: str, where: Path) -> str:
    if name not in ("base", "small"):
        return name
    torch.manual_seed(0)
    model = ATSTModel(ModelConfig("frame", EncoderConfig.of_size(name, cls_token=False)))  # speed does not depend on weights
    return str(save_pretrained(model, where / name))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--model", default="base", help="base / small (random weights) or any load_model source")
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--level", default="clip", choices=["clip", "frame", "both"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--jobs", default="1", help="atst-embed --jobs values to time, comma-separated (e.g. 1,2)")
    args = parser.parse_args()

    print(f"machine: {machine()}")
    device = torch.device(args.device)
    if device.type == "cuda":
        print(f"gpu: {torch.cuda.get_device_name(device)}")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {describe_peaks(matmul_peaks(device))}")
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        data = scratch / "data"
        data.mkdir()
        seconds = write_files(data, args.files)
        source = model_folder(args.model, scratch)
        print(f"{args.files} files, {seconds / 3600:.2f} h of audio; model {args.model}, precision {args.precision}, "
              f"level {args.level}, batch {args.batch_size}")

        model = load_model(source, device=device, precision=args.precision)
        waves = [load_audio(path)[0] for path in sorted(data.glob("*.wav"))]
        method = {"clip": model.get_clip_embedding, "frame": model.get_frame_embeddings, "both": model.get_embeddings}[args.level]
        pool = POOL_BATCHES * args.batch_size
        method(waves[:pool], batch_size=args.batch_size)  # warm-up
        start = time.perf_counter()
        for first in range(0, len(waves), pool):
            method(waves[first : first + pool], batch_size=args.batch_size)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        model_only = seconds / (time.perf_counter() - start)

        del model
        print(f"model only         : {model_only:8.1f} audio-s/s")
        for jobs in args.jobs.split(","):
            command = [sys.executable, "-m", "atst_features", str(data), "-d", str(scratch / f"out{jobs}"), "--model",
                       source, "--device", args.device, "--precision", args.precision, "--level", args.level,
                       "--batch-size", str(args.batch_size), "--num-workers", str(args.num_workers), "--jobs", jobs]
            result = subprocess.run(command, capture_output=True, text=True, check=True)
            summary = result.stderr.strip().splitlines()[-1]
            cli = seconds / float(re.search(r"in ([\d.]+) s\)", summary).group(1))
            print(f"atst-embed --jobs {jobs}: {cli:8.1f} audio-s/s, {cli / model_only:.2f} of the model alone  ({summary})")


if __name__ == "__main__":
    main()
