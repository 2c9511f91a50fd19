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

__all__ = ["AUDIO_SUFFIXES", "AudioInput", "InputError", "find_inputs"]

AUDIO_SUFFIXES = frozenset(
    {".wav", ".wave", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".aifc", ".au", ".snd",
     ".caf", ".w64", ".rf64"}
)
_GLOB_CHARS = set("*?[")
_PATH_COLUMNS = ("path", "filepath", "file", "filename", "audio", "audio_path")


class InputError(ValueError):
    """Inputs that cannot be used at all (e.g. a manifest without a path column)."""


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


def _scan(folder: Path) -> list[AudioInput]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()
        for name in sorted(filenames):
            if Path(name).suffix.lower() in AUDIO_SUFFIXES:
                path = Path(dirpath) / name
                found.append(AudioInput(path, path.relative_to(folder)))
    return found


def _glob_root(pattern: str) -> Path:
    parts = Path(pattern).parts
    fixed = [part for part in parts[: next(i for i, p in enumerate(parts) if _GLOB_CHARS & set(p))]]
    return Path(*fixed) if fixed else Path(".")


def _read_manifest(manifest: Path) -> list[AudioInput]:
    """One path per line, or a CSV / TSV whose header names a path column; relative paths are
    relative to the manifest's folder."""
    text = manifest.read_text(encoding="utf-8-sig")
    lines = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not lines:
        return []
    delimiter = "\t" if "\t" in lines[0] else "," if "," in lines[0] else None
    paths: list[str]
    if delimiter or manifest.suffix.lower() in {".csv", ".tsv"}:
        rows = list(csv.reader(lines, delimiter=delimiter or ","))
        header = [cell.strip().lower() for cell in rows[0]]
        column = next((header.index(name) for name in _PATH_COLUMNS if name in header), None)
        if column is None:
            raise InputError(
                f"{str(manifest)!r}: no path column in the header {rows[0]}; name one of {', '.join(_PATH_COLUMNS)}"
            )
        paths = [row[column].strip() for row in rows[1:] if len(row) > column and row[column].strip()]
    else:
        paths = [line.strip() for line in lines]
    root = manifest.parent
    inputs = []
    for entry in paths:
        path = Path(entry).expanduser()
        path = path if path.is_absolute() else root / path
        inputs.append(AudioInput(path, _under_root(path, root)))
    return inputs


def find_inputs(arguments: list[str], manifest: str | os.PathLike | None = None) -> list[AudioInput]:
    """Expand command-line inputs into audio files, in a stable order, without duplicates.

    A folder is searched recursively for audio suffixes; a pattern with ``*``, ``?`` or ``[`` is
    globbed (``**`` recurses) and every match is kept, so a matching folder is reported when it is
    decoded; any other argument is taken as a file, existing or not.
    """
    found: list[AudioInput] = []
    for argument in arguments:
        path = Path(argument)
        if path.is_dir():
            found.extend(_scan(path))
        elif not path.exists() and _GLOB_CHARS & set(argument):
            root = _glob_root(argument)
            found.extend(AudioInput(Path(m), _under_root(Path(m), root)) for m in sorted(glob.glob(argument, recursive=True)))
        else:
            found.append(AudioInput(path, Path(path.name)))
    if manifest is not None:
        found.extend(_read_manifest(Path(manifest)))
    unique, seen = [], set()
    for item in found:
        key = os.path.abspath(item.path)
        if key not in seen:
            seen.add(key)
            unique.append(item)
    return unique
