"""Finding the audio files a command should process: files, folders, globs and manifests.

Each input keeps the path relative to the folder it was found under, so outputs can mirror the
input tree. Nothing is decoded here: a bad path is reported when it is decoded, and the batch
goes on.
"""

from __future__ import annotations

import csv
import glob
import itertools
import os
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from .errors import InputError

__all__ = [
    "AUDIO_SUFFIXES", "AudioInput", "find_inputs", "manifest_entries", "manifest_lines", "path_column", "read_manifest",
    "repeats", "scan_folder",
]

AUDIO_SUFFIXES = frozenset(
    {".wav", ".wave", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".aifc", ".au", ".snd",
     ".caf", ".w64", ".rf64"}
)
_GLOB_CHARS = set("*?[")
_PATH_COLUMNS = ("path", "filepath", "file", "filename", "audio", "audio_path")



class AudioInput:
    """An audio file to process and its path relative to the root it was found under.

    Held as one string and an offset (the relative path is usually the path's tail), so that a
    million inputs take about 150 MB, not the 1.5 GB of two :class:`~pathlib.Path` objects each;
    ``path`` and ``relative`` are made on access.
    """

    __slots__ = ("path_str", "_relative")

    @classmethod
    def plain(cls, path: str, tail: int) -> AudioInput:
        """From a path string already as :class:`~pathlib.Path` writes it, relative from index ``tail`` on."""
        item = cls.__new__(cls)
        item.path_str, item._relative = path, tail
        return item

    def __init__(self, path: str | os.PathLike, relative: str | os.PathLike) -> None:
        self.path_str = str(Path(path))  # normalised as Path normalises ("./a//b.wav" -> "a/b.wav")
        relative = str(Path(relative))
        tail = len(self.path_str) - len(relative)
        is_tail = self.path_str.endswith(relative) and (tail == 0 or self.path_str[tail - 1] == os.sep)
        self._relative: int | str = tail if is_tail else relative

    @property
    def path(self) -> Path:
        return Path(self.path_str)

    @property
    def relative_str(self) -> str:
        """:attr:`relative` as a string."""
        return self.path_str[self._relative :] if isinstance(self._relative, int) else self._relative

    @property
    def relative(self) -> Path:
        return Path(self.relative_str)

    def __eq__(self, other) -> bool:
        if not isinstance(other, AudioInput):
            return NotImplemented
        return self.path_str == other.path_str and self.relative_str == other.relative_str

    def __hash__(self) -> int:
        return hash(self.path_str)

    def __repr__(self) -> str:
        return f"AudioInput({self.path_str!r}, {self.relative_str!r})"

    def __reduce__(self):
        return AudioInput, (self.path_str, self.relative_str)


def repeats(items: Sequence, key: Callable[[object], str]) -> list[tuple[int, int]]:
    """``(first, later)`` index pairs of ``items`` whose ``key`` strings are equal, ``later`` in order.
    Memory stays about 16 bytes per item (their hashes, sorted; only items sharing a hash have their
    keys compared), so a million items are checked without holding a million more strings."""
    hashes = np.fromiter((hash(key(item)) for item in items), dtype=np.int64, count=len(items))
    order = np.argsort(hashes, kind="stable")
    shared = np.flatnonzero(hashes[order[1:]] == hashes[order[:-1]])
    firsts: dict[str, int] = {}
    pairs = []
    for index in np.unique(np.concatenate([order[shared], order[shared + 1]])).tolist():
        first = firsts.setdefault(key(items[index]), index)
        if first != index:
            pairs.append((first, index))
    return pairs


def _under_root(path: Path, root: Path) -> Path:
    try:
        return path.relative_to(root)
    except ValueError:  # outside the root: mirror the absolute path below the output folder
        return Path(*path.resolve().parts[1:])


_NOT_PLAIN = re.compile(r"^~|^\.(/|$)|/\.(/|$)|//|/$")  # what Path would rewrite, or a home folder


def _manifest_inputs(manifest: Path) -> Iterator[AudioInput]:
    """The inputs a manifest lists, relative to its folder. A plain relative entry (``a/b.wav``: no ``.``
    or empty component, no ``~``) is joined as a string: a million of them are listed in seconds."""
    root = manifest.parent
    prefix = "" if str(root) == "." else os.path.join(str(root), "")
    for entry, _ in manifest_entries(manifest):
        if not entry.startswith(os.sep) and not _NOT_PLAIN.search(entry):
            yield AudioInput.plain(prefix + entry, len(prefix))
        else:
            path = _resolve(manifest, entry)
            yield AudioInput(path, _under_root(path, root))


def _identity(path: str) -> tuple[int, int] | None:
    try:
        status = os.stat(path)
    except OSError:
        return None
    return status.st_dev, status.st_ino


