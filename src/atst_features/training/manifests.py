"""Labelled audio for probes and downstream training: manifests and label folders.

A manifest is a CSV or TSV file with a header:

- ``path`` (or ``file``, ``filename``, ``audio``...): the audio file, relative to the manifest's folder;
- ``label`` (one class per row: single-label) or ``labels`` (several, separated by ``;`` or ``,``:
  multi-label);
- optional ``split`` (``train``, ``valid`` or ``test``) and ``group`` (items of one group, e.g.
  clips cut from one recording, always land on the same side of a split); the group column may also
  be named as datasets name it (:data:`GROUP_COLUMNS`: ``source``, ``recording``, ESC-50's
  ``src_file``, UrbanSound8K's ``fsID``, ...); :func:`groups_note` says which one was used.

A folder ``root/<label>/*.wav`` is a shortcut for a single-label manifest without splits.
Label names are kept in the order they first appear. A bad row raises :class:`InputError`
naming the file, the line and the fix.
"""

from __future__ import annotations

import csv
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from ..inputs import AUDIO_SUFFIXES, manifest_lines, path_column, scan_folder

__all__ = [
    "GROUP_COLUMNS", "SPLITS", "LabelledItem", "LabelledSet", "group_of", "grouped_folds", "grouped_holdout", "groups_note",
    "read_labelled", "split_items",
]

SPLITS = ("train", "valid", "test")
_SPLIT_ALIASES = {"train": "train", "training": "train", "valid": "valid", "validation": "valid", "val": "valid",
                  "dev": "valid", "test": "test", "eval": "test", "evaluation": "test"}
# The names of a group column (lower case), by precedence: the first one a header has is used.
GROUP_COLUMNS = ("group", "source", "recording", "recording_id", "src_file", "fsid")


@dataclass(frozen=True)
class LabelledItem:
    """One audio file, its labels, and where it belongs (``split``, ``group``; None when not given)."""

    path: Path
    labels: tuple[str, ...]
    split: str | None = None
    group: str | None = None


@dataclass(frozen=True)
class LabelledSet:
    """Items, their label names (in order of first appearance), whether rows carry several labels and
    the manifest's group column (None: each item is its own group)."""

    items: tuple[LabelledItem, ...]
    label_names: tuple[str, ...]
    multi_label: bool
    group_column: str | None = None

    def split(self, name: str) -> list[LabelledItem]:
        return [item for item in self.items if item.split == name]

    @property
    def has_splits(self) -> bool:
        return all(item.split is not None for item in self.items)

    def targets(self, items: list[LabelledItem]):
        """Class indices ``[N]`` (single-label) or a multi-hot float tensor ``[N, C]`` (multi-label)."""
        import torch

        index = {name: i for i, name in enumerate(self.label_names)}
        if self.multi_label:
            y = torch.zeros(len(items), len(index))
            for row, item in enumerate(items):
                y[row, [index[label] for label in item.labels]] = 1
            return y
        return torch.tensor([index[item.labels[0]] for item in items])


def _folder(root: Path) -> LabelledSet:
    items = []
    for entry in scan_folder(root):
        parts = entry.relative.parts
        if len(parts) < 2:
            raise InputError(f"{str(entry.path)!r} lies directly in {str(root)!r}; put each file in a folder named by its label")
        items.append(LabelledItem(entry.path, (parts[0],)))
    if not items:
        raise InputError(f"{str(root)!r}: no audio files in label folders (expected {root}/<label>/*.wav)")
    names = tuple(dict.fromkeys(item.labels[0] for item in items))
    return LabelledSet(tuple(items), names, multi_label=False)


def _cells(row: list[str]):
    """``cell(column)``: the stripped text of ``row`` at ``column``; "" when absent."""
    return lambda column: row[column].strip() if column is not None and column < len(row) else ""


