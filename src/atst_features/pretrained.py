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
from safetensors import safe_open
from safetensors.torch import save_file

from .checkpoints import CheckpointContents, check_state_dict, check_tensors
from .errors import CheckpointError
from .files import CARD_NAME, CONFIG_NAME, FORMAT_NAME, FORMAT_VERSION, WEIGHTS_NAME
from .card import model_card
from .config import ModelConfig
from .model import ATSTModel
from .registry import ATST_CITATION
from .version import __version__

__all__ = ["read_pretrained", "save_pretrained"]

DEFAULT_LICENSE = "cc-by-4.0"  # the licence of the official ATST checkpoints


def save_pretrained(
    model: ATSTModel, directory: str | os.PathLike, *, provenance: dict | None = None, license: str = DEFAULT_LICENSE
) -> Path:
    """Write ``model`` as a folder in our format (``config.json``, ``model.safetensors``, model card
    ``README.md``); ``load_model(directory)`` reads it back. Returns the folder.

    ``provenance``: where the weights come from (e.g. ``source_file``, ``source_sha256``; default:
    ``model.provenance``); stored in ``config.json`` together with the package version.
    """
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
    provenance = config.get("provenance", {})
    if not isinstance(provenance, dict) or not isinstance(provenance.get("hyper_parameters", {}), dict):
        raise CheckpointError(f"{str(config_path)!r}: 'provenance' and its 'hyper_parameters' must be objects")
    if not weights_path.is_file():
        raise CheckpointError(f"{str(directory)!r}: no {WEIGHTS_NAME} next to {CONFIG_NAME}")
    try:
        model_config = ModelConfig.from_dict(config["model"])
    except ValueError as err:
        raise CheckpointError(f"{str(config_path)!r}: invalid model description ({err})") from None
    state = _read_weights(weights_path, model_config)
    return CheckpointContents(
        config=model_config,
        encoder_state={k[len("encoder.") :]: v for k, v in state.items() if k.startswith("encoder.")},
        head_state={k[len("head.") :]: v for k, v in state.items() if k.startswith("head.")} or None,
        layout=f"atst-features folder {str(directory)!r}",
        hyper_parameters=provenance.get("hyper_parameters", {}),
    )


def _read_weights(path: Path, config: ModelConfig) -> dict[str, torch.Tensor]:
    """The tensors of the model ``config`` describes, read from ``path`` once the file's header lists
    exactly their names and shapes: no tensor is read before, and none but these."""
    with torch.device("meta"):
        expected = ATSTModel(config).state_dict()
    name = repr(str(path))
    try:
        with safe_open(str(path), framework="pt") as weights:
            declared = {key: weights.get_slice(key).get_shape() for key in weights.keys()}
            check_state_dict(declared, expected, name, "weights (of the model config.json describes)")
            state = {key: weights.get_tensor(key) for key in expected}
    except CheckpointError:
        raise
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(
            f"{name}: corrupted or truncated weights ({str(err).splitlines()[0]}); "
            "download it again (load_model(..., force_download=True))"
        ) from None
    check_tensors(state, name)
    return state
