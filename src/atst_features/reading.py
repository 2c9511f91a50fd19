"""Reading embedding outputs back, whatever their form, and exporting them as HEAR-style memmap files.

:func:`read_embeddings` reads the per-file forms of :mod:`atst_features.outputs` (npz, npy, pt) and the tar
shards of :mod:`atst_features.shards`, one output at a time; :func:`export_memmap` gathers them into one
``embeddings.npy`` with the names of its rows, as hear-eval-kit organises its memmap files.
"""

from __future__ import annotations

import itertools
import json
import os
import pickle
import tarfile
import zipfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from .errors import InputError, one_line_message
from .outputs import KEYS, _as_numpy, _atomic

__all__ = ["export_memmap", "read_embeddings"]

_EXPECTED = ".npz, .pt, .meta.json with its .npy files, or shard .tar files"
_LISTINGS = {"clip": "filenames.json", "frame": "filename-timestamps.json"}


def _arrays(values) -> dict:
    """Those of ``clip``, ``frame``, ``timestamps`` (float32), ``model`` (str), ``n_blocks`` (int) in ``values``."""
    arrays = {key: _as_numpy(values[key]) for key in KEYS if key in values}
    if "model" in values:
        arrays["model"] = str(values["model"])
    if "n_blocks" in values:
        arrays["n_blocks"] = int(values["n_blocks"])
    return arrays


@contextmanager
def _explained_read_errors(path: Path) -> Iterator[None]:
    """A torn or foreign file as one :class:`InputError` naming it."""
    try:
        yield
    except InputError:
        raise
    except (OSError, ValueError, EOFError, KeyError, RuntimeError, tarfile.TarError, zipfile.BadZipFile,
            pickle.UnpicklingError) as error:
        raise InputError(f"cannot read {str(path)!r} as embeddings ({one_line_message(error)}): a torn or foreign "
                         "file; write it again with atst-embed") from None


def _read_npz(path: Path) -> Iterator[tuple[str, dict]]:
    """The npz form: one ``<base>.npz``."""
    with np.load(path, allow_pickle=False) as archive:
        arrays = _arrays(archive)
    yield str(path.with_suffix("")), arrays


def _read_pt(path: Path) -> Iterator[tuple[str, dict]]:
    """The pt form: one ``<base>.pt``, loaded with ``weights_only=True`` (no code runs)."""
    values = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(values, dict):
        raise InputError(f"{str(path)!r} holds a {type(values).__name__}, not a dict of embeddings; write it again "
                         "with atst-embed")
    yield str(path.with_suffix("")), _arrays(values)


def _read_npy_form(meta: Path) -> Iterator[tuple[str, dict]]:
    """The npy form: ``<base>.meta.json`` names the ``<base>.<key>.npy`` files in its ``arrays`` list."""
    base = str(meta)[:-len(".meta.json")]
    metadata = json.loads(meta.read_text(encoding="utf-8"))
    arrays = {key: np.load(f"{base}.{key}.npy", allow_pickle=False) for key in metadata.pop("arrays")}
    yield base, _arrays({**metadata, **arrays})


def _read_shard(path: Path) -> Iterator[tuple[str, dict]]:
    """The samples of a shard in tar order, read as a stream, one at a time."""
    with tarfile.open(path, "r|") as tar:
        key, sample = None, {}
        for member in tar:
            folder, _, name = member.name.rpartition("/")
            stem, _, suffix = name.partition(".")
            if not member.isreg() or suffix not in ("json", *(f"{array}.npy" for array in KEYS)):
                continue
            if (folder, stem) != key and sample:
                yield _shard_sample(path, sample)
                sample = {}
            key, handle = (folder, stem), tar.extractfile(member)
            if suffix == "json":
                sample["json"] = json.load(handle)
            else:  # numpy takes a tar member for a real file (it has no fileno): give it only read()
                sample[suffix[:-len(".npy")]] = np.lib.format.read_array(SimpleNamespace(read=handle.read))
        if sample:
            yield _shard_sample(path, sample)


def _shard_sample(shard: Path, sample: dict) -> tuple[str, dict]:
    """``(input path, arrays)`` of one sample's members (``json`` and arrays by name)."""
    if "json" not in sample:
        raise InputError(f"{str(shard)!r} has a sample without its .json member: not an atst-features shard")
    metadata = sample.pop("json")
    return metadata["path"], _arrays({**metadata, **sample})


def _reader(path: Path):
    """The reader of the output file ``path``, chosen by its name, or None."""
    if path.name.endswith(".meta.json"):
        return _read_npy_form
    return {".npz": _read_npz, ".pt": _read_pt, ".tar": _read_shard}.get(path.suffix)


def _walk(folder: Path) -> Iterator[Path]:
    """The output files in ``folder`` and its subfolders, listed as they are read (a folder's files by name,
    then its subfolders by name), without hidden temporaries (``.atst-*``)."""
    for parent, folders, names in os.walk(folder):
        folders.sort()
        for name in sorted(names):
            file = Path(parent, name)
            if _reader(file) and not name.startswith(".atst-") and file.is_file():
                yield file


