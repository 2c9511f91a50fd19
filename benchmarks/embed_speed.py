"""Embedding speed: audio-seconds per second, ours in every precision and, given a checkout of the
official code, the official frame-embedding path, measured side by side in one run.

Frame embeddings of all 12 blocks of ATST-Frame (random weights: speed does not depend on their
values) on ``--workloads`` (default 8 x 10 s and 1 x 60 s; on a GPU also batches of 32-256 windows),
best of ``--repeats`` rounds that run every path in turn. Printed with every figure: the machine, the
torch version and threads, and the matmul peaks of fp32, bf16 (and fp16 on CUDA) measured in the same
run (CPUs here differ, and shared machines vary from hour to hour, so compare ratios, not absolute
figures). The "% of peak" column divides the model's floating-point work (about 4.5 GFLOP per
audio-second for base) by the time and by the peak of the precision's matmul dtype: the best of the
run's start and of the workload's rounds, in which that dtype's peak product runs in turn with the
paths. "cosine" is the minimum per-frame cosine similarity to our fp32 frames.

The official path (``--reference PATH``, a checkout of github.com/Audio-WestlakeU/audiossl; its code
is imported from there, never copied here) is what ``atstframe/embedding.py ::
get_timestamp_embedding`` does: torchaudio's MelSpectrogram and AmplitudeToDB, MinMax scaling, then
``FrameAST.get_intermediate_layers(n=12, scene=False)`` on 1001-frame chunks.

    python benchmarks/embed_speed.py [--reference ~/audiossl] [--size base] [--threads 2] [--device cpu|cuda]
        [--workloads 8x10,1x60] [--profile 25]

``--profile N`` then prints, per workload and path, the N operators that take the most time in one run
(torch.profiler, with input shapes): how to compare our path with the official one op by op.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
import types
from functools import partial

import numpy as np
import torch

from atst_features.encoder import EncoderConfig
from atst_features.config import ModelConfig
from atst_features.model import ATSTModel
from atst_features.precision import PRECISIONS, cpu_multiplies_fast


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            names = [line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CPU = torch.device("cpu")


def timed(run, repeats: int, device: torch.device = CPU) -> float:
    """Best wall time of ``repeats`` runs after one warm-up."""
    return timed_in_turn([run], repeats, device)[0]


def timed_in_turn(runs: list, repeats: int, device: torch.device = CPU) -> list[float]:
    """Best wall time of each of ``runs``, after one warm-up each, over ``repeats`` rounds that run
    them in turn: a load that comes and goes on a shared machine slows every path alike, where timing
    one path after the other would charge it to whichever ran at the time."""
    for run in runs:
        run()
    best = [float("inf")] * len(runs)
    for _ in range(repeats):
        for index, run in enumerate(runs):
            _sync(device)
            start = time.perf_counter()
            run()
            _sync(device)
            best[index] = min(best[index], time.perf_counter() - start)
    return best


def profile_table(run, rows: int, device: torch.device) -> str:
    """The ``rows`` operators (with their input shapes) that take the most time in one ``run``."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        run()
        _sync(device)
    return prof.key_averages(group_by_input_shape=True).table(
        sort_by=f"self_{device.type}_time_total", row_limit=rows, max_name_column_width=40, max_shapes_column_width=60)


SLOW_PEAK = 5.0  # GFLOP/s: below this at 512, a dtype has no fast kernels here and is timed at 512 only


def _product(size: int, dtype: torch.dtype, device: torch.device):
    """A product of two square matrices of ``size``, and its floating-point work."""
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    return (lambda: a @ b), 2 * size**3


def _matmul_peak(size: int, dtype: torch.dtype, device: torch.device, repeats: int) -> float:
    product, work = _product(size, dtype, device)
    return work / timed(product, repeats, device) / 1e9


def _peak_size(device: torch.device) -> int:
    return 8192 if device.type == "cuda" else 2048