def scan_folder(folder: Path, special: list[Path] | None = None) -> list[AudioInput]:
    """Audio files under ``folder`` (recursively, by suffix), in a stable order. Symbolic links to
    folders are followed, each real folder once (a link loop such as ``ln -s . loop`` adds
    nothing); FIFOs, sockets and devices are skipped (reading one would block or never end) and
    appended to ``special`` if given."""
    found = []
    visited = {_identity(str(folder))}
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        keep = []
        for name in sorted(dirnames):
            identity = _identity(os.path.join(dirpath, name))
            if identity is not None and identity not in visited:
                visited.add(identity)
                keep.append(name)
        dirnames[:] = keep
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if path.suffix.lower() not in AUDIO_SUFFIXES:
                continue
            if path.is_file() or not path.exists():  # a broken link is reported when it is decoded
                found.append(AudioInput(path, path.relative_to(folder)))
            elif special is not None:
                special.append(path)
    return found


def _glob_root(pattern: str) -> Path:
    parts = Path(pattern).parts
    fixed = parts[: next(i for i, p in enumerate(parts) if _GLOB_CHARS & set(p))]
    return Path(*fixed) if fixed else Path(".")


def manifest_lines(text: str) -> list[str]:
    """A manifest's non-empty lines that are not ``#`` comments."""
    return [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def path_column(manifest: Path, header_row: list[str]) -> int:
    """Index of the path column in a CSV / TSV header row; :class:`InputError` naming the accepted names otherwise."""
    header = [cell.strip().lower() for cell in header_row]
    column = next((header.index(name) for name in _PATH_COLUMNS if name in header), None)
    if column is None:
        raise InputError(
            f"{str(manifest)!r}: no path column in the header {header_row}; name one of {', '.join(_PATH_COLUMNS)}"
        )
    return column


def _manifest_text_lines(manifest: Path) -> Iterator[str]:
    """The manifest's lines, read as they are needed (a million-line manifest is never held whole)."""
    try:
        with open(manifest, encoding="utf-8-sig") as handle:
            yield from handle
    except UnicodeDecodeError:
        raise InputError(f"{str(manifest)!r}: not a text manifest (not UTF-8); list one audio path per line") from None


def manifest_entries(manifest: str | os.PathLike) -> Iterator[tuple[str, float | None]]:
    """``(path as written, duration in seconds or None)`` per entry of a manifest, read line by line:
    one path per line (``#`` starts a comment), or a CSV / TSV whose header names a path column and
    optionally a ``duration`` column."""
    manifest = Path(manifest)
    lines = (line.rstrip("\r\n") for line in _manifest_text_lines(manifest)
             if line.strip() and not line.lstrip().startswith("#"))
    first = next(lines, None)
    if first is None:
        return
    delimiter = "\t" if "\t" in first else "," if "," in first else None
    if not (delimiter or manifest.suffix.lower() in {".csv", ".tsv"}):
        yield first.strip(), None
        yield from ((line.strip(), None) for line in lines)
        return
    rows = csv.reader(itertools.chain([first], lines), delimiter=delimiter or ",")
    header_row = next(rows)
    header = [cell.strip().lower() for cell in header_row]
    column = path_column(manifest, header_row)
    seconds = header.index("duration") if "duration" in header else None
    for number, row in enumerate(rows, start=2):
        if len(row) <= column or not row[column].strip():
            continue
        duration = None
        if seconds is not None and len(row) > seconds and row[seconds].strip():
            try:
                duration = float(row[seconds])
            except ValueError:
                raise InputError(f"{str(manifest)!r} line {number}: duration {row[seconds]!r} is not a number") from None
        yield row[column].strip(), duration


def _resolve(manifest: Path, entry: str) -> Path:
    path = Path(entry).expanduser()
    return path if path.is_absolute() else manifest.parent / path


def read_manifest(manifest: str | os.PathLike) -> list[tuple[Path, float | None]]:
    """Paths (and durations in seconds, when a ``duration`` column gives them) listed by a manifest
    (see :func:`manifest_entries`). Relative paths are relative to the manifest's folder."""
    return [(_resolve(Path(manifest), entry), duration) for entry, duration in manifest_entries(manifest)]


def find_inputs(
    arguments: list[str], manifest: str | os.PathLike | None = None, special: list[Path] | None = None
) -> list[AudioInput]:
    """Expand command-line inputs into audio files, in a stable order, without duplicates.

    A folder is searched recursively for audio suffixes (FIFOs, sockets and devices found there are
    skipped, and appended to ``special`` if given); a pattern with ``*``, ``?`` or ``[`` is
    globbed (``**`` recurses) and every match is kept, so a matching folder is reported when it is
    decoded; any other argument is taken as a file, existing or not.
    """
    found: list[AudioInput] = []
    for argument in arguments:
        path = Path(argument)
        if path.is_dir():
            found.extend(scan_folder(path, special))
        elif not path.exists() and _GLOB_CHARS & set(argument):
            root = _glob_root(argument)
            found.extend(AudioInput(Path(m), _under_root(Path(m), root)) for m in sorted(glob.glob(argument, recursive=True)))
        else:
            found.append(AudioInput(path, Path(path.name)))
    if manifest is not None:
        found.extend(_manifest_inputs(Path(manifest)))
    again = {later for _, later in repeats(found, lambda item: os.path.abspath(item.path_str))}
    return [item for index, item in enumerate(found) if index not in again] if again else found
