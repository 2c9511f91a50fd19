"""Our model folder format: ``config.json`` + ``model.safetensors`` + a model card ``README.md``.

``config.json`` holds the architecture (kind, encoder, front end, head classes), the licence, the
citation and the provenance (source file and its sha256, the package version). The weights are
the inference model's state dict only (encoder and tagging head, if any), as safetensors: loading them runs no
pickle at all.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .checkpoints import CheckpointContents, check_state_dict, check_tensors
from .errors import CheckpointError
from .files import CARD_NAME, CONFIG_NAME, FORMAT_NAME, FORMAT_VERSION, WEIGHTS_NAME
from .model import ATSTModel, ModelConfig
from .registry import ATST_CITATION

__all__ = ["read_pretrained", "save_pretrained"]

DEFAULT_LICENSE = "cc-by-4.0"  # the licence of the official ATST checkpoints
_KIND_NAMES = {"frame": "ATST-Frame", "clip": "ATST-Clip", "c2f": "ATST-C2F"}


def save_pretrained(
    model: ATSTModel, directory: str | os.PathLike, *, provenance: dict | None = None, license: str = DEFAULT_LICENSE
) -> Path:
    """Write ``model`` as a folder in our format (``config.json``, ``model.safetensors``, model card
    ``README.md``); ``load_model(directory)`` reads it back. Returns the folder.

    ``provenance``: where the weights come from (e.g. ``source_file``, ``source_sha256``; default:
    ``model.provenance``); stored in ``config.json`` together with the package version.
    """
    from . import __version__

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    provenance = dict(provenance or model.provenance, atst_features_version=__version__)
    config = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "model": model.config.to_dict(),
        "embedding_sizes": {
            "frame_n_blocks_1": model.frame_embedding_size(1),
            "frame_n_blocks_12": model.frame_embedding_size(model.depth),
            "clip_n_blocks_1": model.clip_embedding_size(1),
            "clip_n_blocks_12": model.clip_embedding_size(model.depth),
        },
        "license": license,
        "citation": ATST_CITATION,
        "provenance": provenance,
    }
    state = {name: tensor.detach().to("cpu").contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt", "library": FORMAT_NAME})
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, default=str) + "\n", encoding="utf-8")
    (directory / CARD_NAME).write_text(model_card(config, directory.name), encoding="utf-8")
    return directory


def card_metadata(license: str) -> str:
    """The Hub's YAML front matter of a model card in our format."""
    return f"""---
library_name: atst-features
license: {license}
tags:
- audio
- audio-embeddings
- self-supervised-learning
- atst
- hear
pipeline_tag: feature-extraction
---
"""


def model_card(config: dict, name: str) -> str:
    """The Hugging Face model card: Hub metadata, usage, sizes, provenance, citation."""
    model = config["model"]
    kind = _KIND_NAMES[model["kind"]]
    width = model["encoder"]["embed_dim"]
    sizes = config["embedding_sizes"]
    provenance = config["provenance"]
    source = provenance.get("source_file", "unknown")
    digest = provenance.get("source_sha256")
    return f"""{card_metadata(config["license"])}
# {name}: {kind} (width {width})

{kind} encoder of the Audio Teacher-Student Transformer (Li, Shao, Li, TASLP 2024,
[arXiv 2306.04186](https://arxiv.org/abs/2306.04186)), in the
[atst-features](https://pypi.org/project/atst-features/) format: `config.json` and
`model.safetensors` (inference weights only).

## Usage

```python
from atst_features import load_model

model = load_model("path/or/hub-id/of/this/repo")
clip = model.get_clip_embedding("audio.wav")                       # [1, {sizes["clip_n_blocks_12"]}]
frames, timestamps = model.get_frame_embeddings("audio.wav", n_blocks=1)  # [1, T, {sizes["frame_n_blocks_1"]}], ms
```

| output | n_blocks=1 | n_blocks=12 |
|---|---|---|
| frame embedding (one per 40 ms) | {sizes["frame_n_blocks_1"]} | {sizes["frame_n_blocks_12"]} |
| clip embedding | {sizes["clip_n_blocks_1"]} | {sizes["clip_n_blocks_12"]} |

Input: audio at any sample rate (resampled to 16 kHz), mono (channels are averaged).
{_tagging_section(model)}
## Provenance

Converted from `{source}`{f" (sha256 `{digest}`)" if digest else ""} with atst-features
{provenance["atst_features_version"]}; the embeddings of the converted model were checked to equal
those of the source checkpoint.

## Citation

```bibtex
{config["citation"]}
```
"""


