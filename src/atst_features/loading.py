"""``load_model``: turn a source (registry name, Hub id, folder, checkpoint file) into an ATSTModel."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from .checkpoints import CheckpointContents, build_model, read_checkpoint
from .errors import CheckpointError, InputError, ModelNotFoundError, SlowPrecisionWarning
from .files import is_model_folder
from .hub import download, looks_like_repo_id
from .model import ATSTModel
from .precision import slow_precision_message
from .official import fetch_official, install_official
from .pretrained import read_pretrained
from .registry import DEFAULT_MODEL, REGISTRY, official_entry

__all__ = ["RANDOM_PREFIX", "install_checkpoint", "load_model", "read_model_source", "read_source", "resolve_device",
           "resolve_dtype"]

# A source with one of these suffixes is a file path, never a Hub id.
CHECKPOINT_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".safetensors"}
RANDOM_PREFIX = "random:"  # read_model_source(): the architecture of what follows, with random weights


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a torch device (None: CUDA when available, else CPU); :class:`InputError` for
    a malformed name or a CUDA device this machine does not have."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"device {device!r} is not a device name (cpu, cuda, cuda:1, mps, ...)") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise InputError(f"device {str(device)!r} is not available here ({torch.cuda.device_count()} CUDA devices); use cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"device {str(device)!r} is not available here (no Apple GPU, or PyTorch built without it); use cpu")
    if device.type not in ("cpu", "cuda", "mps"):  # xpu, ...: ask the backend itself
        try:
            torch.empty(0, device=device)
        except (RuntimeError, AssertionError) as error:
            reason = str(error).split(". ")[0] if str(error) else type(error).__name__
            raise InputError(f"device {str(device)!r} is not available here ({reason}); use cpu") from None
    return device


# Weight dtypes load_model takes, by the names people write them with.
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
          "float64": torch.float64, "fp64": torch.float64, "double": torch.float64}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``dtype`` as a floating-point torch dtype: a ``torch.dtype`` or one of :data:`DTYPES`' names
    (``"bfloat16"``, ``"torch.bfloat16"``, ``"bf16"``, ...); :class:`InputError` for anything else."""
    if dtype is None or (isinstance(dtype, torch.dtype) and dtype in DTYPES.values()):
        return dtype
    if isinstance(dtype, str) and (name := dtype.removeprefix("torch.")) in DTYPES:
        return DTYPES[name]
    raise InputError(f"dtype {dtype!r} is not a weight dtype: use torch.float32, torch.bfloat16, torch.float16 or "
                     "torch.float64 (or their names)")


def _read_local(path: Path) -> CheckpointContents:
    if path.is_dir():
        if not is_model_folder(path):
            raise CheckpointError(f"{str(path)!r}: a folder without config.json is not an atst-features model folder")
        return read_pretrained(path)
    return read_checkpoint(path)


def read_source(
    source: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    force_download: bool = False,
) -> tuple[CheckpointContents, Path]:
    """Parse any model source; returns the contents and the local file or folder they came from."""
    path = Path(source)
    if path.exists():
        return _read_local(path), path
    name = str(source)
    if path.suffix in CHECKPOINT_SUFFIXES:
        raise ModelNotFoundError(f"{name!r}: no such checkpoint file")
    entry = REGISTRY.get(name)
    if entry is not None and entry.download_url and not entry.published and revision is None:
        local = fetch_official(entry, cache_dir=cache_dir, force_download=force_download)
        return _read_local(local), local
    if entry is not None or looks_like_repo_id(name):
        local = download(name, revision=revision, cache_dir=cache_dir, force_download=force_download)
        return _read_local(local), local
    raise ModelNotFoundError(
        f"{name!r} is not a file, a folder, a registry name ({', '.join(REGISTRY)}) or a Hub id (org/name)"
    )


def read_model_source(source: str):
    """``(contents, random_weights)`` of a model source: ``random:SOURCE`` is the architecture of SOURCE,
    whose weights the caller replaces by fresh random ones (``random_weights`` True; atst-probe's
    ``--model`` and atst-train's ``--model.init`` spell random weights so); any other source is read as
    it is (:func:`read_source`)."""
    contents, _ = read_source(source.removeprefix(RANDOM_PREFIX))
    return contents, source.startswith(RANDOM_PREFIX)


def install_checkpoint(name: str, path: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None) -> Path:
    """Install the official checkpoint of registry model ``name`` from a file you downloaded yourself
    (in a browser, when Google Drive refuses): it is converted with the entry's settings (class names,
    post-processing, front end) into the cache where ``load_model(name)`` looks, as a download would
    be; returns the model folder. ``cache_dir``: as for :func:`load_model`."""
    entry = official_entry(name)
    if not Path(path).is_file():
        raise CheckpointError(f"{str(path)!r}: no such checkpoint file")
    return install_official(entry, path, cache_dir=cache_dir)


def load_model(
    source: str | os.PathLike = DEFAULT_MODEL,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    precision: str | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    force_download: bool = False,
) -> ATSTModel:
    """Load an ATST model for inference, in eval mode.

    ``source``: a registry name (see :func:`list_models`; default ``"atst-frame-base"``; an official
    model not yet on the Hub is downloaded from the authors' link and converted once, see
    :mod:`atst_features.official`), a Hub repository id in our format (``"org/name"``), a local folder in our format, or a checkpoint file
    (official ATST-Frame / ATST-Clip Lightning checkpoint, C2F distillation checkpoint, fine-tuned,
    ATST-SED or bare encoder state dict). ``revision``: a Hub branch, tag or commit to pin.
    ``cache_dir``: the Hub cache (default from ``HF_HUB_CACHE`` / ``HF_HOME``). ``force_download``:
    fetch again even if cached. ``device``: default CUDA when available, else CPU. ``dtype``: the
    weights' dtype, e.g. ``torch.bfloat16`` or ``"bfloat16"`` (outputs in it; the front end always computes in
    float32). ``precision``: the encoder's compute precision with float32 outputs, ``"fp32"``,
    ``"bf16"`` (fastest on CPUs with AMX / AVX512-BF16 and on GPUs), ``"fp16"``, ``"bf16-mixed"`` or
    ``"fp16-mixed"``; see :meth:`ATSTModel.set_precision`.
    """
    if dtype is not None and precision is not None:
        raise InputError("give dtype (the weights' dtype) or precision (the compute precision), not both")
    device, dtype = resolve_device(device), resolve_dtype(dtype)  # before any download
    contents, local = read_source(source, revision=revision, cache_dir=cache_dir, force_download=force_download)
    model = build_model(contents)
    model.provenance["source_file"] = local.name
    model = model.to(device=device)
    if dtype is not None:
        if slow := slow_precision_message(f"dtype={dtype}", dtype, model.device.type):
            warnings.warn(f"{slow}; use fp32", SlowPrecisionWarning, stacklevel=2)
        model = model.to(dtype=dtype)
    if precision is not None:
        model.set_precision(precision)
    return model
