"""ONNX export: the encoder (and optionally the front end) as one graph for ONNX Runtime and other stacks.

Two graphs, both with a dynamic batch and time axis, for one window of at most 10 s (the
positional table: 1000 spectrogram frames, 250 tokens); cut longer audio into 10 s windows as
:class:`~atst_features.ATSTModel` does.

- encoder only (default): inputs ``mel`` float32 ``[B, n_mels, T]`` (the normalised log-mel of
  :class:`~atst_features.frontend.LogMelFrontend`, or of the numpy recipe in ``examples/onnx_runtime.py``) and
  ``n_tokens`` int64 ``[B]`` (valid tokens per item, ``n_frames // 4``; the rest is padding);
- ``frontend=True``: inputs ``waveform`` float32 ``[B, N]`` at 16 kHz, every item ``N`` samples
  (513 <= N <= 160 000): the STFT runs as a convolution with the windowed DFT basis.

Outputs: ``frames`` ``[B, P, n_blocks * D]`` (the frame embeddings, blocks side by side, shallow to
deep), and for ATST-Clip ``cls`` ``[B, n_blocks * D]``.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from .errors import InputError
from .frontend import FrontendConfig, LogMelFrontend, mel_filterbank
from .model import ATSTModel

__all__ = ["ONNX_OPSET", "ConvLogMel", "check_onnx", "export_onnx"]

ONNX_OPSET = 18


class ConvLogMel(nn.Module):
    """The log-mel front end for equal-length batches, as operations every exporter knows: reflect
    padding, the STFT as a strided convolution with the Hann-windowed DFT basis, the mel filters, dB
    with the per-item floor (item maximum - top_db) and min-max scaling; items louder than
    ``LogMelFrontend.loud_samples`` through the same gain, so no finite input overflows. ``[B, N] -> [B, n_mels, 1 + N // hop]``;
    equal to :class:`~atst_features.frontend.LogMelFrontend` within float32 rounding."""

    def __init__(self, config: FrontendConfig) -> None:
        super().__init__()
        self.config = config
        n_fft, n_freqs = config.n_fft, config.n_fft // 2 + 1
        window = torch.hann_window(config.win_length, periodic=True, dtype=torch.float64)
        left = (n_fft - config.win_length) // 2
        window = nn.functional.pad(window, (left, n_fft - config.win_length - left))
        angles = 2 * math.pi * torch.arange(n_freqs, dtype=torch.float64)[:, None] * torch.arange(n_fft, dtype=torch.float64) / n_fft
        basis = torch.cat([torch.cos(angles), -torch.sin(angles)]) * window  # [2 * n_freqs, n_fft]
        self.register_buffer("basis", basis.to(torch.float32)[:, None, :], persistent=False)
        self.register_buffer("filters", mel_filterbank(config).T.contiguous(), persistent=False)  # [n_mels, n_freqs]

    def forward(self, waveform: Tensor) -> Tensor:
        cfg = self.config
        peak = waveform.abs().amax(dim=1, keepdim=True)
        gain = torch.where(peak > LogMelFrontend.loud_samples, peak, torch.ones_like(peak))  # [B, 1]
        padded = nn.functional.pad((waveform / gain)[:, None, :], (cfg.n_fft // 2, cfg.n_fft // 2), mode="reflect")
        spectrum = nn.functional.conv1d(padded, self.basis, stride=cfg.hop_length)  # [B, 2 * n_freqs, T]
        real, imag = spectrum.chunk(2, dim=1)
        mel = torch.matmul(self.filters, real.square() + imag.square())
        db = 10.0 * torch.log10(mel.clamp(min=1e-10)) + 20.0 * torch.log10(gain)[:, :, None]
        floor = db.amax(dim=(1, 2), keepdim=True) - cfg.top_db
        db = torch.maximum(db, floor)
        if cfg.clamp_db is not None:
            db = db.clamp(*cfg.clamp_db)
        return (db - cfg.db_min) / (cfg.db_max - cfg.db_min) * 2.0 - 1.0


class _Graph(nn.Module):
    def __init__(self, model: ATSTModel, n_blocks: int, frontend: bool) -> None:
        super().__init__()
        self.encoder = model.encoder
        self.frontend = ConvLogMel(model.config.frontend) if frontend else None
        self.n_blocks = n_blocks
        self.patch = model.config.encoder.patch_frames

    def forward(self, inputs: Tensor, n_tokens: Tensor | None = None):
        if self.frontend is not None:
            mel = self.frontend(inputs)
            n_tokens = torch.full((inputs.shape[0],), mel.shape[-1] // self.patch, dtype=torch.int64)
        else:
            mel = inputs
        out = self.encoder(mel, n_tokens, self.n_blocks)
        frames = torch.cat(out.tokens, dim=-1)
        return frames if out.cls is None else (frames, torch.cat(out.cls, dim=-1))


def export_onnx(model: ATSTModel, path: str | os.PathLike, *, n_blocks: int | None = None, frontend: bool = False,
                opset: int = ONNX_OPSET) -> Path:
    """Write ``model``'s encoder (with ``frontend=True`` also its front end) as an ONNX graph at
    ``path`` (see the module docstring for inputs and outputs); returns the path. ``n_blocks``: the
    last blocks returned side by side (default: all). Needs the ``onnx`` and ``onnxscript`` packages."""
    try:
        import onnxscript  # noqa: F401  (the exporter's dependency, imported late by torch)
    except ImportError:
        raise InputError("ONNX export needs onnx and onnxscript: pip install 'atst-features[onnx]'") from None
    n_blocks = model._check_n_blocks(n_blocks)
    if model.dtype != torch.float32 or model.precision not in (None, "fp32"):
        raise InputError("export a float32 model (load it without dtype= or precision=)")
    graph = _Graph(model, n_blocks, frontend).eval().cpu()
    batch = torch.export.Dim("batch", min=1, max=4096)
    config = model.config
    if frontend:
        samples = torch.export.Dim("samples", min=config.frontend.n_fft // 2 + 1, max=model.window_samples)
        example = (torch.zeros(2, 48_000),)
        dynamic = ({0: batch, 1: samples},)
        names, outputs = ["waveform"], ["frames"]
    else:
        frames = torch.export.Dim("frames", min=config.encoder.patch_frames, max=model.frame_window)
        example = (torch.zeros(2, config.frontend.n_mels, 300), torch.tensor([75, 60]))
        dynamic = ({0: batch, 2: frames}, {0: batch})
        names, outputs = ["mel", "n_tokens"], ["frames"]
    if config.encoder.cls_token:
        outputs.append("cls")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    exporter_log = logging.getLogger("torch.onnx")  # "torchvision is not installed" and other chatter
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(graph, example, dynamo=True, dynamic_shapes=dynamic, input_names=names,
                                        output_names=outputs, opset_version=opset, verbose=False)
            program.save(str(path))
    finally:
        exporter_log.setLevel(level)
    return path


def check_onnx(model: ATSTModel, path: str | os.PathLike, *, n_blocks: int | None = None, frontend: bool = False,
               seconds: tuple[float, ...] = (1.0, 3.7, 10.0), tolerance: float = 1e-4) -> float | None:
    """Run the graph at ``path`` in ONNX Runtime on noise of each length of ``seconds`` and compare
    its frame embeddings with ``model``'s; returns the largest difference (None without
    onnxruntime) and raises :class:`InputError` beyond ``tolerance``."""
    try:
        import onnxruntime
    except ImportError:
        return None
    import numpy as np

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    n_blocks = model._check_n_blocks(n_blocks)
    worst = 0.0
    for duration in seconds:
        audio = (0.1 * np.random.default_rng(0).standard_normal(int(duration * model.sample_rate))).astype(np.float32)
        expected = model.get_frame_embeddings(audio, n_blocks=n_blocks)[0][0].numpy()
        if frontend:
            feeds = {"waveform": audio[None]}
        else:
            mel, n_frames = model.frontend(torch.from_numpy(audio)[None])
            feeds = {"mel": mel.numpy(), "n_tokens": (n_frames // model.config.encoder.patch_frames).numpy()}
        got = session.run(["frames"], feeds)[0][0]
        worst = max(worst, float(np.abs(got - expected).max()))
    if worst > tolerance:
        raise InputError(f"{str(path)!r}: onnxruntime's frame embeddings differ from PyTorch's by {worst:.2e} "
                         f"(> {tolerance:g}); please report it")
    return worst