def matmul_peaks(device: torch.device = CPU) -> dict[torch.dtype, float]:
    """Matmul throughput (GFLOP/s) per dtype of square products (2048 on CPU, 8192 on GPU), best of 5:
    fp32 and bf16, and fp16 on CUDA. A dtype slower than ``SLOW_PEAK`` at 512 (bf16 on CPUs without
    AVX512: about 0.3 GFLOP/s) is reported at 512, which takes seconds where 2048 takes minutes."""
    size = _peak_size(device)
    dtypes = (torch.float32, torch.bfloat16) + ((torch.float16,) if device.type == "cuda" else ())
    peaks = {}
    for dtype in dtypes:
        probe = _matmul_peak(512, dtype, device, 1)
        peaks[dtype] = probe if probe < SLOW_PEAK else _matmul_peak(size, dtype, device, 5)
    return peaks


def describe_peaks(peaks: dict[torch.dtype, float]) -> str:
    fp32 = peaks[torch.float32]
    return "matmul peaks: " + ", ".join(f"{str(dtype).removeprefix('torch.')} {peak:.{0 if peak >= 10 else 2}f} GFLOP/s "
                                        f"({peak / fp32:.{1 if peak >= 0.1 * fp32 else 3}f}x)" for dtype, peak in peaks.items())


def parse_workloads(text: str) -> dict[str, tuple[int, float]]:
    """``"8x10,1x60"`` -> {"8 x 10 s": (8, 10.0), "1 x 60 s": (1, 60.0)}."""
    workloads = {}
    for item in text.split(","):
        count, _, seconds = item.strip().partition("x")
        workloads[f"{int(count)} x {float(seconds):g} s"] = (int(count), float(seconds))
    return workloads


def flop_per_audio_second(config: EncoderConfig, tokens: int = 250) -> float:
    """Floating-point work of the encoder per second of audio (25 tokens): per token and block,
    24 D^2 for the linear layers and 4 L D for attention over ``tokens`` tokens."""
    per_token = config.depth * (2 * (4 * config.embed_dim**2 + 2 * config.embed_dim * config.mlp_hidden_dim)
                                + 4 * tokens * config.embed_dim)
    return 25 * per_token


