"""The model card (``README.md``) of a model folder: Hub metadata, usage, sizes, the head, provenance, citation."""

from __future__ import annotations

from .heads import HEADS

__all__ = ["card_metadata", "model_card"]

_KIND_NAMES = {"frame": "ATST-Frame", "clip": "ATST-Clip", "c2f": "ATST-C2F"}


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
{_head_section(model)}
## Provenance

Converted from `{source}`{f" (sha256 `{digest}`)" if digest else ""} with atst-features
{provenance["atst_features_version"]}; the embeddings of the converted model were checked to equal
those of the source checkpoint.

## Citation

```bibtex
{config["citation"]}
```
"""


def _head_section(model: dict) -> str:
    """The model card's part on the head, if the model has one (its spec's ``card`` template)."""
    classes = model.get("num_classes", 0)
    if not classes:
        return ""
    labels = model.get("labels") or []
    shown = ", ".join(f"`{label}`" for label in labels[:10]) + (f" and {len(labels) - 10} more" if len(labels) > 10 else "")
    activation = "a sigmoid per class (multi-label)" if model.get("multi_label", True) else "a softmax over the classes"
    return HEADS[model.get("head_type", "clip")].card.format(classes=classes, shown=f" ({shown})" if labels else "",
                                                             activation=activation)
