"""Finding the audio files a command should process: files, folders, globs and manifests.

Each input keeps the path relative to the folder it was found under, so outputs can mirror the
input tree. Nothing is decoded here: a bad path is reported when it is decoded, and the batch
goes on.
"""

from __future__ import annotations

import csv
import glob
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError

__all__ = [
    "AUDIO_SUFFIXES", "AudioInput", "find_inputs", "manifest_lines", "path_column", "read_manifest",
    "scan_folder",
]

AUDIO_SUFFIXES = frozenset(
    {".wav", ".wave", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".aifc", ".au", ".snd",
     ".caf", ".w64", ".rf64"}
)
_GLOB_CHARS = set("*?[")
_PATH_COLUMNS = ("path", "filepath", "file", "filename", "audio", "audio_path")



@dataclass(frozen=True)
class AudioInput:
    """An audio file to process and its path relative to the root it was found under."""

    path: Path
    relative: Path


def _under_root(path: Path, root: Path) -> Path:
    try:
        return path.relative_to(root)
    except ValueError:  # outside the root: mirror the absolute path below the output folder
        return Path(*path.resolve().parts[1:])


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


def read_manifest(manifest: str | os.PathLike) -> list[tuple[Path, float | None]]:
    """Paths (and durations in seconds, when a ``duration`` column gives them) listed by a manifest:
    one path per line (``#`` starts a comment), or a CSV / TSV whose header names a path column.
    Relative paths are relative to the manifest's folder."""
    manifest = Path(manifest)
    try:
        text = manifest.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise InputError(f"{str(manifest)!r}: not a text manifest (not UTF-8); list one audio path per line") from None
    lines = manifest_lines(text)
    if not lines:
        return []
    delimiter = "\t" if "\t" in lines[0] else "," if "," in lines[0] else None
    entries: list[tuple[str, float | None]]
    if delimiter or manifest.suffix.lower() in {".csv", ".tsv"}:
        rows = list(csv.reader(lines, delimiter=delimiter or ","))
        header = [cell.strip().lower() for cell in rows[0]]
        column = path_column(manifest, rows[0])
        seconds = header.index("duration") if "duration" in header else None
        entries = []
        for number, row in enumerate(rows[1:], start=2):
            if len(row) <= column or not row[column].strip():
                continue
            duration = None
            if seconds is not None and len(row) > seconds and row[seconds].strip():
                try:
                    duration = float(row[seconds])
                except ValueError:
                    raise InputError(f"{str(manifest)!r} line {number}: duration {row[seconds]!r} is not a number") from None
            entries.append((row[column].strip(), duration))
    else:
        entries = [(line.strip(), None) for line in lines]
    resolved = []
    for entry, duration in entries:
        path = Path(entry).expanduser()
        resolved.append((path if path.is_absolute() else manifest.parent / path, duration))
    return resolved


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
        root = Path(manifest).parent
        found.extend(AudioInput(path, _under_root(path, root)) for path, _ in read_manifest(manifest))
    unique, seen = [], set()
    for item in found:
        key = os.path.abspath(item.path)
        if key not in seen:
            seen.add(key)
            unique.append(item)
    return unique
