"""Clip and frame embeddings of a real recording, offline, with the model that ships in the package.

    python examples/quickstart.py [MODEL] [AUDIO_FILE]

MODEL: a registry name (default atst-frame-mini, packaged: no download), a model folder or an
official checkpoint file (see docs/models.md). AUDIO_FILE: any file libsndfile reads (WAV,
FLAC, OGG, MP3, ...); default: the recording that ships in the package, `example_audio()` (10.5 s of
speech at 8 kHz, CC BY-SA 3.0, see atst_features/data/audio/LICENSE.md).
"""

import sys

from atst_features import example_audio, get_clip_embedding, get_frame_embeddings, load_model

source = sys.argv[1] if len(sys.argv) > 1 else "atst-frame-mini"
audio = sys.argv[2] if len(sys.argv) > 2 else example_audio()

model = load_model(source)  # CUDA when available, else CPU
print(f"{model.kind} model, width {model.embed_dim}, {model.depth} blocks, on {model.device}")

clip = get_clip_embedding(audio, model)  # [1, clip_embedding_size()]: all blocks; decoded, resampled to 16 kHz
frames, timestamps = get_frame_embeddings(audio, model, n_blocks=1)  # [1, T, D] and [1, T] in ms
print("clip embedding:", tuple(clip.shape))
print("frame embeddings:", tuple(frames.shape), "first timestamps (ms):", timestamps[0, :3].tolist())
