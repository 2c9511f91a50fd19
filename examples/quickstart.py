"""Clip and frame embeddings from an ATST checkpoint.

    python examples/quickstart.py CHECKPOINT [AUDIO_FILE]

CHECKPOINT: an official ATST-Frame / ATST-Clip / C2F checkpoint file (see the README for the
download links). AUDIO_FILE: any file libsndfile reads (WAV, FLAC, OGG, MP3, ...); without it,
a 3 s synthetic chirp is used.
"""

import sys

import numpy as np

from atst_features import get_clip_embedding, get_frame_embeddings, load_model

checkpoint = sys.argv[1]
model = load_model(checkpoint)  # CUDA when available, else CPU
print(f"{model.kind} model, width {model.embed_dim}, on {model.device}")

if len(sys.argv) > 2:
    audio, rate = sys.argv[2], None  # a path: decoded, downmixed and resampled to 16 kHz
else:
    rate = 16_000
    t = np.arange(3 * rate) / rate
    audio = (0.3 * np.sin(2 * np.pi * (200 + 400 * t) * t)).astype(np.float32)  # [48000]

clip = get_clip_embedding(audio, model, sample_rate=rate)  # [1, clip_embedding_size(12)]
frames, timestamps = get_frame_embeddings(audio, model, sample_rate=rate, n_blocks=1)  # [1, T, D], [1, T]
print("clip embedding:", tuple(clip.shape))
print("frame embeddings:", tuple(frames.shape), "first timestamps (ms):", timestamps[0, :3].tolist())
