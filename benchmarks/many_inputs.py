"""Many inputs: atst-embed's memory and start-up time with a manifest of a million paths.

Writes a manifest of ``--paths`` relative paths (``audio/dNNNN/fNNNNNNN.wav``, 1000 per folder), of
which only every ``--parts``-th in sorted order exists (0.5 s WAV files), then runs
``atst-embed --manifest M --shard 1/PARTS -d OUT`` with the packaged ``atst-frame-mini`` in a fresh
process: it lists, de-duplicates and sorts all the paths, takes its shard, checks which outputs
exist, and embeds the existing files. Printed: seconds until the first output file appears (listing
and model loading included), the whole run's seconds, and the peak resident memory of the run,
beside that of a process that only imports the command (torch included), so the difference is what
the paths cost. A second run of the same command (every output present: the resume check alone)
is timed too.

    python benchmarks/many_inputs.py [--paths 1000000] [--parts 1000] [--format npz|tar]
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile

sys.path.insert(0, str(Path(__file__).parent))
from embed_speed import machine  # noqa: E402


def _run(command: list[str], first_output_in: Path | None = None) -> tuple[float, float, float]:
    """Run ``command``; return the seconds until a visible file appears under ``first_output_in`` (nan
    without), the seconds it ran and its peak resident memory in MiB."""
    start = time.perf_counter()
    process = subprocess.Popen(command)
    first = float("nan")
    while first_output_in is not None and process.poll() is None:
        if first_output_in.is_dir() and any(not p.name.startswith(".") for p in first_output_in.rglob("*.*")):
            first = time.perf_counter() - start
            break
        time.sleep(0.05)
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status):
        sys.exit(f"failed: {' '.join(command)}")
    return first, time.perf_counter() - start, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--paths", type=int, default=1_000_000)
    parser.add_argument("--parts", type=int, default=1000)
    parser.add_argument("--format", default="npz")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        names = [f"audio/d{i // 1000:04d}/f{i:07d}.wav" for i in range(args.paths)]
        (scratch / "manifest.txt").write_text("\n".join(names) + "\n")
        tone = (0.1 * np.sin(np.arange(8000) / 10)).astype(np.float32)
        for name in sorted(names)[:: args.parts]:
            (scratch / name).parent.mkdir(parents=True, exist_ok=True)
            soundfile.write(scratch / name, tone, 16000)
        print(f"{args.paths} paths in the manifest, {len(names[:: args.parts])} of them exist (shard 1/{args.parts})")

        _, _, imports = _run([sys.executable, "-c", "import torch, atst_features.cli.embed"])
        out = scratch / "out"
        command = [sys.executable, "-m", "atst_features", "--manifest", str(scratch / "manifest.txt"), "--shard",
                   f"1/{args.parts}", "-d", str(out), "--model", "atst-frame-mini", "--device", "cpu", "--format",
                   args.format, "-q"]
        first, total, peak = _run(command, out)
        print(f"first output after {first:.1f} s, run {total:.1f} s; peak RSS {peak:.0f} MiB against {imports:.0f} MiB "
              f"for the imports alone: {peak - imports:.0f} MiB for {args.paths} paths")
        _, resumed, resumed_peak = _run(command)
        print(f"rerun with every output present: {resumed:.1f} s, peak RSS {resumed_peak:.0f} MiB")
        print(f"(peak RSS of this benchmark process itself: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB)")


if __name__ == "__main__":
    main()
