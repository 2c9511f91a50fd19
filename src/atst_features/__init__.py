"""ATST audio representations: clip-level and frame-level embeddings from ATST-Clip, ATST-Frame and ATST-C2F."""

from . import errors as _errors
from .errors import *  # noqa: F403 - the error family, listed in errors.__all__
from .convert import convert_checkpoint
from .example import example_audio
from .hub import push_to_hub
from .loading import install_checkpoint, load_model
from .model import ATSTModel
from .pretrained import save_pretrained
from .reading import export_memmap, read_embeddings
from .registry import PretrainedModel, list_models
from .version import __version__

__all__ = [
    *_errors.__all__,
    "ATSTModel",
    "PretrainedModel",
    "convert_checkpoint",
    "example_audio",
    "export_memmap",
    "get_clip_embedding",
    "get_frame_embeddings",
    "install_checkpoint",
    "list_models",
    "load_model",
    "push_to_hub",
    "read_embeddings",
    "save_pretrained",
    "__version__",
]


def get_frame_embeddings(audio, model: ATSTModel, *, sample_rate: int | None = None, n_blocks: int | None = None):
    """Frame embeddings ``[B, T, n_blocks * D]`` and timestamps ``[B, T]`` in ms; see
    :meth:`ATSTModel.get_frame_embeddings`."""
    return model.get_frame_embeddings(audio, sample_rate=sample_rate, n_blocks=n_blocks)


def get_clip_embedding(audio, model: ATSTModel, *, sample_rate: int | None = None, n_blocks: int | None = None):
    """Clip embedding ``[B, model.clip_embedding_size(n_blocks)]``; see :meth:`ATSTModel.get_clip_embedding`."""
    return model.get_clip_embedding(audio, sample_rate=sample_rate, n_blocks=n_blocks)
