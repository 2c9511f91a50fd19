"""Writes what the ATST authors' own code computes with their two fine-tuned ATST-Frame models, for
``tests/test_detectors.py`` and ``tests/test_taggers.py`` (github Audio-WestlakeU/audiossl):

- the AudioSet-strong detector (the file of audiossl issue 12): ``utils_as_strong/model_as_strong.py``'s
  ``FineTuningPLModule`` around ``comparison_models/frame_atst_module.py``'s ``FrameATSTPredModule``, as
  ``train_as_strong.py`` builds it; its evaluation transform (``FreezingTransform(max_len=10)``: the
  spectrogram of the clip itself, unpadded) and its ``validation_step``'s ``self.head(self.encoder(batch))``:
  frame probabilities ``[classes, tokens]``. Its transform keeps only the central 10 s of a longer clip;
  for the 23.3 s case its same code runs on each 1001-frame window of the whole clip's spectrogram,
  every 1000 frames (the last one shorter), as long audio runs here.
- the AudioSet-2M tagger (``atst_as2M.ckpt`` of the ATST-SED README): ``downstream/model.py``'s
  ``FineTuningPLModule`` around ``PretrainedEncoderPLModule`` with ``n_last_blocks`` 1, as
  ``train_finetune.py`` builds it; its evaluation transform (``FinetuneEvalTransform``: the central 12 s)
  and its ``test_step``'s ``self.head(self.encoder(batch))``: logits ``[classes]``.

Both encoders are made small (2 blocks of width 128, 12 classes; every computation is theirs), weights
from ``recipe.py``. Imports their code never uses on these paths (fairseq's masking, their dataset,
metric and PSDS helpers, transformers' AdamW) are stood in for by empty modules.

Not run by the tests (it imports the fetched code, which is not part of this project). With torch,
torchaudio, torchvision, einops, pytorch_lightning, pandas and PyYAML installed:

    python tests/data/make_audiossl_finetuned_parity.py --reference path/to/audiossl

writes ``tests/data/formats/audiossl_{as_strong,as2m}_small.json`` (checkpoint keys, shapes and
hyper-parameters) and ``tests/data/expected_audiossl_{as_strong,as2m}_small.npz``.
"""

from __future__ import annotations

import json
import sys
import tempfile
import types
from functools import partial
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from reference_checkout import reference_checkout  # beside this script

HERE = Path(__file__).parent
STRONG_CASES = {"a_3s": (3.0, 1), "b_10s": (10.0, 3), "c_23s": (23.3, 4)}
TAG_CASES = {"a_3s": (3.0, 1), "b_10s": (10.0, 3), "c_11s": (11.0, 6), "d_23s": (23.3, 4)}
CLASSES, WIDTH, CHUNK, HOP = 12, 128, 1001, 1000
UNUSED = ("fairseq", "timm", "timm.models", "timm.models.layers", "fairseq.data", "fairseq.data.data_utils", "transformers", "transformers.optimization",
          "audiossl.datasets", "audiossl.datasets.as_strong_utils", "audiossl.datasets.as_strong_utils.as_strong_dict",
          "audiossl.datasets.dcase_utils", "audiossl.methods.atst.downstream.utils",
          "audiossl.methods.atstframe.downstream.utils", "audiossl.methods.atstframe.downstream.utils_psds_eval",
          "audiossl.methods.atstframe.downstream.utils_psds_eval.evaluation",
          "audiossl.methods.atstframe.downstream.utils_psds_eval.psds",
          "audiossl.methods.atstframe.downstream.utils_psds_eval.gpu_decode")


def _stand_in(name: str) -> types.ModuleType:
    """A module whose every name is a do-nothing callable (only ever constructed, never used here)."""
    module = types.ModuleType(name)
    module.__path__ = []
    module.__getattr__ = lambda attribute: mock.MagicMock(name=f"{name}.{attribute}")
    return module


def _small(frame_ast):
    return partial(frame_ast, patch_h=64, patch_w=4, embed_dim=WIDTH, depth=2, num_heads=2, qkv_bias=False,
                   norm_layer=partial(torch.nn.LayerNorm, eps=1e-6))


def _with_recipe_weights(module: torch.nn.Module, recipe) -> list:
    entries = [(key, list(value.shape), str(value.dtype).removeprefix("torch."))
               for key, value in module.state_dict().items()]
    module.load_state_dict({key: torch.from_numpy(recipe.tensor_for(key, shape)) for key, shape, _ in entries})
    return entries


def _write_format(name: str, source: str, entries: list, hyper: dict) -> None:
    hyper = {key: value for key, value in hyper.items() if isinstance(value, (int, float, str, bool)) or value is None}
    (HERE / "formats" / f"{name}.json").write_text(json.dumps(
        {"source": source, "pytorch-lightning_version": "1.9.0", "hyper_parameters": hyper, "state_dict": entries},
        indent=1) + "\n", encoding="utf-8")


