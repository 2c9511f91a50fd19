"""Peak memory of the HEAR API on long inputs: 20 minutes of audio through ATST-Frame base.

Prints the peak resident memory (CPU) or peak allocated GPU memory, with the machine, for
get_timestamp_embeddings and get_scene_embeddings on one 20-minute sound at the default setting
(all 12 blocks). Weights are random: memory does not depend on their values.

    python benchmarks/hear_memory.py [--minutes 20] [--device cpu|cuda] [--size base]
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from atst_features import hear
from atst_features.encoder import EncoderConfig
from atst_features.config import ModelConfig
from atst_features.model import ATSTModel

from embed_speed import machine


def peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", default="base", choices=["small", "base"])
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"machine: {machine()}; torch {torch.__version__}, threads {torch.get_num_threads()}, device {device}")
    torch.manual_seed(0)
    model = hear.HearModel(ATSTModel(ModelConfig("frame", EncoderConfig.of_size(args.size, cls_token=False)))).to(device)
    audio = (torch.rand(1, int(args.minutes * 60 * 16000), generator=torch.Generator().manual_seed(0)) * 2 - 1).to(device)
    print(f"input: 1 sound of {args.minutes:g} min; ATST-Frame {args.size}, n_blocks={model.n_blocks}")
    print(f"after loading: peak {peak_mb(device):,.0f} MB")
    start = time.perf_counter()
    embeddings, timestamps = hear.get_timestamp_embeddings(audio, model)
    print(
        f"get_timestamp_embeddings: {tuple(embeddings.shape)} ({embeddings.numel() * 4 / 2**20:,.0f} MB of output) "
        f"in {time.perf_counter() - start:.1f} s; peak {peak_mb(device):,.0f} MB"
    )
    del embeddings, timestamps
    start = time.perf_counter()
    scene = hear.get_scene_embeddings(audio, model)
    print(f"get_scene_embeddings: {tuple(scene.shape)} in {time.perf_counter() - start:.1f} s; peak {peak_mb(device):,.0f} MB")


if __name__ == "__main__":
    main()
