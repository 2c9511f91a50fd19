"""The heads on top of an ATST encoder, each described once by a :class:`HeadSpec` in :data:`HEADS`.

A spec says what the rest of the package needs to know about one kind of head: the name configs
use (``head_type``), the module and how it is built from the encoder, what it reads (the last
block's clip embedding, or its frame tokens), which weight names identify it in a checkpoint, what
it gives, and its part of the model card. The model, checkpoint reading,
conversion, the model card, the commands and the training modules all read :data:`HEADS`, so a new
kind of head is one entry here and its training module.

- ``"clip"``: :class:`LinearHead`, the reference's head for linear evaluation, fine-tuning and C2F
  (tagging: ``get_tag_logits``, ``get_tag_probabilities``, ``atst-tag``);
- ``"events"``: :class:`EventHead`, its strong + weak head for sound event detection
  (``get_event_probabilities``, ``atst-detect``);
- ``"strong"``: :class:`StrongHead`, a per-token sigmoid Linear only (PretrainedSED's ATST-Frame
  and audiossl's AudioSet-strong models), whose clip-level probability is the highest frame's;
- ``"atst-sed"``: :class:`~atst_features.atst_sed.AtstSedHead`, ATST-SED's CNN, fusion, BiGRU and
  strong/weak outputs, which also reads the window's audio (``frame_outputs(tokens, audio)``) and
  gives a frame every 64 ms (its ``frame_samples``, ``frame_offset_samples`` and ``n_frames``).

A frame-level head maps tokens ``[B, T, D]`` to ``frame_outputs(tokens) -> (probabilities [B, T, C],
weights [B, T, C])``, pools such (possibly window-averaged) outputs into clip-level ones with
``pool(probabilities, weights) -> [B, C]`` (over the next-to-last axis), and gives
``forward(tokens, n_tokens) -> (strong [B, T, C], weak [B, C])``, padded tokens left out.

``data/audioset_labels.csv`` holds ``index, mid, display_name`` for the 527 AudioSet classes in the
order of Google's ``class_labels_indices.csv`` (the AudioSet ontology, CC BY 4.0,
https://research.google.com/audioset/), the order of every AudioSet head's outputs, C2F's included.
Its text was taken from the copy in github.com/srvk/TALNet (where spaces are written as
underscores) and checked against the copy in github.com/quentin-wang/audioset_classification.
``data/audioset_strong_447.csv`` holds the 447 AudioSet-strong classes of PretrainedSED's strong
models in the order of their outputs (its ``data_util/audioset_classes.py``:
``as_strong_train_classes``, the display names sorted), with the mids of its
``class_labels_indices_strong.csv``. ``data/audioset_strong_407.csv`` holds the 407 classes of the
ATST authors' AudioSet-strong model in the order of its outputs: the mids of the ``Labels`` list in
audiossl's commit e584998 (``Inference_audioset_strong.py``), the order the authors gave for their
checkpoint in the thread of their pull request 13 (not the sorted order that request first had;
sha256 of the mids joined by newlines ``31c5aef8...caf81``), named by the same file.
``data/desed.csv`` holds the 10 DESED classes in the order of ATST-SED's outputs (its
``train/local/classes_dict.py``), without mids.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Callable

import torch
from torch import Tensor, nn

__all__ = ["AUDIOSET_CLASSES", "HEADS", "EventHead", "HeadSpec", "LinearHead", "StrongHead", "audioset_labels",
           "default_labels", "head_of_weights", "label_file", "weak_pooling"]

AUDIOSET_CLASSES = 527


@lru_cache(maxsize=None)
def label_file(name: str) -> tuple[str, ...]:
    """The ``display_name`` column of ``atst_features/data/<name>.csv`` (``index, mid, display_name``)."""
    text = resources.files("atst_features").joinpath(f"data/{name}.csv").read_text(encoding="utf-8")
    return tuple(row["display_name"] for row in csv.DictReader(io.StringIO(text)))


def audioset_labels() -> tuple[str, ...]:
    """The 527 AudioSet display names, index 0 ("Speech") to 526 ("Field recording")."""
    return label_file("audioset_labels")


def default_labels(num_classes: int, *, audioset: bool) -> tuple[str, ...]:
    """Names for a head that came without any: AudioSet's for a 527-class C2F head, else ``class_0`` ..."""
    if audioset and num_classes == AUDIOSET_CLASSES:
        return audioset_labels()
    return tuple(f"class_{index}" for index in range(num_classes))