def as_strong(root: Path, recipe) -> None:
    from audiossl.methods.atstframe.downstream.comparison_models import frame_atst_module
    from audiossl.methods.atstframe.downstream.comparison_models.models import frame_atst
    from audiossl.methods.atstframe.downstream.utils_as_strong.model_as_strong import FineTuningPLModule

    frame_atst.FrameAST_base = _small(frame_atst.FrameAST)  # looked up when FrameATST builds its encoders
    with tempfile.TemporaryDirectory() as folder:  # FrameATSTPredModule loads a pretrained ATST-Frame file
        init = Path(folder) / "frame.ckpt"
        encoder = _small(frame_atst.FrameAST)()
        torch.save({"state_dict": {f"encoder.encoder.{k}": v for k, v in encoder.state_dict().items()},
                    "hyper_parameters": {"arch": "base"}}, init)
        wrapper = frame_atst_module.FrameATSTPredModule(str(init), dataset_name="as_strong")
    conf = root / "audiossl/methods/atstframe/downstream/utils_as_strong/conf/frame_40.yaml"
    model = FineTuningPLModule(encoder=wrapper, learning_rate=0.5, max_epochs=1, niter_per_epoch=1, warmup_epochs=0,
                               num_labels=CLASSES, dcase_conf=str(conf), multi_label=True)
    entries = _with_recipe_weights(model, recipe)
    model.eval()
    hyper = {**model.hparams, "dcase_conf": str(conf.relative_to(root))}
    _write_format("audiossl_as_strong_small", "github Audio-WestlakeU/audiossl, utils_as_strong FineTuningPLModule("
                  "FrameATSTPredModule), ATST-Frame 2 x 128, 12 classes", entries, hyper)

    def strong(mel: torch.Tensor) -> np.ndarray:
        batch = ((mel, torch.tensor([mel.shape[-1]])), None)
        with torch.no_grad():
            tokens, _ = model.encoder(batch)
            return model.head(tokens)[0].numpy()  # [classes, tokens]

    expected = {}
    for case, (seconds, seed) in STRONG_CASES.items():
        audio = torch.from_numpy(recipe.waveform(seconds, seed))[None]
        if audio.shape[-1] <= 160_000:
            mel, _ = wrapper.transform(audio)  # FreezingTransform: the central 10 s (here: all of it)
            expected[f"{case}/strong"] = strong(mel)
        else:  # its transform's spectrogram of the whole clip, in windows
            mel = wrapper.transform.mel_feature(audio)
            pieces = [strong(mel[..., start : start + CHUNK]) for start in range(0, mel.shape[-1] - CHUNK + HOP, HOP)]
            expected[f"{case}/strong"] = np.concatenate([p[:, : HOP // 4] for p in pieces[:-1]] + [pieces[-1]], axis=1)
    np.savez_compressed(HERE / "expected_audiossl_as_strong_small.npz", **expected)
    print("as_strong", {key: value.shape for key, value in expected.items()})


def as2m(recipe) -> None:
    from audiossl.methods.atstframe import audio_transformer
    from audiossl.methods.atstframe.downstream.model import FineTuningPLModule, PretrainedEncoderPLModule
    from audiossl.methods.atstframe.downstream.transform import FinetuneEvalTransform

    encoder = _small(audio_transformer.FrameAST)()
    encoder.hyper_param = {"anchor_len": 10}  # its pretraining hyper-parameter: 1001-frame chunks
    model = FineTuningPLModule(encoder=PretrainedEncoderPLModule(encoder, 6.0, 1), learning_rate=0.5, max_epochs=11,
                               niter_per_epoch=1, warmup_epochs=2, num_labels=CLASSES, multi_label=True,
                               mixup_training=True)
    entries = _with_recipe_weights(model, recipe)
    model.eval()
    _write_format("audiossl_as2m_small", "github Audio-WestlakeU/audiossl, atstframe downstream FineTuningPLModule("
                  "PretrainedEncoderPLModule), ATST-Frame 2 x 128, 12 classes", entries, dict(model.hparams))
    transform = FinetuneEvalTransform()
    expected = {}
    for case, (seconds, seed) in TAG_CASES.items():
        mel, length = transform(torch.from_numpy(recipe.waveform(seconds, seed))[None])
        with torch.no_grad():
            embedding, _ = model.encoder(((mel[None], torch.tensor([length])), None))
            expected[f"{case}/logits"] = model.head(embedding)[0].numpy()
    np.savez_compressed(HERE / "expected_audiossl_as2m_small.npz", **expected)
    print("as2m", {key: value.shape for key, value in expected.items()})


def main() -> None:
    root = reference_checkout(__doc__.splitlines()[0], "Audio-WestlakeU/audiossl")
    for name in UNUSED:
        sys.modules[name] = _stand_in(name)
    import recipe

    (HERE / "formats").mkdir(exist_ok=True)
    as_strong(root, recipe)
    as2m(recipe)


if __name__ == "__main__":
    main()
