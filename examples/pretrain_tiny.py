"""Pretrain a tiny ATST-Frame on your own audio, export it, and embed with it (CPU, under a minute).

    python examples/pretrain_tiny.py [AUDIO_FOLDER]

Without AUDIO_FOLDER, 24 synthetic clips are written to a temporary folder. For real runs use a
paper preset (atst-train --list-presets) on a GPU machine; see docs/training.md.
"""

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import soundfile

from atst_features import load_model

try:
    import lightning  # noqa: F401  (atst-train's; checked here, so that without it this is one line)
except ImportError:
    sys.exit('error: this example needs the train extra: pip install -e ".[train]" (in the atst-features checkout)')

scratch = tempfile.TemporaryDirectory(prefix="atst-tiny-")  # removed when the script ends
work = Path(scratch.name)
if len(sys.argv) > 1:
    audio = Path(sys.argv[1])
else:
    audio = work / "audio"
    audio.mkdir()
    rng = np.random.default_rng(0)
    for index in range(24):
        t = np.arange(int(16000 * rng.uniform(2, 5))) / 16000
        tone = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 2000) * t) * (1 + np.sin(2 * np.pi * rng.uniform(0.5, 3) * t))
        soundfile.write(audio / f"clip{index:02d}.wav", (tone + 0.02 * rng.standard_normal(t.size)).astype(np.float32), 16000)

# 1. 30 steps of the tiny preset (checkpoints and logs under work/runs/frame-tiny)
subprocess.run(["atst-train", "frame", "--config", "frame-tiny", "--data.path", str(audio),
                "--trainer.enable_progress_bar", "false"], cwd=work, check=True)
# 2. export the EMA teacher encoder as a model folder
checkpoint = work / "runs" / "frame-tiny" / "checkpoints" / "last.ckpt"
subprocess.run(["atst-convert", str(checkpoint), str(work / "my-atst-frame")], check=True)
# 3. use it like any other model
model = load_model(work / "my-atst-frame", device="cpu")
frames, timestamps = model.get_frame_embeddings(next(audio.glob("*.wav")), n_blocks=model.depth)
print(f"trained model: width {model.embed_dim}, {model.depth} blocks; frames {tuple(frames.shape)}")
print(f"outputs in {work}")
