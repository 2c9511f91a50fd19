"""Where atst-embed writes: one output per input (npz, npy, pt; beside the input, into a folder
mirroring the inputs' tree, or one named file), or WebDataset tar shards in a folder
(:mod:`atst_features.shards`). Each knows which inputs are already done, so that a rerun resumes."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import click

from ..inputs import AudioInput, repeats
from ..outputs import FrameStream, output_files, write_outputs
from ..shards import ShardWriter, completed_inputs, sample_key

__all__ = ["FileOutputs", "Outputs", "ShardOutputs"]


@dataclass(frozen=True)
class FileOutputs:
    """One output per input, in format ``fmt`` (``npz``, ``npy``, ``pt``), with ``metadata``: at
    ``output`` (one input), else under ``output_dir`` at the input's relative path, else beside the input."""

    fmt: str
    metadata: dict
    keys: tuple[str, ...]  # the arrays written: clip, frame, timestamps
    output_dir: Path | None = None
    output: Path | None = None

    def base(self, item: AudioInput) -> Path:
        """The output path of ``item`` without suffix."""
        if self.output is not None:
            return self.output.with_name(self.output.stem)
        return Path(self.output_dir or "", self._name(item))

    def stream_base(self, item: AudioInput) -> Path:
        """Where a long input's frame embeddings are streamed to (a temporary file beside this path)."""
        return self.base(item)

    def _name(self, item: AudioInput) -> str:
        """What tells ``item``'s output apart from the others': its relative path (with -d) or path, less the suffix."""
        text = item.relative_str if self.output_dir is not None else item.path_str
        name = text.rpartition(os.sep)[2]
        dot = name.rfind(".")
        return text[: len(text) - len(name) + dot] if 0 < dot < len(name) - 1 else text  # as Path.stem cuts

    def check_distinct(self, items: list[AudioInput]) -> None:
        """A usage error when two inputs would write the same output."""
        for first, later in repeats(items, self._name)[:1]:
            path = output_files(self.base(items[first]), self.fmt, list(self.keys))[0]
            raise click.UsageError(f"{items[first].path_str!r} and {items[later].path_str!r} would both write {str(path)!r}")

    def todo(self, items: list[AudioInput]) -> list[AudioInput]:
        """The inputs whose output files are not all there (each output folder listed once while its inputs come
        in a row, as sorted inputs do: a million outputs are checked without a million system calls)."""
        listed: tuple[Path | None, frozenset[str]] = (None, frozenset())
        todo = []
        for item in items:
            files = output_files(self.base(item), self.fmt, list(self.keys))
            if listed[0] != files[0].parent:
                try:
                    listed = (files[0].parent, frozenset(os.listdir(files[0].parent)))
                except OSError:
                    listed = (files[0].parent, frozenset())
            if not all(path.name in listed[1] for path in files):
                todo.append(item)
        return todo

    def part(self, job: int) -> FileOutputs:
        """The outputs of ``--jobs`` process ``job`` (the same: files are per input)."""
        return self

    def write(self, item: AudioInput, arrays: dict, frames: FrameStream | None) -> None:
        write_outputs(self.base(item), self.fmt, arrays, self.metadata, frames)

    def close(self) -> None:
        """Nothing is held open between inputs."""



@dataclass
class ShardOutputs:
    """WebDataset tar shards in ``folder`` (:mod:`atst_features.shards`), ``per_shard`` inputs each, written
    by this process as ``<writer>-<seq>.tar``. An input is done once a complete shard there holds it (by
    absolute path): a rerun skips it, and redoes the inputs of a shard that was not finished."""

    folder: Path
    metadata: dict
    per_shard: int
    writer: str = "shard"
    _shards: ShardWriter | None = field(default=None, init=False, repr=False)  # made in the process that writes

    def stream_base(self, item: AudioInput) -> Path:
        """Where a long input's frame embeddings are streamed to (a temporary file beside this path)."""
        return self.folder / "frames"

    def check_distinct(self, items: list[AudioInput]) -> None:
        """A usage error when two inputs would be the same sample (their keys, relative paths without suffix, agree)."""
        for first, later in repeats(items, lambda item: sample_key(item.relative_str))[:1]:
            raise click.UsageError(f"{items[first].path_str!r} and {items[later].path_str!r} would both be sample "
                                   f"{sample_key(items[first].relative_str)!r} of the shards: rename one, or embed them "
                                   "in separate runs")

    def todo(self, items: list[AudioInput]) -> list[AudioInput]:
        """The inputs that no complete shard in the folder holds."""
        # The absolute paths are made twice rather than held: a million of them would cost ~130 MB.
        wanted = {hash(os.path.abspath(item.path_str)) for item in items}
        done = completed_inputs(self.folder, among=lambda path: hash(path) in wanted)
        return [item for item in items if os.path.abspath(item.path_str) not in done]

    def part(self, job: int) -> ShardOutputs:
        """The outputs of ``--jobs`` process ``job``: shards of its own name."""
        return replace(self, writer=f"{self.writer}-job{job + 1}")

    def write(self, item: AudioInput, arrays: dict, frames: FrameStream | None) -> None:
        if self._shards is None:
            self._shards = ShardWriter(self.folder, self.writer, self.per_shard)
        self._shards.add(os.path.abspath(item.path_str), item.relative_str, arrays, self.metadata, frames)

    def close(self) -> None:
        """Finish the open shard: the inputs written so far are complete."""
        if self._shards is not None:
            self._shards.close()


Outputs = FileOutputs | ShardOutputs  # what atst-embed's pipeline writes to
