"""Writing embedding files atomically: npz, npy or pt, in memory or streamed for long audio.

Each output form is one :class:`Writer` of :data:`WRITERS` (the files it writes for an input, and
how); a new form is one entry there.

Every file is written to a hidden temporary file in its own folder (``.atst-<digest>-<pid>-<random>.partial``:
short, whatever the output's name, and unique, so concurrent runs never share one) and renamed
into place when complete, so a visible output is always whole, even while another process writes
the same output. An interrupted run leaves at most a hidden ``.partial`` file per output, which
the next run writing that output removes.
Arrays are float32; timestamps are in ms.

Layout (``<base>`` is the output path without suffix):

- ``npz``: ``<base>.npz`` with ``clip [E]``, ``frame [T, D]``, ``timestamps [T]`` (as the level
  asks), ``model`` (str) and ``n_blocks`` (int).
- ``pt``: ``<base>.pt``, a dict of the same keys (torch tensors), read with ``torch.load``.
- ``npy``: one array per file: ``<base>.clip.npy``, ``<base>.frame.npy``, ``<base>.timestamps.npy``,
  and ``<base>.meta.json`` with the same metadata (``model``, ``n_blocks``), written last: an input
  whose files are not all there is written again by the next run, and a failed write removes the
  input's files written before it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import secrets
import threading
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .errors import OutputError

__all__ = ["FORMATS", "KEYS", "WRITERS", "FrameStream", "Writer", "output_files", "write_outputs"]

KEYS = ("clip", "frame", "timestamps")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


_swept_folders: set[Path] = set()
_sweep_lock = threading.Lock()


def _remove_dead_writers_files(folder: Path) -> None:
    """Remove the temporaries of dead processes (``.atst-<digest>-<pid>-...``) from ``folder``, once
    per folder and process: listing the folder for every output would make writing N outputs into
    one folder cost O(N^2) (a million files, a trillion directory entries read)."""
    with _sweep_lock:
        if folder in _swept_folders:
            return
        _swept_folders.add(folder)
    for stale in folder.glob(".atst-*"):
        parts = stale.name.split("-", 3)  # ".atst", digest, pid, random + suffix
        pid = parts[2] if len(parts) == 4 else ""
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            stale.unlink(missing_ok=True)


def temporary_beside(path: Path, suffix: str = ".partial") -> Path:
    """A hidden temporary path in ``path``'s folder: ``.atst-<name digest>-<pid>-<random><suffix>``,
    short whatever the name, unique per writer. Leftovers of dead processes in that folder are
    removed the first time this process writes there (an interrupted run's files are replaced by
    the next run's)."""
    _remove_dead_writers_files(path.parent)
    prefix = f".atst-{hashlib.sha1(path.name.encode('utf-8', 'surrogateescape')).hexdigest()[:16]}-"
    return path.with_name(f"{prefix}{os.getpid()}-{secrets.token_hex(4)}{suffix}")


@contextmanager
def _explained_write_errors(path: Path, elsewhere: str = "--output-dir") -> Iterator[None]:
    """A failed write (full disk, size limit, permissions) as one :class:`OutputError` naming ``path``
    and how to write elsewhere."""
    try:
        yield
    except OutputError:
        raise
    except OSError as error:
        reason = error.strerror or str(error)  # numpy's short writes carry no errno: "N requested and M written"
        raise OutputError(f"cannot write {str(path)!r} ({reason}); is the disk full? Free space or write elsewhere "
                          f"({elsewhere})") from None


def fsync_path(path: Path) -> None:
    """Flush a file's data, or the renames in a folder, to disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextmanager
def _atomic(path: Path, elsewhere: str = "--output-dir", durable: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it into place only if the block succeeds.
    ``durable``: the file's data is on disk before the rename, and the rename before returning."""
    temporary = None
    try:
        with _explained_write_errors(path, elsewhere):
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = temporary_beside(path)
            yield temporary
            if durable:
                fsync_path(temporary)
            os.replace(temporary, path)
            if durable:
                fsync_path(path.parent)
    finally:
        if temporary is not None:
            temporary.unlink(missing_ok=True)


def save_torch_durably(value, path: Path, elsewhere: str) -> None:
    """``torch.save(value)`` into ``path`` as one step: written to a temporary file beside it, flushed
    to disk, renamed into place; a reader (or a run after a crash) sees the previous file or the whole
    new one. A failed write (full disk) is one :class:`OutputError` naming ``path`` and ``elsewhere``
    (where to write instead), and leaves ``path`` as it was."""
    with _atomic(Path(path), elsewhere, durable=True) as temporary:
        _torch_save(value, temporary)


class _KeepWriteError(io.RawIOBase):
    """A file wrapper that keeps the ``OSError`` of a failed write: ``torch.save`` turns it into a
    ``RuntimeError`` that does not say the disk is full."""

    def __init__(self, handle) -> None:
        super().__init__()
        self.handle = handle
        self.error: OSError | None = None

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        try:
            return self.handle.write(data)
        except OSError as error:
            self.error = error
            raise


def _torch_save(value: dict, path: Path) -> None:
    with open(path, "wb") as handle:
        sink = _KeepWriteError(handle)
        try:
            torch.save(value, sink)
        except RuntimeError:
            if sink.error is None:
                raise
            raise sink.error from None


def _as_numpy(value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", torch.float32).numpy()
    return np.asarray(value, dtype=np.float32)


class FrameStream:
    """Frame embeddings ``[T, D]`` appended in time order to a float32 ``.npy`` file on disk, for audio
    too long to hold its frame embeddings in memory. Plain file writes, not a memmap: written pages
    are not kept in the process's memory."""

    def __init__(self, base: Path, shape: tuple[int, int]) -> None:
        base.parent.mkdir(parents=True, exist_ok=True)
        self.path = temporary_beside(base, ".partial.npy")
        self.shape = shape
        self.rows = 0
        self._file = open(self.path, "wb")
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False, "shape": shape}
        np.lib.format.write_array_header_2_0(self._file, header)

    def write(self, first: int, rows) -> None:
        """Append ``rows [k, D]``, which must start at row ``first`` (the next one)."""
        if first != self.rows:
            raise ValueError(f"frame rows must come in order: expected row {self.rows}, got {first}")
        values = np.ascontiguousarray(_as_numpy(rows))
        with _explained_write_errors(self.path):
            self._file.write(values.tobytes())
        self.rows += len(values)

    def finish(self) -> Path:
        self._file.close()
        if self.rows != self.shape[0]:
            raise ValueError(f"{self.rows} frame rows written, {self.shape[0]} expected")
        return self.path

    def discard(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)


@dataclass(frozen=True)
class Writer:
    """One output form: ``files(base, keys)``, the files it writes for an input whose arrays are
    ``keys``; ``write(base, arrays, metadata, frames)`` writes them (``arrays``: float32 numpy
    arrays by key; ``frames``: a finished :class:`FrameStream` holding the frame embeddings instead,
    never loaded whole where the form allows) and returns them."""

    files: Callable[[Path, list[str]], list[Path]]
    write: Callable[[Path, dict, dict, "FrameStream | None"], list[Path]]


def _one_file(suffix: str) -> Callable[[Path, list[str]], list[Path]]:
    return lambda base, keys: [base.with_name(f"{base.name}.{suffix}")]


def _npy_files(base: Path, keys: list[str]) -> list[Path]:
    arrays = [base.with_name(f"{base.name}.{key}.npy") for key in KEYS if key in keys]
    return arrays + [base.with_name(f"{base.name}.meta.json")]


def _write_npz(base: Path, arrays: dict, metadata: dict, frames: FrameStream | None) -> list[Path]:
    """An uncompressed npz, as ``np.savez`` writes it, with the streamed frames copied from disk."""
    (path,) = _one_file("npz")(base, list(arrays))
    with _atomic(path) as temporary, zipfile.ZipFile(temporary, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        if frames is not None:
            archive.write(frames.path, arcname="frame.npy")
        for key, value in {**arrays, **{k: np.asarray(v) for k, v in metadata.items()}}.items():
            with archive.open(f"{key}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, value, allow_pickle=False)
    return [path]


def _write_pt(base: Path, arrays: dict, metadata: dict, frames: FrameStream | None) -> list[Path]:
    (path,) = _one_file("pt")(base, list(arrays))
    tensors = {key: torch.from_numpy(value) for key, value in arrays.items()}
    if frames is not None:
        tensors["frame"] = torch.from_numpy(np.load(frames.path))
    with _atomic(path) as temporary:
        _torch_save({**tensors, **metadata}, temporary)
    return [path]


def _write_npy(base: Path, arrays: dict, metadata: dict, frames: FrameStream | None) -> list[Path]:
    """One ``.npy`` per array, then the metadata sidecar; a failure removes what this call wrote."""
    keys = [key for key in KEYS if key in arrays or (key == "frame" and frames is not None)]
    *array_paths, sidecar = _npy_files(base, keys)
    written = []
    try:
        for key, path in zip(keys, array_paths):
            if key in arrays:
                with _atomic(path) as temporary, open(temporary, "wb") as handle:
                    np.save(handle, arrays[key])
            else:
                with _explained_write_errors(path):
                    os.replace(frames.path, path)
            written.append(path)
        with _atomic(sidecar) as temporary:
            temporary.write_text(json.dumps({**metadata, "arrays": keys}) + "\n", encoding="utf-8")
        written.append(sidecar)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return written


WRITERS: dict[str, Writer] = {
    "npz": Writer(_one_file("npz"), _write_npz),
    "npy": Writer(_npy_files, _write_npy),
    "pt": Writer(_one_file("pt"), _write_pt),
}
FORMATS = tuple(WRITERS)


def output_files(base: Path, fmt: str, keys: list[str]) -> list[Path]:
    """The files written for one input whose arrays are ``keys``, in format ``fmt``."""
    return WRITERS[fmt].files(base, keys)


def write_outputs(base: Path, fmt: str, arrays: dict, metadata: dict, frames: FrameStream | None = None) -> list[Path]:
    """Write one input's arrays (``clip``, ``frame``, ``timestamps``) in format ``fmt``, with
    ``metadata`` (``model``, ``n_blocks``); returns the files.

    ``frames``: a finished :class:`FrameStream` holding the frame embeddings; it is renamed (npy)
    or copied in chunks (npz) into the output, never loaded whole (except for pt).
    """
    try:
        return WRITERS[fmt].write(base, {key: _as_numpy(value) for key, value in arrays.items()}, metadata, frames)
    finally:
        if frames is not None:
            frames.discard()