def _outputs(path: Path) -> Iterable[Path]:
    """The output files at ``path``: the file itself (a ``.npy`` of the npy form stands for its ``.meta.json``),
    or those in the folder and its subfolders (see :func:`_walk`)."""
    if path.is_dir():
        found = _walk(path)
        first = next(found, None)
        if first is None:
            raise InputError(f"no embedding outputs in {str(path)!r}: expected {_EXPECTED}")
        return itertools.chain([first], found)
    if not path.exists():
        raise InputError(f"no such file or folder: {str(path)!r}; expected embedding outputs ({_EXPECTED}) or a folder "
                         "of them")
    stem, _, suffix = path.name.rpartition(".")
    meta = path.with_name(f"{stem.rpartition('.')[0]}.meta.json")
    if suffix == "npy" and meta.is_file():
        return [meta]
    if _reader(path) is None:
        raise InputError(f"{str(path)!r} is not an embedding output: expected {_EXPECTED}")
    return [path]


def read_embeddings(path: str | os.PathLike) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
    """The embeddings at ``path`` (an output file or a folder of them, searched recursively, in any mix of
    forms), one output at a time: ``(name, arrays)``, a folder's files by name before its subfolders', shards' samples in
    tar order.

    ``name``: for a shard's sample, the input's path (as given to the writer); for the per-file forms, the
    output's base path without suffix (``out/a`` for ``out/a.npz`` or ``out/a.meta.json``). ``arrays``:
    ``clip [E]``, ``frame [T, D]``, ``timestamps [T]`` (ms), float32, those written, with ``model`` (str) and
    ``n_blocks`` (int) where known. :class:`InputError` at the call for a missing path or one without
    outputs, and while reading for a torn or foreign file."""
    outputs = _outputs(Path(path))
    return (item for output in outputs for item in _explained(output))


def _explained(output: Path) -> Iterator[tuple[str, dict]]:
    """What the output file ``output`` holds; a torn or foreign file is an :class:`InputError`."""
    with _explained_read_errors(output):
        yield from _reader(output)(output)


def _rows(name: str, arrays: dict, level: str) -> np.ndarray:
    """The ``level``'s embeddings of one output as rows: clip ``[1, E]``, frame ``[T, D]``."""
    needed = ("clip",) if level == "clip" else ("frame", "timestamps")
    missing = [key for key in needed if key not in arrays]
    if missing:
        raise InputError(f"{name!r} has no {' or '.join(missing)} array; extract its {level} embeddings (atst-embed "
                         f"--level {level} or both) or export another level")
    return arrays[level].reshape(-1, arrays[level].shape[-1])


def export_memmap(path: str | os.PathLike, folder: str | os.PathLike, level: str = "clip") -> Path:
    """Write the embeddings :func:`read_embeddings` yields from ``path`` into ``folder``, as hear-eval-kit
    organises them, and return ``<folder>/embeddings.npy``, a float32 ``.npy`` (``np.load(..., mmap_mode="r")``):

    - ``level="clip"``: ``embeddings.npy [N, E]``, one row per output, and ``filenames.json``, the N names;
    - ``level="frame"``: ``embeddings.npy [sum of T, D]``, one row per frame, and ``filename-timestamps.json``,
      ``[name, timestamp in ms]`` per row.

    Reads the outputs twice (sizes, then values), holding one at a time. :class:`InputError` for an output
    without the level's arrays, or embedding sizes that differ."""
    if level not in _LISTINGS:
        raise InputError(f"level must be 'clip' or 'frame', got {level!r}")
    total, width = 0, None
    for name, arrays in read_embeddings(path):
        rows = _rows(name, arrays, level)
        if width is not None and rows.shape[1] != width:
            raise InputError(f"{name!r} has {level} embeddings of size {rows.shape[1]}, the outputs before it {width}: "
                             "export the outputs of one model and n_blocks together")
        total, width = total + len(rows), rows.shape[1]
    if total == 0:
        raise InputError(f"no {level} embeddings in {str(path)!r}")
    target = Path(folder) / "embeddings.npy"
    with _atomic(target) as temporary, _atomic(target.with_name(_LISTINGS[level])) as listing_temporary, \
            open(listing_temporary, "w", encoding="utf-8") as listing:
        embeddings = np.lib.format.open_memmap(temporary, mode="w+", dtype=np.float32, shape=(total, width))
        row, separator = 0, "["
        for name, arrays in read_embeddings(path):
            rows = _rows(name, arrays, level)
            embeddings[row:row + len(rows)] = rows
            row += len(rows)
            for entry in [name] if level == "clip" else [[name, float(time)] for time in arrays["timestamps"]]:
                listing.write(separator + json.dumps(entry))
                separator = ", "
        listing.write("]\n")
        embeddings.flush()
        del embeddings
    return target