def reference_runner(path: str, size: str, device: torch.device):
    """The official frame-embedding path, imported from a checkout at ``path``."""
    import torchaudio

    sys.path.insert(0, os.path.abspath(path))
    threads = torch.get_num_threads()
    # The official package imports fairseq for pretraining masks only; inference never calls it.
    stub = types.ModuleType("fairseq.data.data_utils")
    stub.compute_mask_indices = None
    for name in ("fairseq", "fairseq.data"):
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules.setdefault("fairseq.data.data_utils", stub)
    from audiossl.methods.atstframe import audio_transformer

    torch.set_num_threads(threads)  # audiossl/__init__.py sets OMP/MKL threads to 1 in the environment
    encoder = getattr(audio_transformer, f"FrameAST_{size}")().to(device).eval()
    melspec = torchaudio.transforms.MelSpectrogram(16000, f_min=60, f_max=7800, hop_length=160, win_length=1024,
                                                   n_fft=1024, n_mels=64).to(device)
    to_db = torchaudio.transforms.AmplitudeToDB(stype="power", top_db=80)

    def run(audio: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            mel = (to_db(melspec(audio[:, None])) + 79.6482) / (50.6842 + 79.6482) * 2.0 - 1.0
            chunks = []
            for start in range(0, mel.shape[-1], 1001):
                chunk = mel[..., start : start + 1001]
                lengths = torch.full((mel.shape[0],), chunk.shape[-1], device=device)
                chunks.append(encoder.get_intermediate_layers(chunk, lengths, n=12, scene=False))
            return torch.cat(chunks, dim=1)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", metavar="PATH", help="a checkout of github.com/Audio-WestlakeU/audiossl")
    parser.add_argument("--size", default="base", choices=["small", "base"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workloads", default=None, help="comma-separated COUNTxSECONDS (default: 8x10,1x60; "
                        "on CUDA 8x10,32x10,128x10,256x10,1x60)")
    parser.add_argument("--batch-size", type=int, default=None, help="our windows per encoder pass (default: all "
                        "windows of the workload, at least 32; the official loop passes the whole batch at once)")
    parser.add_argument("--precisions", default=None, help="comma-separated (default: fp32,bf16,bf16-mixed, "
                        "fp32 alone on CPUs without fast bf16 kernels; on CUDA also fp16,fp16-mixed)")
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="after each workload, the N operators "
                        "that take the most time in each path (torch.profiler, one run)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    fast_bf16 = device.type == "cuda" or cpu_multiplies_fast(torch.bfloat16)
    precisions = (args.precisions or ("fp32,bf16,bf16-mixed" if fast_bf16 else "fp32")
                  + (",fp16,fp16-mixed" if device.type == "cuda" and not args.precisions else "")).split(",")

    print(f"machine: {machine()}")
    if device.type == "cuda":
        print(f"gpu: {torch.cuda.get_device_name(device)}")
    workloads = parse_workloads(args.workloads or ("8x10,32x10,128x10,256x10,1x60" if device.type == "cuda" else "8x10,1x60"))
    peaks = matmul_peaks(device)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {device}; {describe_peaks(peaks)}")
    if not fast_bf16 and not args.precisions:
        print("this CPU has no fast bfloat16 kernels (no AVX512): bf16 paths skipped (--precisions fp32,bf16 times them)")
    rng = np.random.default_rng(0)
    config = EncoderConfig.of_size(args.size, cls_token=False)
    work = flop_per_audio_second(config)
    print(f"ATST-Frame {args.size}: {work / 1e9:.2f} GFLOP per audio-second; frame embeddings of all 12 blocks; "
          f"best of {args.repeats} rounds that run every path in turn")
    torch.manual_seed(0)
    state = ATSTModel(ModelConfig("frame", config)).state_dict()
    header = f"{'workload':<11} {'path':<21} {'audio-s/s':>10} {'vs official fp32':>17} {'% of peak':>10} {'cosine':>8}"
    print(header)
    print("-" * len(header))
    reference = reference_runner(args.reference, args.size, device) if args.reference else None
    products = {dtype: _product(_peak_size(device), dtype, device)
                for dtype, peak in peaks.items() if peak >= SLOW_PEAK}
    models = {}
    for precision in precisions:
        model = ATSTModel(ModelConfig("frame", config))
        model.load_state_dict(state)
        models[precision] = model.to(device).eval().set_precision(precision)
    for name, (count, duration) in workloads.items():
        audio = torch.from_numpy((0.1 * rng.standard_normal((count, round(duration * 16000)))).astype(np.float32))
        seconds = audio.numel() / 16000
        audio = audio.to(device)
        batch_size = args.batch_size or max(32, count * math.ceil(duration / 10))
        paths = {f"ours {precision}": partial(model.get_frame_embeddings, audio, batch_size=batch_size)
                 for precision, model in models.items()}
        if reference is not None:
            paths = {"official fp32": partial(reference, audio), **paths}
        # The fast dtypes' peak products run in the same rounds: a peak read at another time of a shared
        # machine's day would misstate the "% of peak" of these paths.
        runs = [product for product, _ in products.values()] + list(paths.values())
        times = timed_in_turn(runs, args.repeats, device)
        now = {**peaks, **{dtype: max(peaks[dtype], flop / taken / 1e9)
                           for (dtype, (_, flop)), taken in zip(products.items(), times)}}
        elapsed = dict(zip(paths, times[len(products):]))
        baseline = seconds / elapsed["official fp32"] if reference is not None else None
        fp32_frames = None
        for path, run in paths.items():
            cosine, peak = None, now[torch.float32]
            if path.startswith("ours"):
                precision = path.removeprefix("ours ")
                frames = run()[0].float()
                fp32_frames = frames if precision == "fp32" else fp32_frames
                if fp32_frames is not None:
                    cosine = torch.nn.functional.cosine_similarity(frames, fp32_frames, dim=-1).min().item()
                peak = now[PRECISIONS[precision][0] or torch.float32]
            speed = seconds / elapsed[path]
            versus = f"{speed / baseline:.2f}x" if baseline else "-"
            print(f"{name:<11} {path:<21} {speed:>10.1f} {versus:>17} {100 * speed * work / 1e9 / peak:>9.0f}% "
                  f"{'-' if cosine is None else f'{cosine:.5f}':>8}")
        print(f"{'':<11} {describe_peaks(now)} (the best of the start and these rounds)")
        for path, run in paths.items() if args.profile else ():
            print(f"\n{name}, {path}: the {args.profile} operators that take the most time\n"
                  f"{profile_table(run, args.profile, device)}")


if __name__ == "__main__":
    main()
