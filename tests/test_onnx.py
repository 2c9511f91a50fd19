"""ONNX export: ONNX Runtime reproduces the PyTorch frame embeddings (skipped without onnxruntime)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import waveform

pytest.importorskip("onnxscript")
onnxruntime = pytest.importorskip("onnxruntime")

from atst_features import InputError, load_model  # noqa: E402
from atst_features.cli.tools import export  # noqa: E402
from atst_features.export import ConvLogMel, export_onnx  # noqa: E402

EXAMPLES = Path(__file__).parent.parent / "examples"


def session(path: Path):
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def mini():
    return load_model("atst-frame-mini", device="cpu")


@pytest.mark.slow
@pytest.mark.parametrize("seconds", [1.0, 3.7, 10.0])
def test_waveform_graph_equals_pytorch(mini, tmp_path_factory, seconds):
    path = tmp_path_factory.getbasetemp() / "mini-frontend.onnx"
    if not path.exists():
        export_onnx(mini, path, frontend=True)
    audio = waveform(seconds, 3)
    frames = session(path).run(["frames"], {"waveform": np.stack([audio, audio[::-1].copy()])})[0]
    for row, clip in enumerate([audio, audio[::-1].copy()]):
        expected = mini.get_frame_embeddings(clip)[0][0].numpy()
        assert frames[row].shape == expected.shape
        np.testing.assert_allclose(frames[row], expected, rtol=0, atol=1e-4)


@pytest.mark.slow
def test_encoder_graph_takes_padded_batches(clip_small, tmp_path):
    """ATST-Clip, last 2 blocks, a batch of 1 s, 3.7 s and 10 s padded to one length: the padded
    tokens are masked as in PyTorch; the CLS output comes too."""
    path = export_onnx(clip_small, tmp_path / "clip.onnx", n_blocks=2)
    clips = [waveform(seconds, 4) for seconds in (1.0, 3.7, 10.0)]
    padded = torch.nn.utils.rnn.pad_sequence([torch.from_numpy(c) for c in clips], batch_first=True)
    mel, n_frames = clip_small.frontend(padded, torch.tensor([len(c) for c in clips]))
    frames, cls = session(path).run(["frames", "cls"], {"mel": mel.numpy(), "n_tokens": (n_frames // 4).numpy()})
    expected = clip_small.get_frame_embeddings(clips, n_blocks=2)[0]
    for row, want in enumerate(expected):
        np.testing.assert_allclose(frames[row, : len(want)], want.numpy(), rtol=0, atol=1e-4)
    assert cls.shape == (3, 2 * 384)
    with torch.inference_mode():
        out = clip_small.encoder(mel, n_frames // 4, 2)
    np.testing.assert_allclose(cls, torch.cat(out.cls, -1).numpy(), rtol=0, atol=1e-4)


def test_conv_front_end_equals_the_stft_one(mini):
    audio = torch.from_numpy(np.stack([waveform(2.5, 5), waveform(2.5, 6)]))
    expected, _ = mini.frontend(audio)
    torch.testing.assert_close(ConvLogMel(mini.config.frontend)(audio), expected, rtol=0, atol=2e-4)


def test_export_refuses_16_bit_models(frame_small_ckpt, tmp_path):
    with pytest.raises(InputError, match="export a float32 model"):
        export_onnx(load_model(frame_small_ckpt, device="cpu", precision="bf16"), tmp_path / "x.onnx")


@pytest.mark.slow
def test_atst_export_command(tmp_path):
    out = tmp_path / "mini.onnx"
    result = CliRunner().invoke(export, ["atst-frame-mini", str(out), "--n-blocks", "1"])
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and "checked: onnxruntime's frame embeddings equal PyTorch's within" in result.output
    assert out.is_file() and not list(tmp_path.glob(".atst-*"))
    result = CliRunner().invoke(export, ["atst-frame-mini", str(out)])
    assert result.exit_code == 2 and "pass --overwrite" in result.output


@pytest.mark.slow
def test_onnx_runtime_example():
    result = subprocess.run([sys.executable, str(EXAMPLES / "onnx_runtime.py")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "10.51 s of audio -> ONNX frame embeddings (263, 1536)" in result.stdout
    difference = float(result.stdout.split("largest difference to atst-features: ")[1])
    assert difference < 1e-4
