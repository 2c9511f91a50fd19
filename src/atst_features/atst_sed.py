"""ATST-SED's head stack (Shao, Li, Li, "Fine-tune the pretrained ATST model for sound event detection",
ICASSP 2024; github Audio-WestlakeU/ATST-SED): the DCASE CRNN's convolutional branch on a mel
spectrogram of its own, fused with the ATST-Frame tokens, a bidirectional GRU, and strong and weak
(attention-pooled) outputs. It is a frame-level head of :data:`~atst_features.heads.HEADS` (kind
``"atst-sed"``) that reads the window's audio besides the encoder's tokens.

What its stage-2 configuration computes at test time, in our own code:

- **CRNN front end**: 128-bin HTK mel filters (0-8000 Hz, no normalisation) on the magnitude of a
  centred (reflect-padded) STFT of 2048 samples with a symmetric Hamming window and a hop of 256
  samples (16 ms); ``20 log10(max(x, 1e-5))``; clamped to [-50, 80] dB; then each clip scaled to
  [0, 1] by its own minimum and maximum over all bins and frames (``(x - min) / (max - min + 1e-8)``).
- **CNN**: seven blocks of a 3 x 3 convolution, BatchNorm (eps 1e-3), context gating
  (``x * sigmoid(W x + b)`` across channels) and average pooling over (time, mel) by (2, 2), (2, 2),
  then (1, 2) five times: 16, 32, 64, 128, 128, 128, 128 channels; 128 features every 64 ms.
- **Fusion**: the last block's ATST-Frame tokens (40 ms) averaged onto the CNN's frames
  (``adaptive_avg_pool1d``, when the counts differ), concatenated after the CNN's features, and
  mapped to 128 by a Linear layer.
- **BiGRU**: two layers of 128 units each way; then ``strong = sigmoid(Linear(256, C))`` per frame and
  attention weights ``softmax(Linear(256, C))`` over the classes, clamped to [1e-7, 1], for the weak
  (clip-level) output ``sum_t strong * w / sum_t w``.

One output frame covers 4 STFT frames: 1024 samples (64 ms), centred 384 samples (24 ms) after its
start; a 10 s window gives 156 frames. Its weight names follow the reference's modules (``cnn.cnn.*``,
``rnn.rnn.*``, ``cat_tf``, ``dense``, ``dense_softmax``), so a checkpoint's head reads unchanged.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn

from .frontend import FrontendConfig, mel_filterbank
from .heads import weak_pooling

__all__ = ["AtstSedHead", "CrnnFrontend"]

CHANNELS = (16, 32, 64, 128, 128, 128, 128)
POOLS = ((2, 2), (2, 2), (1, 2), (1, 2), (1, 2), (1, 2), (1, 2))  # (time, mel)
RNN_UNITS = 128


class CrnnFrontend(nn.Module):
    """``[B, N]`` waveforms at 16 kHz -> ``[B, 128, 1 + N // 256]`` scaled log-mel (see the module docstring)."""

    n_fft, hop_length, n_mels = 2048, 256, 128

    def __init__(self) -> None:
        super().__init__()
        # Computed when first used, per device, in float32 (not buffers: neither saved nor cast by .to(dtype))
        self._constants: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def _window_and_filters(self, device: torch.device) -> tuple[Tensor, Tensor]:
        if device not in self._constants:
            config = FrontendConfig(n_fft=self.n_fft, win_length=self.n_fft, hop_length=self.hop_length,
                                    n_mels=self.n_mels, f_min=0.0, f_max=8000.0)
            with torch.device("cpu"):
                window = torch.hamming_window(self.n_fft, periodic=False, dtype=torch.float64).float()
                filters = mel_filterbank(config)  # [n_fft // 2 + 1, n_mels]
            self._constants[device] = (window.to(device), filters.to(device))
        return self._constants[device]

    def forward(self, waveforms: Tensor) -> Tensor:
        window, filters = self._window_and_filters(waveforms.device)
        with torch.autocast(waveforms.device.type, enabled=False):  # float32 whatever the module's dtype
            spectrum = torch.stft(waveforms.float(), self.n_fft, hop_length=self.hop_length, window=window,
                                  center=True, pad_mode="reflect", return_complex=True)
            mel = torch.matmul(filters.T, spectrum.abs())
            db = (20.0 * torch.log10(mel.clamp(min=1e-5))).clamp(-50.0, 80.0)
            low = db.amin(dim=(1, 2), keepdim=True)
            return (db - low) / (db.amax(dim=(1, 2), keepdim=True) - low + 1e-8)


class _ContextGating(nn.Module):
    """``x * sigmoid(W x + b)`` across the channels of ``[B, C, T, F]``. In the channels-last layout the
    CNN runs in, the channel axis is innermost: the Linear layer reads the map as it lies, no copy."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.linear = nn.Linear(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        gate = self.linear(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return gate.sigmoid_().mul_(x)


class _Convolutions(nn.Module):
    """The CNN branch, its blocks named as the reference's (``cnn.conv0``, ``cnn.batchnorm0``, ``cnn.cg0``, ...)."""

    def __init__(self) -> None:
        super().__init__()
        layers = OrderedDict()
        for index, (channels, pool) in enumerate(zip(CHANNELS, POOLS)):
            before = 1 if index == 0 else CHANNELS[index - 1]
            layers[f"conv{index}"] = nn.Conv2d(before, channels, 3, 1, 1)
            layers[f"batchnorm{index}"] = nn.BatchNorm2d(channels, eps=0.001, momentum=0.99)
            layers[f"cg{index}"] = _ContextGating(channels)
            layers[f"pooling{index}"] = nn.AvgPool2d(pool)
        self.cnn = nn.Sequential(layers)

    def forward(self, mel: Tensor) -> Tensor:
        """``[B, 128, T]`` -> ``[B, T // 4, 128]``, in the channels-last layout (convolutions, gating and
        pooling all about twice as fast on a CPU as channels-first). Out of training, each BatchNorm is
        folded into the convolution before it (one pass over the map less)."""
        x = mel.transpose(1, 2).unsqueeze(1).contiguous(memory_format=torch.channels_last)  # [B, 1, T, 128]
        for index in range(len(CHANNELS)):
            conv, norm = getattr(self.cnn, f"conv{index}"), getattr(self.cnn, f"batchnorm{index}")
            if self.training:
                x = norm(conv(x))
            else:
                scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
                bias = (conv.bias - norm.running_mean) * scale + norm.bias
                weight = (conv.weight * scale[:, None, None, None]).contiguous(memory_format=torch.channels_last)
                x = nn.functional.conv2d(x, weight, bias, padding=1)
            x = getattr(self.cnn, f"pooling{index}")(getattr(self.cnn, f"cg{index}")(x))
        return x.squeeze(-1).permute(0, 2, 1)  # [B, C, T // 4, 1] -> [B, T // 4, C]


class _BiGru(nn.Module):
    def __init__(self, inputs: int) -> None:
        super().__init__()
        self.rnn = nn.GRU(inputs, RNN_UNITS, num_layers=2, bidirectional=True, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.rnn(x)[0]


class AtstSedHead(nn.Module):
    """ATST-SED's CNN, fusion, BiGRU and strong/weak outputs on top of an ATST-Frame encoder of width
    ``dim``, for ``num_classes`` classes (see the module docstring). As a frame-level head:
    ``frame_outputs(tokens [B, P, dim], audio [B, N]) -> (strong [B, T, C], attention [B, T, C])``
    with ``T = n_frames(N)``."""

    frame_samples = 1024  # one output frame: 4 STFT hops of 256 samples (64 ms)
    frame_offset_samples = 384  # its centre, after its start (24 ms)

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.frontend = CrnnFrontend()
        self.cnn = _Convolutions()
        self.cat_tf = nn.Linear(CHANNELS[-1] + dim, CHANNELS[-1])
        self.rnn = _BiGru(CHANNELS[-1])
        self.dense = nn.Linear(2 * RNN_UNITS, num_classes)
        self.dense_softmax = nn.Linear(2 * RNN_UNITS, num_classes)

    def n_frames(self, n_samples: int) -> int:
        """Output frames for ``n_samples`` samples: the CNN's time pooling of ``1 + N // 256`` STFT frames."""
        return (1 + int(n_samples) // CrnnFrontend.hop_length) // 2 // 2

    def frame_outputs(self, tokens: Tensor, audio: Tensor) -> tuple[Tensor, Tensor]:
        features = self.cnn(self.frontend(audio))  # [B, T, 128]
        tokens = tokens.transpose(1, 2)  # [B, dim, P]
        if tokens.shape[-1] != features.shape[1]:
            tokens = nn.functional.adaptive_avg_pool1d(tokens, features.shape[1])
        x = self.rnn(self.cat_tf(torch.cat([features, tokens.transpose(1, 2)], dim=-1)))
        strong = torch.sigmoid(self.dense(x))
        weights = torch.softmax(self.dense_softmax(x), dim=-1).clamp(1e-7, 1.0)
        return strong, weights

    def pool(self, strong: Tensor, weights: Tensor) -> Tensor:
        return weak_pooling(strong, weights)