def read_labelled(source: str | os.PathLike) -> LabelledSet:
    """Read a labelled manifest (CSV/TSV) or a folder of label folders; see the module docstring."""
    source = Path(source)
    if source.is_dir():
        return _folder(source)
    try:
        text = source.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"{str(source)!r}: cannot read the manifest ({error})") from None
    lines = manifest_lines(text)
    if len(lines) < 2:
        raise InputError(f"{str(source)!r}: a labelled manifest needs a header and at least one row")
    delimiter = "\t" if "\t" in lines[0] else ","
    rows = list(csv.reader(lines, delimiter=delimiter))
    header = [cell.strip().lower() for cell in rows[0]]
    path_at = path_column(source, rows[0])
    if "label" in header and "labels" in header:
        raise InputError(f"{str(source)!r}: both 'label' and 'labels' columns; keep one ('labels' for multi-label)")
    if "label" not in header and "labels" not in header:
        raise InputError(f"{str(source)!r}: no 'label' (single-label) or 'labels' (multi-label) column in {rows[0]}")
    multi = "labels" in header
    label_column = header.index("labels" if multi else "label")
    split_column = header.index("split") if "split" in header else None
    group_name = next((name for name in GROUP_COLUMNS if name in header), None)
    group_column = header.index(group_name) if group_name else None
    items = []
    for number, row in enumerate(rows[1:], start=2):
        where = f"{str(source)!r} line {number}"
        cell = _cells(row)
        if not cell(path_at):
            raise InputError(f"{where}: empty path")
        path = Path(cell(path_at)).expanduser()
        path = path if path.is_absolute() else source.parent / path
        if not path.is_file():
            raise InputError(f"{where}: no such audio file {str(path)!r}; fix the path (relative paths start at the manifest's folder)")
        if path.suffix.lower() not in AUDIO_SUFFIXES:
            raise InputError(f"{where}: {path.name!r} is not an audio file ({', '.join(sorted(AUDIO_SUFFIXES))})")
        labels = tuple(label.strip() for label in re.split(r"[;,]", cell(label_column)) if label.strip()) if multi \
            else ((cell(label_column),) if cell(label_column) else ())
        if not labels and not multi:
            raise InputError(f"{where}: empty label")
        split = None
        if split_column is not None:
            split = _SPLIT_ALIASES.get(cell(split_column).lower())
            if split is None:
                raise InputError(f"{where}: unknown split {cell(split_column)!r}; use train, valid or test")
        items.append(LabelledItem(path, labels, split, cell(group_column) or None))
    names = tuple(dict.fromkeys(label for item in items for label in item.labels))
    return LabelledSet(tuple(items), names, multi_label=multi, group_column=rows[0][group_column].strip() if group_name else None)


def groups_note(data: LabelledSet) -> str:
    """Where the groups of ``data`` come from, for a summary line."""
    if data.group_column is None:
        return f"no group column ({', '.join(GROUP_COLUMNS)}): each clip is its own group"
    return f"groups from the {data.group_column!r} column"


def group_of(item: LabelledItem) -> str:
    """The item's group (recording), or its path when the manifest gives none."""
    return item.group or str(item.path)


def grouped_holdout(groups: list[str], share: float, seed: int, strata: list[str] | None = None) -> list[bool]:
    """A seeded hold-out of about ``share`` of the groups (at least one); True marks the held-out
    items. With ``strata`` (e.g. each item's label; a group counts in the stratum of its first
    item), about ``share`` of each stratum's groups, and never all of a stratum with two or more."""
    stratum_of: dict[str, str] = {}
    for group, stratum in zip(groups, strata or [""] * len(groups)):
        stratum_of.setdefault(group, stratum)
    members: dict[str, list[str]] = {}
    for group in sorted(stratum_of):
        members.setdefault(stratum_of[group], []).append(group)
    rng, held = random.Random(seed), set()
    for stratum in sorted(members):
        unique = members[stratum]
        rng.shuffle(unique)
        count = max(1, round(len(unique) * share))
        if strata is not None and len(unique) > 1:
            count = min(count, len(unique) - 1)
        held.update(unique[:count])
    return [group in held for group in groups]


def grouped_folds(groups: list[str], folds: int, seed: int) -> list[int]:
    """The fold (0 .. folds-1) of each item: whole groups, shuffled with ``seed``, dealt round-robin."""
    unique = sorted(set(groups))
    random.Random(seed).shuffle(unique)
    fold_of = {group: index % folds for index, group in enumerate(unique)}
    return [fold_of[group] for group in groups]


def _hold_out(items: list[LabelledItem], share: float, seed: int) -> tuple[list[LabelledItem], list[LabelledItem]]:
    held = grouped_holdout([group_of(item) for item in items], share, seed)
    return [i for i, h in zip(items, held) if not h], [i for i, h in zip(items, held) if h]


def split_items(
    data: LabelledSet, *, seed: int = 0, test_share: float = 0.3, valid_share: float = 0.15
) -> tuple[dict[str, list[LabelledItem]], str]:
    """Train, valid and test items, and how they were chosen.

    With a ``split`` column, its values; a missing valid split is then carved from train. Without
    one: whole groups (recordings) are held out, ``test_share`` of them for test (seed ``seed + 1``),
    then ``valid_share`` of the rest for valid (seed ``seed + 2``). No group is on two sides.
    """
    if data.has_splits:
        splits = {name: data.split(name) for name in SPLITS}
        how = "the manifest's split column"
        if not splits["train"]:
            raise InputError("the manifest's split column has no train rows")
    else:
        rest, test = _hold_out(list(data.items), test_share, seed + 1)
        splits = {"train": rest, "valid": [], "test": test}
        how = f"seeded grouped hold-outs ({test_share:.0%} test, seed {seed}; no split column)"
    if not splits["valid"] and valid_share > 0:
        if len({group_of(item) for item in splits["train"]}) < 2:
            raise InputError("the train split needs at least two groups (recordings) to hold some out for validation")
        splits["train"], splits["valid"] = _hold_out(splits["train"], valid_share, seed + 2)
        how += f", valid {valid_share:.0%} of the train groups"
    return splits, how
