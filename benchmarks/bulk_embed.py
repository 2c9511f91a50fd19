"""Bulk extraction: atst-embed on many short files against the model alone, and the host ceiling.

Default mode: writes N WAV files of 1-5 s (uniform, seeded) into a temporary folder, then measures
1. model only: the decoded waveforms already in memory, embedded in pools of the size atst-embed
   uses (``POOL_BATCHES * batch_size`` windows, sorted by length into batches), no decoding, no files;
2. atst-embed: the same files from disk (decoding ahead in --num-workers processes, writing npz),
   timed by its own summary line (the parent's model loading excluded, as for 1; with --jobs, the
   jobs' start and model loading included).
and prints both in audio-seconds per second and their ratio, with the machine and matmul peaks.

``--stand-in``: how fast the pipeline alone (decoding, pooling, writing) can feed a device. atst-embed's
pipeline (``embed_items``) runs in this process with a stand-in model that computes nothing (zeros of the
model's shapes), for 0, 1 and 2 decoding workers, on WAV and FLAC files of 1-5 s at 16 and 44.1 kHz
(the latter resampled). Per file, each stage is also timed alone in this process: decode, resample,
the real front end on the CPU (on a GPU it runs on the device), the host-to-device copy (--device
cuda only) and writing the outputs.

    python benchmarks/bulk_embed.py [--files 2000] [--model base|mini|PATH] [--precision bf16] [--level clip]
        [--device cpu|cuda] [--jobs 1,2]
    python benchmarks/bulk_embed.py --stand-in [--files 1000] [--model base] [--level clip] [--format npz]
        [--workers 0,1,2] [--rates 16000,44100] [--suffixes wav,flac] [--scratch /dev/shm]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile
import torch

from atst_features import load_model, save_pretrained
from atst_features.audio import SAMPLE_RATE, load_audio, resample
from atst_features.cli.destinations import FileOutputs, ShardOutputs
from atst_features.cli.embed import LEVEL_KEYS
from atst_features.cli.pipeline import POOL_BATCHES, embed_items
from atst_features.cli.runs import Run
from atst_features.config import ModelConfig
from atst_features.encoder import ENCODER_SIZES, EncoderConfig
from atst_features.inputs import find_inputs
from atst_features.model import ATSTModel
from atst_features.outputs import FORMATS

sys.path.insert(0, str(Path(__file__).parent))
from embed_speed import describe_peaks, machine, matmul_peaks  # noqa: E402


def write_files(folder: Path, count: int, seed: int = 0, rate: int = SAMPLE_RATE, suffix: str = "wav") -> float:
    """``count`` 16-bit files of 1-5 s of noisy tones at ``rate`` Hz; returns the total seconds."""
    rng = np.random.default_rng(seed)
    total = 0.0
    for index in range(count):
        seconds = float(rng.uniform(1.0, 5.0))
        t = np.arange(int(seconds * rate)) / rate
        audio = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 2000) * t) + 0.05 * rng.standard_normal(t.size)
        soundfile.write(folder / f"{index:05d}.{suffix}", audio.astype(np.float32), rate, subtype="PCM_16")
        total += t.size / rate
    return total


def model_folder(name: str, where: Path) -> str:
    if name not in ("base", "small"):
        return name
    torch.manual_seed(0)
    # random weights: speed does not depend on them
    model = ATSTModel(ModelConfig("frame", EncoderConfig.of_size(name, cls_token=False)))
    return str(save_pretrained(model, where / name))


def _zeros(*shape: int) -> torch.Tensor:
    """Zeros at no cost (calloc'd pages, not filled by torch's threads: on a GPU the outputs are copied back)."""
    return torch.from_numpy(np.zeros(shape, np.float32))


class StandIn:
    """What atst-embed's pipeline calls of a model, computing nothing: the sizes of a real model (``shapes``),
    zeros for the embeddings. The pipeline around it is then timed alone: how fast this host feeds a device."""

    def __init__(self, shapes: ATSTModel) -> None:
        self.shapes, self.depth = shapes, shapes.depth
        self.num_frame_embeddings, self.num_windows = shapes.num_frame_embeddings, shapes.num_windows
        self.frame_embedding_size = shapes.frame_embedding_size

    def get_clip_embedding(self, audio, n_blocks: int | None = None, batch_size: int = 32) -> torch.Tensor:
        return _zeros(len(audio) if isinstance(audio, list) else 1, self.shapes.clip_embedding_size(n_blocks))

    def get_frame_embeddings(self, waves: list, n_blocks: int | None = None, batch_size: int = 32):
        frames = [_zeros(self.num_frame_embeddings(len(wave)), self.frame_embedding_size(n_blocks)) for wave in waves]
        return frames, [self.shapes._timestamps(len(piece)) for piece in frames]

    def get_embeddings(self, waves: list, n_blocks: int | None = None, batch_size: int = 32):
        return (self.get_clip_embedding(waves, n_blocks), *self.get_frame_embeddings(waves, n_blocks))

    def iter_frame_embeddings(self, waveform, n_blocks: int | None = None, batch_size: int = 32):
        (frames,), (stamps,) = self.get_frame_embeddings([waveform], n_blocks)
        yield 0, frames, stamps


def _per_file(seconds: float, files: int) -> float:
    return 1000 * seconds / files


def outputs_in(folder: Path, stand_in: StandIn, args):
    """Where atst-embed would write with ``--format`` and ``-d folder``."""
    metadata = {"model": args.model, "n_blocks": stand_in.depth}
    if args.format == "tar":
        return ShardOutputs(folder, metadata, per_shard=1000)
    return FileOutputs(args.format, metadata, tuple(LEVEL_KEYS[args.level]), output_dir=folder)


def stage_times(items: list, stand_in: StandIn, args, scratch: Path) -> dict[str, float | None]:
    """Milliseconds per file of each host stage, each alone in this process: decode (at the file's rate),
    resample (to 16 kHz), front end (CPU, ``--batch-size`` files padded together), host-to-device copy (pinned,
    one per batch; None on a CPU) and writing the outputs of ``--level`` in ``--format``."""
    times = dict.fromkeys(["decode", "resample", "front end", "copy", "write"], 0.0)
    waves = []
    for item in items:
        started = time.perf_counter()
        native, info = load_audio(item.path, target_rate=None)
        decoded = time.perf_counter()
        waves.append(torch.from_numpy(resample(native, info.sample_rate, SAMPLE_RATE)))
        times["decode"] += decoded - started
        times["resample"] += time.perf_counter() - decoded
    device = torch.device(args.device)
    groups = [waves[first : first + args.batch_size] for first in range(0, len(waves), args.batch_size)]
    with torch.inference_mode():
        for group in groups:
            started = time.perf_counter()
            stand_in.shapes.frontend(torch.nn.utils.rnn.pad_sequence(group, batch_first=True),
                                     torch.tensor([len(wave) for wave in group]))
            times["front end"] += time.perf_counter() - started
            if device.type == "cuda":  # as ATSTModel._prepare does
                started = time.perf_counter()
                pinned = torch.empty(sum(len(wave) for wave in group), pin_memory=True)
                torch.cat(group, out=pinned).to(device, non_blocking=True)
                torch.cuda.synchronize(device)
                times["copy"] += time.perf_counter() - started
    if device.type != "cuda":
        times["copy"] = None
    outputs = outputs_in(scratch, stand_in, args)
    for item, wave in zip(items, waves):
        clip, frames, stamps = stand_in.get_embeddings([wave])
        arrays = {"clip": clip[0]} if args.level != "frame" else {}
        if args.level != "clip":
            arrays.update(frame=frames[0], timestamps=stamps[0])
        started = time.perf_counter()
        outputs.write(item, arrays, None)
        times["write"] += time.perf_counter() - started
    started = time.perf_counter()
    outputs.close()
    times["write"] += time.perf_counter() - started
    return {stage: None if total is None else _per_file(total, len(items)) for stage, total in times.items()}


def pipeline_times(stand_in: StandIn, folder: Path, out: Path, workers: int, args) -> tuple[float, float, float]:
    """Seconds of atst-embed's pipeline (``embed_items``) over ``folder`` with ``workers`` decoding workers: wall
    time, CPU time of this process and CPU time of the workers (robust to other load on a shared machine)."""
    items = find_inputs([str(folder)], None)
    run = Run(len(items), quiet=True)
    before, started = os.times(), time.perf_counter()
    embed_items(stand_in, items, run, outputs_in(out, stand_in, args), args.level, stand_in.depth, args.batch_size,
                workers)
    elapsed, after = time.perf_counter() - started, os.times()
    run.bar.close()
    assert run.done == len(items), f"{run.failed} of {len(items)} files failed"
    return (elapsed, after.user + after.system - before.user - before.system,
            max(0.0, after.children_user + after.children_system - before.children_user - before.children_system))


def host_ceiling(args) -> None:
    """``--stand-in``: the pipeline alone per kind of file and number of workers, and each stage alone."""
    print(f"machine: {machine()}")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {describe_peaks(matmul_peaks())}")
    shapes = (ATSTModel(ModelConfig("frame", EncoderConfig.of_size(args.model, cls_token=False)))
              if args.model in ENCODER_SIZES else load_model(args.model, device="cpu"))
    stand_in = StandIn(shapes)
    workers = [int(value) for value in args.workers.split(",")]
    print(f"{args.files} files of 1-5 s per kind; stand-in for {args.model} ({stand_in.depth} blocks, "
          f"clip size {shapes.clip_embedding_size()}), level {args.level}, format {args.format}, batch "
          f"{args.batch_size}; best of {args.repeats}. Pipeline: wall ms per file, CPU ms per file of the main process "
          "and of the workers. Stages: ms per file, each alone in one process")
    stages = ["decode", "resample", "front end", "copy", "write"]
    header = (f"{'files':<10} {'workers':>7} {'files/s':>8} {'audio-s/s':>10} {'vs 1':>5} {'ms/file':>8} {'main':>6} "
              f"{'workers':>7}  " + " ".join(f"{stage:>9}" for stage in stages))
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory(dir=args.scratch) as scratch:
        scratch = Path(scratch)
        for suffix in args.suffixes.split(","):
            for rate in [int(value) for value in args.rates.split(",")]:
                name = f"{suffix} {rate / 1000:g}k"
                folder = scratch / f"{suffix}{rate}"
                folder.mkdir()
                seconds = write_files(folder, args.files, rate=rate, suffix=suffix)
                (scratch / "stages").mkdir()
                stage = stage_times(find_inputs([str(folder)], None), stand_in, args, scratch / "stages")
                shutil.rmtree(scratch / "stages")
                cells = " ".join(f"{'n/a':>9}" if stage[key] is None else f"{stage[key]:9.3f}" for key in stages)
                rates = {}
                for count in workers:
                    runs = []
                    for _ in range(args.repeats):
                        (scratch / "out").mkdir()
                        runs.append(pipeline_times(stand_in, folder, scratch / "out", count, args))
                        shutil.rmtree(scratch / "out")
                    elapsed, main, children = (_per_file(value, args.files) for value in min(runs))
                    rates[count] = 1000 / elapsed
                    versus = f"{rates[count] / rates[1]:5.2f}" if 1 in rates else f"{'-':>5}"
                    print(f"{name:<10} {count:>7} {rates[count]:8.0f} {seconds / args.files * rates[count]:10.0f} "
                          f"{versus} {elapsed:8.3f} {main:6.3f} {children:7.3f}  {cells}", flush=True)


def compare_with_model(args) -> None:
    """The default mode: atst-embed against the model alone on the same audio."""
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
        method = {"clip": model.get_clip_embedding, "frame": model.get_frame_embeddings,
                  "both": model.get_embeddings}[args.level]
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
            print(f"atst-embed --jobs {jobs}: {cli:8.1f} audio-s/s, {cli / model_only:.2f} of the model alone  "
                  f"({summary})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stand-in", action="store_true",
                        help="time the pipeline alone, with a model that computes nothing")
    parser.add_argument("--files", type=int, default=None,
                        help="files (per kind with --stand-in) [default: 2000; 1000]")
    parser.add_argument("--model", default="base", help="base / small (random weights) or any load_model source; "
                        "with --stand-in, its sizes (also mini)")
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--level", default="clip", choices=["clip", "frame", "both"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--jobs", default="1", help="atst-embed --jobs values to time, comma-separated (e.g. 1,2)")
    parser.add_argument("--format", default="npz", choices=[*FORMATS, "tar"], help="--stand-in: output format")
    parser.add_argument("--workers", default="0,1,2", help="--stand-in: decoding workers to time, comma-separated")
    parser.add_argument("--rates", default="16000,44100", help="--stand-in: sample rates of the files (Hz)")
    parser.add_argument("--suffixes", default="wav,flac", help="--stand-in: file formats")
    parser.add_argument("--repeats", type=int, default=2, help="--stand-in: best of this many runs")
    parser.add_argument("--scratch", default=None, help="--stand-in: folder for the files and outputs (e.g. /dev/shm, "
                        "to take the disk out) [default: the system's temporary folder]")
    args = parser.parse_args()
    args.files = args.files or (1000 if args.stand_in else 2000)
    if args.stand_in:
        host_ceiling(args)
    else:
        compare_with_model(args)


if __name__ == "__main__":
    main()
