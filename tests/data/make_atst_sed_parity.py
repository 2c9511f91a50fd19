"""Writes what ATST-SED's own code computes, for ``tests/test_detectors.py``: its stage-2 model
(``CRNN`` of ``desed_task/nnet/CRNN_e2e.py``, github Audio-WestlakeU/ATST-SED, the code of
``Stage2_wo_ext.ckpt``) with the stage-2 configuration, its ATST-Frame made small (2 blocks of width
128; every other layer and all the computation are the released model's), weights from
``recipe.py`` in the layout of its Lightning checkpoint (``sed_student.*``, ``sed_teacher.*``: the
teacher is what its ``inference.py`` runs), on recipe waveforms as its test step sees them: each 10 s
window zero-padded to 10 s, its CRNN features (``SEDTransform``, ``take_log``, the instance min-max
``TorchScaler``) and ATST features (``ATSTTransform`` then ``ATSTNorm``, which its ``inference.py``
forgets: issue 30) computed from that window alone; long audio in windows every 3 s as its
``inference.py`` cuts it.

Not run by the tests (it imports the fetched code, which is not part of this project). With torch,
torchaudio, einops and pandas installed:

    python tests/data/make_atst_sed_parity.py --reference path/to/ATST-SED

writes ``tests/data/formats/atst_sed_small.json`` (the checkpoint's keys and shapes) and
``tests/data/expected_atst_sed_small.npz`` (``<case>/starts``: window starts in samples;
``<case>/strong``: ``[windows, 10, 156]``; ``<case>/weak``: ``[windows, 10]``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import tempfile
import types
from functools import partial
from pathlib import Path

import numpy as np
import torch
from reference_checkout import reference_checkout  # beside this script

HERE = Path(__file__).parent
CASES = {"a_4s": (4.0, 1, 1.0), "b_10s": (10.0, 3, 1.0), "c_23s": (23.3, 4, 1.0), "d_4s_quiet": (4.0, 5, 1e-3)}
WINDOW, HOP = 160_000, 48_000
NET = dict(n_in_channel=1, nclass=10, activation="cg", dropout=0.5, rnn_type="BGRU", n_RNN_cell=128, n_layers_RNN=2,
           dropout_recurrent=0, kernel_size=[3] * 7, padding=[1] * 7, stride=[1] * 7,
           nb_filters=[16, 32, 64, 128, 128, 128, 128], pooling=[[2, 2], [2, 2]] + [[1, 2]] * 5)


def _module_from(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    root = reference_checkout(__doc__.splitlines()[0], "Audio-WestlakeU/ATST-SED")
    sys.modules.setdefault("h5py", types.ModuleType("h5py"))  # imported, never used, by its datasets module
    import recipe
    from desed_task.nnet import CRNN_e2e
    from desed_task.nnet.atst import atst_model
    from desed_task.nnet.atst.audio_transformer import FrameAST
    from torchaudio.transforms import AmplitudeToDB

    from desed_task.dataio.datasets_atst_sed import ATSTNorm, ATSTTransform, SEDTransform

    scaler_module = _module_from(root / "desed_task" / "utils" / "scaler.py", "atst_sed_scaler")

    def small_frame_ast(atst_dropout=0.0, **kwargs):
        return FrameAST(patch_h=64, patch_w=4, embed_dim=128, depth=2, num_heads=2, qkv_bias=False,
                        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), drop_path_rate=atst_dropout,
                        drop_rate=atst_dropout, **kwargs)

    atst_model.FrameASTModel = small_frame_ast
    with tempfile.TemporaryDirectory() as folder:  # its loader insists on a pretrained ATST-Frame file
        init = os.path.join(folder, "atst.ckpt")
        torch.save({"state_dict": {f"encoder.encoder.{k}": v for k, v in small_frame_ast().state_dict().items()}}, init)
        model = CRNN_e2e.CRNN(unfreeze_atst_layer=14, embedding_size=128, atst_init=init, atst_dropout=0.0, **NET)

    keys = [(k, list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in model.state_dict().items()]
    entries = [(f"{branch}.{k}", shape, dtype) for branch in ("sed_student", "sed_teacher") for k, shape, dtype in keys]
    hyper = {"net": {key: value for key, value in NET.items()}, "feats": {"n_mels": 128, "n_filters": 2048,
             "hop_length": 256, "n_window": 2048, "sample_rate": 16000, "f_min": 0, "f_max": 8000}}
    (HERE / "formats").mkdir(exist_ok=True)
    (HERE / "formats" / "atst_sed_small.json").write_text(json.dumps(
        {"source": "github Audio-WestlakeU/ATST-SED, CRNN (stage 2) with ATST-Frame 2 x 128", "state_dict": entries,
         "hyper_parameters": hyper, "pytorch-lightning_version": "1.9.0"}, indent=1) + "\n", encoding="utf-8")
    teacher = {k: torch.from_numpy(recipe.tensor_for(f"sed_teacher.{k}", shape)) for k, shape, _ in keys}
    model.load_state_dict(teacher, strict=True)
    model.eval()

    sed_mel = SEDTransform(hyper["feats"])
    amplitude_to_db = AmplitudeToDB(stype="amplitude")
    amplitude_to_db.amin = 1e-5
    scaler = scaler_module.TorchScaler("instance", "minmax", [1, 2])
    atst_mel, atst_norm = ATSTTransform(), ATSTNorm()

    expected = {}
    for case, (seconds, seed, gain) in CASES.items():
        audio = torch.from_numpy(recipe.waveform(seconds, seed) * gain)
        starts = []
        for start in range(0, len(audio), HOP):
            starts.append(start)
            if start + WINDOW >= len(audio):
                break
        strong, weak = [], []
        for start in starts:
            window = torch.nn.functional.pad(audio[start : start + WINDOW], (0, max(0, start + WINDOW - len(audio))))[None]
            with torch.no_grad():
                features = scaler(amplitude_to_db(sed_mel(window)).clamp(min=-50, max=80))
                out_strong, out_weak = model(features, atst_norm(atst_mel(window)))
            strong.append(out_strong[0].numpy())
            weak.append(out_weak[0].numpy())
        expected[f"{case}/starts"] = np.array(starts)
        expected[f"{case}/strong"] = np.stack(strong)
        expected[f"{case}/weak"] = np.stack(weak)
    np.savez_compressed(HERE / "expected_atst_sed_small.npz", **expected)
    print({key: value.shape for key, value in expected.items()})


if __name__ == "__main__":
    main()
