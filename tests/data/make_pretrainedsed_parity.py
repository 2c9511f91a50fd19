"""Writes what PretrainedSED's own code computes, for ``tests/test_detectors.py``: its ATST-Frame
strong model (``PredictionsWrapper(ATSTWrapper())``, github fschmid56/PretrainedSED, the code of its
``ATST-F_strong_1.pt``) made small (2 blocks of width 128, 12 classes; the layout and every
computation are the released model's), weights from ``recipe.py``, run on three recipe waveforms as its ``inference.py``
runs a file (also a quiet one): 10 s chunks, the last zero-padded, each through ``mel_forward`` and the model on its own,
the strong outputs concatenated, then a sigmoid.

Not run by the tests (it imports the fetched code, which is not part of this project). With torch,
torchaudio and einops installed:

    python tests/data/make_pretrainedsed_parity.py --reference path/to/PretrainedSED

writes ``tests/data/formats/pretrainedsed_atst_frame_small.json`` (the checkpoint's keys and shapes:
a plain state dict, as the released file) and ``tests/data/expected_pretrainedsed_atst_frame_small.npz``
(``<case>/strong``: the probabilities ``[12, frames]`` of every chunk, padding included).
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import numpy as np
import torch
from reference_checkout import reference_checkout  # beside this script

HERE = Path(__file__).parent
CASES = {"a_3s": (3.0, 1, 1.0), "b_10s": (10.0, 3, 1.0), "c_23s": (23.3, 4, 1.0), "d_4s_quiet": (4.0, 5, 1e-3)}  # s, seed, gain


def main() -> None:
    reference_checkout(__doc__.splitlines()[0], "fschmid56/PretrainedSED")
    import recipe
    from models.atstframe.ATSTF_wrapper import ATSTWrapper
    from models.atstframe.audio_transformer import FrameAST
    from models.prediction_wrapper import PredictionsWrapper

    base = ATSTWrapper()
    base.atst = FrameAST(patch_h=64, patch_w=4, embed_dim=128, depth=2, num_heads=2, qkv_bias=False,
                         norm_layer=partial(torch.nn.LayerNorm, eps=1e-6))
    model = PredictionsWrapper(base, embed_dim=128, n_classes_strong=12)
    # The released file holds no mel buffers (its loader expects them missing): nor does ours.
    entries = [(key, list(value.shape), str(value.dtype).removeprefix("torch."))
               for key, value in model.state_dict().items() if "mel_transform" not in key]
    state = {key: torch.from_numpy(recipe.tensor_for(key, shape)) for key, shape, _ in entries}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("mel_transform" in key for key in missing)
    model.eval()
    (HERE / "formats").mkdir(exist_ok=True)
    (HERE / "formats" / "pretrainedsed_atst_frame_small.json").write_text(
        json.dumps({"source": "github fschmid56/PretrainedSED, PredictionsWrapper(ATSTWrapper()), 2 x 128, 12 classes",
                    "state_dict": entries}, indent=1) + "\n", encoding="utf-8")

    segment = 160_000
    expected = {}
    for case, (seconds, seed, gain) in CASES.items():  # a quiet clip: its dB clamp at -50 decides
        audio = torch.from_numpy(recipe.waveform(seconds, seed) * gain)[None]
        outputs = []
        for start in range(0, audio.shape[1], segment):
            chunk = audio[:, start : start + segment]
            chunk = torch.nn.functional.pad(chunk, (0, segment - chunk.shape[1]))
            with torch.no_grad():
                strong, _ = model(model.mel_forward(chunk))
            outputs.append(strong)
        expected[f"{case}/strong"] = torch.sigmoid(torch.cat(outputs, dim=2))[0].numpy()
    np.savez_compressed(HERE / "expected_pretrainedsed_atst_frame_small.npz", **expected)
    print({key: value.shape for key, value in expected.items()})


if __name__ == "__main__":
    main()
