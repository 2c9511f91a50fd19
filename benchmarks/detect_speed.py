"""Sound event detection speed and memory: ATST-SED against its ATST-Frame encoder alone on the same
audio, and the peak memory of a long file.

ATST-SED's head stack (a CNN on a mel spectrogram of its own, the fusion, a BiGRU, two heads) runs
beside the encoder: the time it adds is ``ATST-SED - encoder`` on the same 10 s windows (random
weights: speed does not depend on their values), reported as a share of the encoder's time, per
precision, best of ``--repeats``. Printed with the machine, torch's threads and the matmul peaks of the
same run (compare ratios: CPUs here differ, and shared machines vary from hour to hour).

``--hour`` also runs ``detect_events`` on one hour of noise (360 windows of 10 s every 10 s, or 1 200
every 3 s with ``--hop 3``) in a fresh process and prints its peak resident memory.

    python benchmarks/detect_speed.py [--windows 8] [--precisions fp32,bf16] [--hour] [--hop 10]
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys

import numpy as np
import torch
from embed_speed import describe_peaks, machine, matmul_peaks, timed

from atst_features.config import ModelConfig
from atst_features.encoder import EncoderConfig
from atst_features.frontend import FrontendConfig
from atst_features.model import ATSTModel
from atst_features.precision import cpu_multiplies_fast


def atst_sed(hop_seconds: float) -> ATSTModel:
    """ATST-SED's architecture (ATST-Frame base, its front end's dB clamp, 10 classes), random weights."""
    torch.manual_seed(0)
    config = ModelConfig("frame", EncoderConfig.of_size("base", cls_token=False), FrontendConfig(clamp_db=(-50.0, 80.0)),
                         num_classes=10, head_type="atst-sed", detection={"windows": "audio", "hop_seconds": hop_seconds})
    return ATSTModel(config).eval()


def encoder_alone(model: ATSTModel, audio: torch.Tensor) -> None:
    """What ATST-SED's ATST branch computes: the front end and the encoder's last block."""
    with torch.inference_mode():
        mel, _ = model.frontend(audio)
        with model._autocast():
            model.encoder(mel.to(model.dtype), None, 1)


def hour(hop_seconds: float) -> None:
    """One hour of noise through detect_events; prints the peak resident memory (MiB)."""
    model = atst_sed(hop_seconds)
    audio = np.random.default_rng(0).standard_normal(3600 * 16000, dtype=np.float32)
    audio *= 0.1
    events = model.detect_events(audio, batch_size=8)[0]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"1 hour, windows every {hop_seconds:g} s: {len(events)} events, peak resident memory {peak:.0f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=8, help="10 s windows per run")
    parser.add_argument("--precisions", default=None, help="comma-separated (default: fp32, and bf16 where fast)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--hour", action="store_true", help="also the peak memory of one hour (a fresh process)")
    parser.add_argument("--hop", type=float, default=10.0, help="--hour: seconds between windows")
    parser.add_argument("--hour-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.hour_only:
        hour(args.hop)
        return
    precisions = args.precisions.split(",") if args.precisions else ["fp32"] + (["bf16"] if cpu_multiplies_fast(torch.bfloat16) else [])
    print(machine())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {describe_peaks(matmul_peaks())}")
    audio = torch.from_numpy((0.1 * np.random.default_rng(1).standard_normal((args.windows, 160_000))).astype(np.float32))
    print(f"{args.windows} windows of 10 s; ATST-SED = its encoder (ATST-Frame base) + CNN, fusion, BiGRU and heads")
    print(f"{'precision':<10} {'encoder':>10} {'ATST-SED':>10} {'head share':>11}  audio-s/s (ATST-SED)")
    for precision in precisions:
        model = atst_sed(10.0).set_precision(precision)
        encoder = timed(lambda model=model: encoder_alone(model, audio), args.repeats)
        full = timed(lambda model=model: model.get_event_probabilities(list(audio), batch_size=args.windows), args.repeats)
        print(f"{precision:<10} {encoder:>9.3f}s {full:>9.3f}s {(full - encoder) / encoder:>10.1%}  "
              f"{args.windows * 10 / full:.1f}")
    if args.hour:
        subprocess.run([sys.executable, __file__, "--hour-only", "--hop", str(args.hop), "--threads", str(args.threads)],
                       check=True)


if __name__ == "__main__":
    main()
