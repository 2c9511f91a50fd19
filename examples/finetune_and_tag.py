"""Fine-tune atst-frame-mini on your own labelled audio, export it with its head, and tag with it (CPU).

    python examples/finetune_and_tag.py [MANIFEST_OR_LABEL_FOLDER]

The data: a CSV with ``path,label`` (optional ``split`` and ``group``), or ``root/<label>/*.wav``.
Without one, 40 synthetic clips of two classes (chirps and knocks) are written to a temporary
folder. Paper-scale runs use the ``finetune-*`` presets on a GPU machine (see docs/downstream.md).
"""

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import soundfile

from atst_features import load_model

scratch = tempfile.TemporaryDirectory(prefix="atst-finetune-")  # removed when the script ends
work = Path(scratch.name)
if len(sys.argv) > 1:
    data = Path(sys.argv[1])
else:
    data = work / "audio"
    rng = np.random.default_rng(0)
    for index in range(20):
        t = np.arange(int(16000 * rng.uniform(1.0, 2.0))) / 16000
        chirp = 0.3 * np.sin(2 * np.pi * (300 + rng.uniform(200, 800) * t) * t)
        knocks = np.sin(2 * np.pi * 90 * t) * np.exp(-30 * (t % rng.uniform(0.2, 0.4)))
        for label, audio in (("chirp", chirp), ("knock", 0.5 * knocks)):
            (data / label).mkdir(parents=True, exist_ok=True)
            soundfile.write(data / label / f"{index:02d}.wav", (audio + 0.01 * rng.standard_normal(t.size)).astype(np.float32), 16000)

# 1. Fine-tune: the reference protocol (layer-wise lr decay, SGD, cosine, clipping) at CPU scale.
subprocess.run(
    ["atst-train", "finetune", "--config", "finetune-tiny", "--data.manifest", str(data),
     "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"],
    cwd=work, check=True, stdout=subprocess.DEVNULL,
)
best = sorted((work / "runs/finetune-tiny/checkpoints").glob("epoch=*.ckpt"))[0]  # the best validation epoch

# 2. Export: a model folder whose config carries the head and the label names.
subprocess.run(["atst-convert", str(best), str(work / "tagger")], check=True, stdout=subprocess.DEVNULL)

# 3. Tag, from Python ...
model = load_model(work / "tagger", device="cpu")
print("labels:", list(model.labels))
clip = next(Path(data).rglob("*.wav"))
probabilities = model.get_tag_probabilities(str(clip))[0]
print(f"{clip.parent.name}/{clip.name}:", {label: round(float(p), 3) for label, p in zip(model.labels, probabilities)})

# ... or from the shell.
subprocess.run(["atst-tag", str(clip), "--model", str(work / "tagger"), "-k", "2", "-q"], check=True)
