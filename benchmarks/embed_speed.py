"""Embedding speed: audio-seconds embedded per wall-clock second.

Runs ATST-Frame small and base (random weights: speed does not depend on their values) on
8 x 10 s clips and on one 60 s clip, for frame embeddings (all 12 blocks) and clip embeddings,
and prints the machine, torch version and thread count with every figure. The "one window per
pass" column runs the same work with ``batch_size=1`` (one 10 s window per encoder call, as the
reference's chunk loop does), so the ratio shows what batching the windows buys.

    python benchmarks/embed_speed.py [--device cpu|cuda] [--dtype float32|bfloat16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch

from atst_features.encoder import EncoderConfig
from atst_features.model import ATSTModel, ModelConfig


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            names = [line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}"


def timed(run, repeats: int, device: torch.device) -> float:
    run()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)

    print(f"machine: {machine()}")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {device}, dtype {args.dtype}")
    if device.type == "cuda":
        print(f"gpu: {torch.cuda.get_device_name(device)}")
    rng = np.random.default_rng(0)
    workloads = {
        "8 x 10 s": (0.1 * rng.standard_normal((8, 160_000))).astype(np.float32),
        "1 x 60 s": (0.1 * rng.standard_normal((1, 960_000))).astype(np.float32),
    }
    header = f"{'model':<7} {'workload':<9} {'output':<6} {'audio-s/s':>10} {'one window per pass':>20} {'ratio':>6}"
    print(header)
    print("-" * len(header))
    for size in ("small", "base"):
        torch.manual_seed(0)
        model = ATSTModel(ModelConfig("frame", EncoderConfig.of_size(size, cls_token=False)))
        model = model.to(device=device, dtype=dtype).eval()
        for name, audio in workloads.items():
            seconds = audio.size / 16_000
            for output in ("frame", "clip"):
                method = model.get_frame_embeddings if output == "frame" else model.get_clip_embedding
                batched = timed(lambda method=method, audio=audio: method(audio, n_blocks=12), args.repeats, device)
                single = timed(lambda method=method, audio=audio: method(audio, n_blocks=12, batch_size=1),
                               args.repeats, device)
                print(
                    f"{size:<7} {name:<9} {output:<6} {seconds / batched:>10.1f} {seconds / single:>20.1f} "
                    f"{single / batched:>6.2f}"
                )


if __name__ == "__main__":
    main()
