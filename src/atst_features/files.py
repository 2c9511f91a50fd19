"""The model folder's file names, and sha256 digests of files: what the folder format, the Hub
downloads, conversion and the authors' downloads share.

A model folder holds ``config.json`` (format name and version, architecture, provenance),
``model.safetensors`` (inference weights) and a model card ``README.md``.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from .errors import ChecksumError

__all__ = ["CARD_NAME", "CONFIG_NAME", "FORMAT_NAME", "FORMAT_VERSION", "WEIGHTS_NAME", "is_model_folder", "sha256_of",
           "verify_sha256"]

FORMAT_NAME = "atst-features"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def is_model_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder in our format (it holds ``config.json``)."""
    return Path(path, CONFIG_NAME).is_file()


def sha256_of(path: str | os.PathLike, chunk_bytes: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(path: Path, expected: str | None, what: str,
                  fix: str = "download it again with load_model(..., force_download=True)") -> None:
    """:class:`ChecksumError` unless ``path`` has the sha256 ``expected``; None: the name of the blob
    ``path`` resolves to when that name is a sha256 (the Hub cache names LFS blobs by their hash),
    else nothing to check. ``what`` says where the file came from, ``fix`` what to do."""
    if expected is None:
        blob = path.resolve()
        expected = blob.name if _SHA256.match(blob.name) else None
    if expected is None:
        return
    actual = sha256_of(path)
    if actual != expected:
        raise ChecksumError(
            f"{str(path)!r} ({what}): sha256 {actual} is not the expected {expected}; the file is corrupted or "
            f"was changed: {fix}"
        )
