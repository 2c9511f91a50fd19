"""Run ATST in ONNX Runtime with the front end in numpy: no PyTorch needed at inference.

    python examples/onnx_runtime.py [MODEL] [AUDIO_FILE]

Exports MODEL's encoder (default: atst-frame-mini, packaged, offline) to a temporary ONNX file,
computes the log-mel spectrogram in numpy, runs the graph on each 10 s window and compares the frame
embeddings with atst-features' own. (Or put the front end in the graph: atst-export MODEL out.onnx
--frontend, and feed 16 kHz waveforms.)
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

try:
    import onnxruntime
    import onnxscript  # noqa: F401  (export_onnx's)
except ImportError:
    sys.exit('error: this example needs the onnx extra: pip install -e ".[onnx]" (in the atst-features checkout)')

from atst_features import example_audio, load_model
from atst_features.audio import load_audio
from atst_features.export import export_onnx

EXAMPLE = example_audio()
RATE, N_FFT, HOP, N_MELS, F_MIN, F_MAX = 16000, 1024, 160, 64, 60.0, 7800.0
DB_MIN, DB_MAX, TOP_DB = -79.6482, 50.6842, 80.0
WINDOW_FRAMES = 1000  # 10 s: the positional table's 250 tokens x 4 frames


def mel_filters() -> np.ndarray:
    """HTK triangular mel filters without area normalisation, [n_fft // 2 + 1, n_mels]."""
    hz_to_mel = lambda hz: 2595.0 * np.log10(1.0 + hz / 700.0)  # noqa: E731
    edges = 700.0 * (10.0 ** (np.linspace(hz_to_mel(F_MIN), hz_to_mel(F_MAX), N_MELS + 2) / 2595.0) - 1.0)
    freqs = np.linspace(0.0, RATE / 2, N_FFT // 2 + 1)
    rising = (freqs[:, None] - edges[None, :-2]) / (edges[1:-1] - edges[:-2])
    falling = (edges[None, 2:] - freqs[:, None]) / (edges[2:] - edges[1:-1])
    return np.clip(np.minimum(rising, falling), 0.0, None)


def log_mel(audio: np.ndarray) -> np.ndarray:
    """16 kHz mono float samples [N] -> normalised log-mel [n_mels, 1 + N // 160], as the model expects."""
    padded = np.pad(audio.astype(np.float64), N_FFT // 2, mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP]
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)  # periodic Hann
    power = np.abs(np.fft.rfft(frames * window, axis=-1)) ** 2
    db = 10.0 * np.log10(np.maximum(power @ mel_filters(), 1e-10))
    db = np.maximum(db, db.max() - TOP_DB)  # the floor: 80 dB below this clip's loudest bin
    return ((db - DB_MIN) / (DB_MAX - DB_MIN) * 2.0 - 1.0).T.astype(np.float32)


def main() -> None:
    source = sys.argv[1] if len(sys.argv) > 1 else "atst-frame-mini"
    audio = load_audio(sys.argv[2] if len(sys.argv) > 2 else EXAMPLE)[0]  # decoded, mono, 16 kHz
    model = load_model(source, device="cpu")
    with tempfile.TemporaryDirectory() as folder:
        path = export_onnx(model, Path(folder) / "encoder.onnx")
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    mel = log_mel(audio)
    pieces = []
    for first in range(0, mel.shape[1], WINDOW_FRAMES):
        window = mel[:, first : first + WINDOW_FRAMES]
        if window.shape[1] < 4:  # less than one token left
            break
        feeds = {"mel": window[None], "n_tokens": np.array([window.shape[1] // 4], dtype=np.int64)}
        pieces.append(session.run(["frames"], feeds)[0][0])
    frames = np.concatenate(pieces)
    expected = model.get_frame_embeddings(audio)[0][0].numpy()
    print(f"{len(audio) / RATE:.2f} s of audio -> ONNX frame embeddings {frames.shape}")
    print(f"largest difference to atst-features: {np.abs(frames - expected).max():.1e}")


if __name__ == "__main__":
    main()
