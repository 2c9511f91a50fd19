"""Embedding outputs as WebDataset tar shards: a few large files instead of one or more per input.

A shard is ``<folder>/<writer>-<seq:06d>.tar`` (a regular PAX tar) with its index
``<folder>/<writer>-<seq:06d>.index.tsv``. Each input is one sample, whose members are named by its key
(:func:`sample_key`): ``<key>.clip.npy``, ``<key>.frame.npy``, ``<key>.timestamps.npy`` (those extracted;
float32, as ``np.save`` writes them; timestamps in ms) and ``<key>.json``, ``{"path": <input path>, "model":
<name>, "n_blocks": <int>}``. Members have mtime 0, uid and gid 0 and no owner names, so a shard's bytes
depend only on its contents. Any WebDataset loader reads the shards (``wds.WebDataset(urls)``).

The index is UTF-8 text: the header ``path<TAB>key<TAB>offset<TAB>size``, then one line per sample in tar
order: its input path and key (with ``\\``, tab, newline and carriage return written ``\\\\``, ``\\t``,
``\\n``, ``\\r``), the byte offset in the tar of the sample's first member header and the byte size of its
members (headers, data and padding), so ``f.seek(offset)`` then ``tarfile.open(fileobj=io.BytesIO(f.read(size)))``
reads that sample alone.

A shard is written under a hidden temporary name; when finished its index is put in place, then the tar:
a visible tar is always complete, and its index is there. An index without its tar is a stale leftover,
ignored and overwritten. Concurrent writers into one folder must use different writer names.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath

import numpy as np

from .errors import InputError, OutputError
from .outputs import KEYS, FrameStream, _as_numpy, _explained_write_errors, fsync_path, temporary_beside

__all__ = ["ShardWriter", "complete_shards", "completed_inputs", "sample_key"]

_SHARD = re.compile(r"(?P<writer>.+)-(?P<seq>\d{6,})\.tar")
_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}
_UNESCAPES = {value[1]: key for key, value in _ESCAPES.items()}


def sample_key(relative: str) -> str:
    """The WebDataset key of the input at ``relative`` (a ``/``-separated path): the path without its last
    suffix, with ``%`` written ``%25``, newlines ``%0A`` and the dots of the last component ``%2E`` (WebDataset
    ends a key at the first dot of the file name); ``urllib.parse.unquote`` reverses it."""
    path = PurePosixPath(relative)
    parent, stem = str(path.parent).replace("%", "%25"), path.stem.replace("%", "%25").replace(".", "%2E")
    key = stem if parent == "." else f"{parent}/{stem}"
    return key.replace("\n", "%0A")


def _escape(text: str) -> str:
    """``text`` for an index field: backslash, tab, newline and carriage return escaped."""
    return re.sub(r"[\\\t\n\r]", lambda match: _ESCAPES[match.group()], text)


def _unescape(text: str) -> str:
    """The inverse of :func:`_escape`."""
    return re.sub(r"\\(.)", lambda match: _UNESCAPES[match.group(1)], text)


def _index_path(shard: Path) -> Path:
    """``<writer>-<seq>.index.tsv`` for ``<writer>-<seq>.tar``."""
    return shard.with_name(f"{shard.name[:-len('.tar')]}.index.tsv")


def complete_shards(folder: Path) -> list[Path]:
    """The complete shards in ``folder`` (visible ``<writer>-<seq>.tar`` files), sorted by name."""
    return sorted(path for path in Path(folder).glob("*.tar") if _SHARD.fullmatch(path.name))


def completed_inputs(folder: Path, among: Callable[[str], bool] | None = None) -> set[str]:
    """The input paths of every complete shard in ``folder``, read line by line from their indexes; with
    ``among``, only those for which it is true (a million done inputs need not all be held)."""
    done = set()
    for shard in complete_shards(folder):
        if not _index_path(shard).is_file():
            raise InputError(f"shard {str(shard)!r} has no index {_index_path(shard).name!r} beside it: copy the index "
                             "with its shard, or move the shard elsewhere")
        with open(_index_path(shard), encoding="utf-8", errors="surrogateescape", newline="\n") as index:
            index.readline()  # the header
            paths = (_unescape(line.split("\t", 1)[0]) for line in index)
            done.update(paths if among is None else filter(among, paths))
    return done


class ShardLost(OutputError):
    """A shard could not be written (a full disk): the inputs added to it before are lost with it.
    ``earlier``: how many (the input being added when it failed not counted)."""

    def __init__(self, message: str, earlier: int) -> None:
        super().__init__(message)
        self.earlier = earlier


def _lost_with_the_shard(action: Callable[[], None], earlier: int) -> None:
    """Run ``action``; an OutputError becomes :class:`ShardLost` with ``earlier`` inputs lost."""
    try:
        action()
    except ShardLost:
        raise
    except OutputError as error:
        raise ShardLost(str(error), earlier) from None


class ShardWriter:
    """Writes inputs' embeddings as a numbered sequence of shards ``<folder>/<writer>-<seq>.tar``, starting
    after the writer's last complete shard there. A shard is finished when it holds ``inputs_per_shard``
    inputs or ``max_bytes`` bytes, and by :meth:`finish` or :meth:`close`. As a context manager it closes,
    or discards the unfinished shard on an exception. For one thread."""

    def __init__(self, folder: Path, writer: str = "shard", inputs_per_shard: int = 1000,
                 max_bytes: int = 2**30) -> None:
        self.folder, self.writer = Path(folder), writer
        self.inputs_per_shard, self.max_bytes = inputs_per_shard, max_bytes
        matches = (_SHARD.fullmatch(shard.name) for shard in complete_shards(self.folder))
        self.seq = 1 + max((int(match["seq"]) for match in matches if match["writer"] == writer), default=-1)
        self._file = self._tar = self._temporary = None
        self._lines: list[str] = []

    @property
    def path(self) -> Path:
        """The shard being written (or the next one)."""
        return self.folder / f"{self.writer}-{self.seq:06d}.tar"

    def add(self, path: str, relative: str, arrays: dict, metadata: dict, frames: FrameStream | None = None) -> None:
        """Append the input at ``path`` (``relative``: its path under the inputs' root, which names its key)
        with its ``arrays`` (``clip``, ``frame``, ``timestamps``) and ``metadata`` (``model``, ``n_blocks``).
        ``frames``: a finished :class:`FrameStream` holding the frame embeddings, copied from disk in chunks
        and then removed. A failure discards the unfinished shard: its inputs are not complete
        (:class:`ShardLost` says how many were added before this one)."""
        earlier = len(self._lines)
        try:
            arrays = {key: _as_numpy(arrays[key]) for key in KEYS if key in arrays}
            _lost_with_the_shard(lambda: self._write(path, relative, arrays, metadata, frames), earlier)
        finally:
            if frames is not None:
                frames.discard()
        if len(self._lines) >= self.inputs_per_shard or self._tar.offset >= self.max_bytes:
            _lost_with_the_shard(self.finish, earlier)

    def _write(self, path: str, relative: str, arrays: dict, metadata: dict, frames: FrameStream | None) -> None:
        """Append one sample to the open shard, opening one first if needed; a failure discards the shard."""
        try:
            with _explained_write_errors(self.path):
                if self._tar is None:
                    self.folder.mkdir(parents=True, exist_ok=True)
                    self._temporary = temporary_beside(self.path)
                    self._file = open(self._temporary, "wb")
                    self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.PAX_FORMAT)
                key, start = sample_key(relative), self._tar.offset
                for name in KEYS:
                    if name == "frame" and frames is not None:
                        with open(frames.path, "rb") as source:
                            self._add_member(f"{key}.frame.npy", source, os.fstat(source.fileno()).st_size)
                    elif name in arrays:
                        buffer = io.BytesIO()
                        np.save(buffer, arrays[name], allow_pickle=False)
                        self._add_member(f"{key}.{name}.npy", buffer, buffer.tell())
                data = json.dumps({"path": path, **metadata}).encode()
                self._add_member(f"{key}.json", io.BytesIO(data), len(data))
                self._lines.append(f"{_escape(path)}\t{_escape(key)}\t{start}\t{self._tar.offset - start}\n")
        except BaseException:
            self.discard()
            raise

    def _add_member(self, name: str, data, size: int) -> None:
        """Append the member ``name``: ``size`` bytes from the file object ``data``, copied in chunks."""
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = size, 0o644, 0
        data.seek(0)
        self._tar.addfile(info, data)

    def finish(self) -> None:
        """Close the current shard and put it in place (its index first, then the tar); nothing without one."""
        if self._tar is None:
            return
        index = _index_path(self.path)
        index_temporary = temporary_beside(index)
        try:
            with _explained_write_errors(self.path):
                self._tar.close()
                self._file.flush()
                os.fsync(self._file.fileno())
                self._file.close()
            with _explained_write_errors(index), open(index_temporary, "w", encoding="utf-8",
                                                      errors="surrogateescape", newline="\n") as handle:
                handle.write("path\tkey\toffset\tsize\n")
                handle.writelines(self._lines)
                handle.flush()
                os.fsync(handle.fileno())
            with _explained_write_errors(self.path):
                os.replace(index_temporary, index)
                fsync_path(self.folder)  # the index is on disk before the tar appears
                os.replace(self._temporary, self.path)
                fsync_path(self.folder)
        except BaseException:
            self.discard()
            raise
        finally:
            index_temporary.unlink(missing_ok=True)
        self._file = self._tar = self._temporary = None
        self._lines = []
        self.seq += 1

    def close(self) -> None:
        """Finish the current shard (:class:`ShardLost`, all its inputs counted, when it cannot be written)."""
        _lost_with_the_shard(self.finish, len(self._lines))

    def discard(self) -> None:
        """Drop the unfinished shard and its temporary file; the next shard keeps its number."""
        if self._file is not None:
            self._file.close()
            self._temporary.unlink(missing_ok=True)
        self._file = self._tar = self._temporary = None
        self._lines = []

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if kind is None:
            self.close()
        else:
            self.discard()