def _tagging_section(model: dict) -> str:
    """The model card's part on the tagging head, if the model has one."""
    classes = model.get("num_classes", 0)
    if not classes:
        return ""
    labels = model.get("labels") or []
    shown = ", ".join(f"`{label}`" for label in labels[:10]) + (f" and {len(labels) - 10} more" if len(labels) > 10 else "")
    if model.get("head_type") == "events":
        return f"""
## Sound event detection

An event head of {classes} classes{f" ({shown})" if labels else ""}: per 40 ms token, a sigmoid
probability per class, and attention-pooled clip-level probabilities:

```python
strong, timestamps, weak = model.get_event_probabilities("audio.wav")   # [T, {classes}], [T] ms, [{classes}] per clip
```

From the shell: `atst-detect audio.wav --model path/to/this/folder -o events.tsv --plot plots/`.
"""
    output = "a sigmoid per class (multi-label)" if model.get("multi_label", True) else "a softmax over the classes"
    return f"""
## Tagging

A linear head of {classes} classes{f" ({shown})" if labels else ""}; probabilities by {output}:

```python
probabilities = model.get_tag_probabilities("audio.wav")   # [1, {classes}], in the order of model.labels
```

From the shell: `atst-tag audio.wav --model path/to/this/folder -k 5`.
"""


def read_pretrained(directory: str | os.PathLike) -> CheckpointContents:
    """Read a folder in our format; raises :class:`CheckpointError` naming the bad file."""
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as err:  # RecursionError: absurdly nested JSON
        raise CheckpointError(f"{str(config_path)!r}: unreadable model config ({str(err)[:100]})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT_NAME or "model" not in config:
        raise CheckpointError(f"{str(config_path)!r}: not an atst-features model config (no 'format': '{FORMAT_NAME}')")
    if not isinstance(config.get("format_version", 0), int):
        raise CheckpointError(f"{str(config_path)!r}: format_version must be an integer")
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{str(config_path)!r}: format version {config['format_version']} is newer than this atst-features "
            f"reads ({FORMAT_VERSION}); upgrade atst-features"
        )
    if not weights_path.is_file():
        raise CheckpointError(f"{str(directory)!r}: no {WEIGHTS_NAME} next to {CONFIG_NAME}")
    try:
        model_config = ModelConfig.from_dict(config["model"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{str(config_path)!r}: invalid model description ({err})") from None
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(
            f"{str(weights_path)!r}: corrupted or truncated weights ({str(err).splitlines()[0]}); "
            "download it again (load_model(..., force_download=True))"
        ) from None
    check_tensors(state, repr(str(weights_path)))
    encoder = {k[len("encoder.") :]: v for k, v in state.items() if k.startswith("encoder.")}
    head = {k[len("head.") :]: v for k, v in state.items() if k.startswith("head.")} or None
    _check_weights(state, model_config, weights_path)
    return CheckpointContents(
        config=model_config,
        encoder_state=encoder,
        head_state=head,
        layout=f"atst-features folder {str(directory)!r}",
        hyper_parameters=config.get("provenance", {}).get("hyper_parameters", {}),
    )


def _check_weights(state: dict[str, torch.Tensor], config: ModelConfig, path: Path) -> None:
    with torch.device("meta"):
        expected = ATSTModel(config).state_dict()
    check_state_dict(state, expected, repr(str(path)), "weights (of the model config.json describes)")