class LinearHead(nn.Module):
    """The reference's ``LinearHead``: BatchNorm1d without affine parameters, then a Linear layer
    (weights drawn from N(0, 0.01^2), zero bias). ``[B, dim]`` -> logits ``[B, num_classes]``."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False)
        self.linear = nn.Linear(dim, num_classes)
        nn.init.normal_(self.linear.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.norm(x))


class EventHead(nn.Module):
    """The reference's frame-level head for sound event detection (DESED, AudioSet-strong):
    ``strong``, a per-token sigmoid Linear; ``attention``, a Linear whose per-token softmax over the
    classes (clamped to [1e-7, 1]) weighs the strong probabilities into clip-level (weak) ones.
    Weights from N(0, 0.01^2), zero biases. ``norm``: standardise the tokens first with a
    BatchNorm1d without affine parameters, as LinearHead does (not in the reference; SGD on features
    with a large constant part, such as atst-frame-mini's, converges much faster with it)."""

    def __init__(self, dim: int, num_classes: int, norm: bool = False) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False) if norm else None
        self.strong = nn.Linear(dim, num_classes)
        self.attention = nn.Linear(dim, num_classes)
        for layer in (self.strong, self.attention):
            nn.init.normal_(layer.weight, mean=0.0, std=0.01)
            nn.init.zeros_(layer.bias)

    def frame_outputs(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """``tokens [B, T, D]`` -> strong probabilities and attention weights, both ``[B, T, C]``."""
        if self.norm is not None:
            tokens = self.norm(tokens.transpose(1, 2)).transpose(1, 2)
        strong = torch.sigmoid(self.strong(tokens))
        weights = torch.softmax(self.attention(tokens), dim=-1).clamp(1e-7, 1.0)
        return strong, weights

    def pool(self, strong: Tensor, weights: Tensor) -> Tensor:
        return weak_pooling(strong, weights)

    def forward(self, tokens: Tensor, n_tokens: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(strong [B, T, C], weak [B, C])`` probabilities; ``n_tokens [B]`` leaves padded tokens
        out of the weak pooling."""
        strong, weights = self.frame_outputs(tokens)
        return strong, self.pool(strong, weights * _valid_tokens(tokens, n_tokens)[..., None])


class StrongHead(nn.Module):
    """A per-token Linear with sigmoid outputs and nothing else, as PretrainedSED's ``strong_head`` and
    audiossl's AudioSet-strong ``LinearHead(use_norm=False)``: ``[B, T, D]`` -> ``[B, T, C]``. Its
    clip-level (weak) probability of a class is the class's highest frame probability. Weights from
    N(0, 0.01^2), zero bias."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, num_classes)
        nn.init.normal_(self.linear.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def frame_outputs(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        strong = torch.sigmoid(self.linear(tokens))
        return strong, torch.ones_like(strong)

    def pool(self, strong: Tensor, weights: Tensor) -> Tensor:
        """The highest probability over frames whose weight is not 0."""
        return strong.masked_fill(weights == 0, 0.0).amax(dim=-2)

    def forward(self, tokens: Tensor, n_tokens: Tensor | None = None) -> tuple[Tensor, Tensor]:
        strong, weights = self.frame_outputs(tokens)
        return strong, self.pool(strong, weights * _valid_tokens(tokens, n_tokens)[..., None])


def _valid_tokens(tokens: Tensor, n_tokens: Tensor | None) -> Tensor:
    """``[B, T]``: 1 for the first ``n_tokens`` tokens of each item (all of them without ``n_tokens``), else 0."""
    if n_tokens is None:
        return tokens.new_ones(tokens.shape[:2])
    positions = torch.arange(tokens.shape[1], device=tokens.device)[None, :]
    return (positions < n_tokens.to(tokens.device)[:, None]).to(tokens.dtype)


def weak_pooling(strong: Tensor, weights: Tensor) -> Tensor:
    """Attention pooling over time: ``sum_t strong * weights / sum_t weights`` (``[..., T, C]`` -> ``[..., C]``)."""
    return (strong * weights).sum(dim=-2) / weights.sum(dim=-2)


@dataclass(frozen=True)
class HeadSpec:
    """One kind of head (see the module docstring).

    ``kind``: its ``head_type`` in configs; ``level``: ``"clip"`` (reads the last block's clip
    embedding, predicts per clip) or ``"frame"`` (reads the last block's frame tokens, predicts per
    token); ``build(input_size, num_classes, norm)``: a new head; ``marker``: a weight name only this
    kind has (its first dimension is the number of classes); ``optional_norm``: ``norm`` (standardise
    the input) is an option recorded in ``head_norm``, detected from ``norm.running_mean``;
    ``title``, ``outputs`` and ``how_to_get``: words for messages;
    ``predict(model, audio)``: its output on ``audio``, compared when a conversion is verified;
    ``card``: its model card section, a template of ``{classes}``, ``{shown}`` (label names) and
    ``{activation}``. ``reads_audio``: the head also reads each window's waveform, so its model runs
    windows cut from the audio (:mod:`atst_features.detection`); ``detection``: detection settings
    every model with this head takes unless its config says otherwise. ``layouts``: the checkpoint
    layouts that hold this kind, in words, for messages about a file that holds another.
    """

    kind: str
    level: str
    build: Callable[[int, int, bool], nn.Module]
    marker: str
    optional_norm: bool
    title: str
    outputs: str
    how_to_get: str
    predict: Callable
    card: str
    reads_audio: bool = False
    detection: dict = field(default_factory=dict)
    layouts: str = "an atst-features model folder with such a head"

    def new(self, encoder, num_classes: int, norm: bool = False) -> nn.Module:
        """A freshly initialised head of this kind on ``encoder`` (an :class:`~atst_features.encoder.EncoderConfig`)."""
        size = encoder.clip_embedding_size(1) if self.level == "clip" else encoder.embed_dim
        return self.build(size, num_classes, norm)

    def classes_in(self, weights: dict[str, Tensor]) -> int:
        return int(weights[self.marker].shape[0])

    def norm_in(self, weights: dict[str, Tensor]) -> bool:
        """Whether these weights of a head of this kind standardise its input (``head_norm``)."""
        return self.optional_norm and "norm.running_mean" in weights


_TAGGING_CARD = """
## Tagging

A linear head of {classes} classes{shown}; probabilities by {activation}:

```python
probabilities = model.get_tag_probabilities("audio.wav")   # [1, {classes}], in the order of model.labels
```

From the shell: `atst-tag audio.wav --model path/to/this/folder -k 5`.
"""

_DETECTION_CARD = """
## Sound event detection

An event head of {classes} classes{shown}: per 40 ms token, a sigmoid
probability per class, and attention-pooled clip-level probabilities:

```python
strong, timestamps, weak = model.get_event_probabilities("audio.wav")   # [T, {classes}], [T] ms, [{classes}] per clip
```

From the shell: `atst-detect audio.wav --model path/to/this/folder -o events.tsv --plot plots/`.
"""

_STRONG_CARD = """
## Sound event detection

A frame-level head of {classes} classes{shown}: per 40 ms token, a sigmoid probability per class; a
class's clip-level probability is its highest frame probability:

```python
strong, timestamps, weak = model.get_event_probabilities("audio.wav")   # [T, {classes}], [T] ms, [{classes}] per clip
events = model.detect_events("audio.wav")                              # with this model's post-processing
```

From the shell: `atst-detect audio.wav --model path/to/this/folder -o events.tsv --plot plots/`.
"""

_ATST_SED_CARD = """
## Sound event detection (ATST-SED)

ATST-SED's head stack (a CNN on a mel spectrogram of its own, fused with the ATST-Frame tokens, a
BiGRU, strong and weak outputs) for {classes} classes{shown}: a sigmoid probability per class every
64 ms, and attention-pooled clip-level probabilities:

```python
events = model.detect_events("audio.wav")                              # with this model's post-processing
strong, timestamps, weak = model.get_event_probabilities("audio.wav")   # [T, {classes}], [T] ms, [{classes}] per clip
```

From the shell: `atst-detect audio.wav --model path/to/this/folder -o events.tsv --plot plots/`.
"""


def _atst_sed_head(size: int, classes: int, norm: bool) -> nn.Module:
    from .atst_sed import AtstSedHead  # its module imports this one

    return AtstSedHead(size, classes)


HEADS: dict[str, HeadSpec] = {
    spec.kind: spec
    for spec in (
        HeadSpec("clip", "clip", lambda size, classes, norm: LinearHead(size, classes), marker="linear.weight",
                 optional_norm=False, title="tagging head", outputs="tag logits",
                 how_to_get="fine-tune one with atst-train finetune and export it with atst-convert, or use a C2F checkpoint",
                 predict=lambda model, audio: model.get_tag_logits(audio), card=_TAGGING_CARD,
                 layouts="the ATST authors' fine-tuning checkpoint (encoder.encoder.*, head.norm.*, head.linear.*), "
                 "C2F's (model.student.*, model.linear.*) or atst-train finetune's (model.encoder.*, model.head.*)"),
        HeadSpec("events", "frame", lambda size, classes, norm: EventHead(size, classes, norm=norm), marker="strong.weight",
                 optional_norm=True, title="event head", outputs="event probabilities",
                 how_to_get="train one with atst-train sed and export it with atst-convert",
                 predict=lambda model, audio: model.get_event_probabilities(audio)[0][0], card=_DETECTION_CARD,
                 layouts="atst-train sed's checkpoint (model.encoder.*, model.head.*)"),
        HeadSpec("strong", "frame", lambda size, classes, norm: StrongHead(size, classes), marker="linear.weight",
                 optional_norm=False, title="frame-level head", outputs="event probabilities",
                 how_to_get="train one with atst-train sed and export it with atst-convert",
                 predict=lambda model, audio: model.get_event_probabilities(audio)[0][0], card=_STRONG_CARD,
                 layouts="PretrainedSED's state dict (model.atst.*, strong_head.*) or the ATST authors' AudioSet-strong "
                 "checkpoint (encoder.encoder.*, head.linear.*)"),
        HeadSpec("atst-sed", "frame", _atst_sed_head, marker="dense.weight", optional_norm=False, title="ATST-SED head",
                 outputs="event probabilities", how_to_get="load atst-sed-desed (ATST-SED's stage-2 model)",
                 predict=lambda model, audio: model.get_event_probabilities(audio)[0][0], card=_ATST_SED_CARD,
                 reads_audio=True, detection={"windows": "audio", "hop_seconds": 3.0},
                 layouts="ATST-SED's Lightning checkpoint (sed_teacher.atst_frame.atst.*, sed_teacher.cnn.*, "
                 "sed_teacher.rnn.*, sed_teacher.dense.*)"),
    )
}


def head_of_weights(weights: dict[str, Tensor], encoder) -> HeadSpec | None:
    """The one kind of head whose weight names these are, on ``encoder`` (an
    :class:`~atst_features.encoder.EncoderConfig`): its marker a ``[classes, inputs]`` matrix and its
    other names exactly the rest (None if no kind's are, or several kinds' are). Shapes are checked
    by the caller."""
    found = []
    for spec in HEADS.values():
        marker = weights.get(spec.marker)
        if not isinstance(marker, Tensor) or marker.ndim != 2:
            continue
        with torch.device("meta"):
            expected = spec.new(encoder, int(marker.shape[0]), spec.norm_in(weights)).state_dict()
        if set(expected) == set(weights):
            found.append(spec)
    return found[0] if len(found) == 1 else None
