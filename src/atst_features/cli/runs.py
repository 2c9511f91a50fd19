"""A run over many audio files: decoding ahead in worker processes (the decoder's own notes on damaged
files dropped), per-file reporting (one ``error:`` line per failed file, the others counted), the progress
bar and the summary, and interruption by SIGTERM."""

from __future__ import annotations

import functools
import math
import os
import sys
import threading
import time
from abc import ABC, abstractmethod
from contextlib import contextmanager, suppress
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from ..audio import load_audio
from ..errors import NonFiniteError, expected_failure, one_line_message
from ..inputs import AudioInput

__all__ = ["FILES_PER_TRANSFER", "TRANSFER_BYTES", "Reporter", "Run", "decoded", "python_stderr_kept",
           "raise_keyboard_interrupt"]

FILES_PER_TRANSFER = 32  # files a decoding worker hands over at once, at most
TRANSFER_BYTES = 2**22  # ... and fewer once they take this much space on disk


@contextmanager
def python_stderr_kept():
    """Inside: Python's ``sys.stderr`` writes to a duplicate of file descriptor 2, so that what the command prints
    (progress bar, ``error:`` lines, tracebacks) reaches the terminal while decoding points fd 2 itself elsewhere
    (:class:`_DecoderNotesDropped`). Nothing changes where sys.stderr is not fd 2 (tests, notebooks)."""
    try:
        on_fd2 = sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both of the last two
        on_fd2 = False
    if not on_fd2:
        yield
        return
    python_stderr = sys.stderr
    python_stderr.flush()
    sys.stderr = open(os.dup(2), "w", buffering=1, encoding=python_stderr.encoding, errors=python_stderr.errors)
    try:
        yield
    finally:
        sys.stderr.close()
        sys.stderr = python_stderr


class _DecoderNotesDropped:
    """Inside (from any number of threads at once): fd 2 points at the null device. libsndfile's MP3 decoder
    (mpg123) writes notes on damaged frames there from C ("Note: Illegal Audio-MPEG-Header ...", "[...layer3.c...]
    error: ..."); the file's one ``error:`` line says what matters. Python's own output goes on through
    :func:`python_stderr_kept`. Costs about 10 us per file (a few system calls), against milliseconds to decode one."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.inside = 0
        self.terminal: int | None = None

    def __enter__(self) -> None:
        with self.lock:
            self.inside += 1
            if self.inside == 1:
                self.terminal = os.dup(2)
                try:
                    null = os.open(os.devnull, os.O_WRONLY)
                    try:
                        os.dup2(null, 2)
                    finally:
                        os.close(null)
                except BaseException:  # an interruption half-way (SIGTERM is a KeyboardInterrupt here) undoes it
                    self.inside -= 1
                    self._restore()
                    raise

    def __exit__(self, *exc) -> None:
        with self.lock:
            try:
                self.inside -= 1
            finally:
                if not self.inside:
                    self._restore()

    def _restore(self) -> None:
        try:
            os.dup2(self.terminal, 2)
        finally:
            os.close(self.terminal)


_decoder_notes_dropped = _DecoderNotesDropped()


def _decode(path: str | Path) -> np.ndarray | BaseException:
    """The waveform of ``path`` or, for a file that fails in an expected way, its error (reported per file,
    the run goes on); anything else (a bug) is raised."""
    try:
        with _decoder_notes_dropped:
            return load_audio(path)[0]
    except Exception as error:
        if expected_failure(error):
            return error
        raise


class _Files(Dataset):
    """The files of a run by index, decoded on demand (in DataLoader workers). Their paths are packed into one
    bytes object and an offsets array, not held as one Python object per file: forked workers then touch no
    per-file reference counts, so those pages stay shared with the parent (a million paths of 47 characters: 55 MB)."""

    def __init__(self, items: list[AudioInput]) -> None:
        names = [os.fsencode(item.path_str) for item in items]
        self.names = b"".join(names)
        self.ends = np.cumsum([len(name) for name in names], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.ends)

    def __getitem__(self, index: int) -> np.ndarray | BaseException:
        start = self.ends[index - 1] if index else 0
        return _decode(os.fsdecode(self.names[start : self.ends[index]]))


class _Transfers(Sampler):
    """Consecutive indices of ``items``, in the groups a worker hands over at once: ``FILES_PER_TRANSFER`` files,
    fewer once their size on disk reaches ``TRANSFER_BYTES`` (a long recording goes alone), so that the audio
    decoded ahead stays bounded. Runs in the parent, a group at a time."""

    def __init__(self, items: list[AudioInput]) -> None:
        self.items = items

    def __iter__(self):
        group, size = [], 0
        for index, item in enumerate(self.items):
            group.append(index)
            with suppress(OSError):  # a missing file fails when decoded, with its own message
                size += os.stat(item.path_str).st_size
            if len(group) == FILES_PER_TRANSFER or size >= TRANSFER_BYTES:
                yield group
                group, size = [], 0
        if group:
            yield group


@functools.cache  # a process's limit: asked once, not for every group of files
def _file_size_limit() -> float:
    try:
        import resource
    except ImportError:  # Windows
        return math.inf
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return math.inf if limit == resource.RLIM_INFINITY else limit


def _fits_in_shared_memory(nbytes: int) -> bool:
    """Whether ``nbytes`` fit in Linux's shared memory (/dev/shm: Docker's holds 64 MB) and under this process's
    file size limit, which shared memory counts against. Checked first because torch, failing there, leaves its
    file behind."""
    with suppress(OSError):  # no /dev/shm: other systems, where torch's own error is all there is
        space = os.statvfs("/dev/shm")
        if nbytes > space.f_bavail * space.f_frsize:
            return False
    return nbytes <= _file_size_limit()


def _joined(results: list[np.ndarray | BaseException]) -> tuple[torch.Tensor | np.ndarray, list[int | BaseException]]:
    """A worker's group of files as one float32 array and, per file, its length in samples or its error. The
    array goes in shared memory: one transfer, not one per file. Where that has no room it is pickled through
    the pipe instead, slower: never an error that would leave the parent waiting for it."""
    waves = [result for result in results if not isinstance(result, BaseException)]
    joined = np.concatenate(waves) if waves else np.empty(0, np.float32)
    if _fits_in_shared_memory(joined.nbytes):
        with suppress(RuntimeError):
            joined = torch.from_numpy(joined).share_memory_()
    return joined, [result if isinstance(result, BaseException) else len(result) for result in results]


def decoded(items: list[AudioInput], workers: int):
    """Yield ``(item, waveform or expected error)`` in order, decoding ahead in ``workers`` processes (0: here).

    The workers (a DataLoader's) hand over groups of files (:class:`_Transfers`) as shared-memory tensors, at most
    two groups per worker ahead; a bug in one is raised here, with the worker's traceback in its message. They stop
    when this generator is closed or collected (an interruption) and, if this process dies, by themselves."""
    if workers == 0:
        for item in items:
            yield item, _decode(item.path_str)
        return
    groups = -(-len(items) // FILES_PER_TRANSFER)  # at least
    # Forked on Linux, also inside a --jobs process (spawned, so spawning by default): a forked worker starts at
    # once and shares the parent's memory. Elsewhere the platform's way (spawn; fork is unsafe on macOS).
    loader = DataLoader(_Files(items), batch_sampler=_Transfers(items), num_workers=min(workers, groups),
                        collate_fn=_joined, multiprocessing_context="fork" if sys.platform == "linux" else None)
    upcoming = iter(items)
    for joined, sizes in loader:
        samples, start = joined.numpy() if isinstance(joined, torch.Tensor) else joined, 0
        for size in sizes:
            if isinstance(size, BaseException):
                yield next(upcoming), size
            else:
                yield next(upcoming), samples[start : start + size]
                start += size


class Reporter(ABC):
    """Per-file reporting: a run's own (:class:`Run`) or, in an ``atst-embed --jobs`` process, sent
    to the parent (:class:`~atst_features.cli.jobs.JobReporter`)."""

    @abstractmethod
    def succeeded(self, audio_seconds: float) -> None:
        """One file embedded and written."""

    @abstractmethod
    def file_failed(self, message: str) -> None:
        """One file failed in an expected way; ``message`` names it."""

    @abstractmethod
    def written_lost(self, count: int, message: str) -> None:
        """``count`` files reported written were lost after all (the shard holding them could not be written)."""

    def error(self, item: AudioInput, error: BaseException) -> None:
        """Report an expected failure of one file in one ``error:`` line; re-raise anything else (a bug)."""
        if not expected_failure(error):
            raise error
        message = one_line_message(error)
        if str(item.path) not in message and repr(str(item.path)) not in message:
            message = f"{str(item.path)!r}: {message}"
        self.file_failed(message)
        if getattr(error, "earlier", 0):  # a shard that could not be written: its earlier inputs are lost too
            self.written_lost(error.earlier, f"the {error.earlier} input(s) written into that shard before it are lost "
                                             "with it; a rerun embeds them")

    def failed_non_finite(self, batch: list[tuple[AudioInput, object]], bad: set[int], error: NonFiniteError) -> list:
        """Report the files of ``batch`` at the indices ``bad`` (whose clips gave NaN or Inf) as failed,
        one line each; return the others, to run again without them."""
        for index in sorted(bad):
            self.error(batch[index][0], NonFiniteError(f"the model computes NaN or Inf for this file: {error.cause}"))
        return [pair for index, pair in enumerate(batch) if index not in bad]

    def decoded(self, items: list[AudioInput], workers: int):
        """``(item, waveform)`` of the files that decode, in order; the others are reported."""
        for item, result in decoded(items, workers):
            if isinstance(result, BaseException):
                self.error(item, result)
            else:
                yield item, result


class Run(Reporter):
    """Counts, progress and per-file reporting of one run of a command (atst-embed, atst-tag, atst-detect)."""

    def __init__(self, total: int, quiet: bool, verb: str = "embedded", special: list[Path] = (),
                 shard: tuple[int, int] | None = None) -> None:
        self.verb = verb
        self.shard = shard
        self.special = list(special)  # FIFOs, sockets, devices found in folders and not read
        self.done = self.failed = 0
        self.seconds = 0.0
        self.started = time.perf_counter()
        self.quiet = quiet
        self.bar = tqdm(total=total, unit="file", disable=quiet, file=sys.stderr, dynamic_ncols=True)

    def succeeded(self, audio_seconds: float) -> None:
        self.done += 1
        self.seconds += audio_seconds
        hours = self.seconds / 3600
        rate = hours / max(time.perf_counter() - self.started, 1e-9)
        self.bar.set_postfix_str(f"{hours:.3f} h audio, {rate:.4f} h/s", refresh=False)
        self.bar.update()

    def file_failed(self, message: str) -> None:
        self.failed += 1
        tqdm.write(f"error: {message}", file=sys.stderr)
        self.bar.update()

    def written_lost(self, count: int, message: str) -> None:
        self.done -= count
        self.failed += count
        tqdm.write(f"error: {message}", file=sys.stderr)

    def summary(self, skipped: int) -> str:
        elapsed = time.perf_counter() - self.started
        return (
            (f"shard {self.shard[0]}/{self.shard[1]}: " if self.shard else "")
            + f"{self.done} {self.verb} ({self.seconds / 3600:.2f} h of audio in {elapsed:.1f} s), "
            + (f"{skipped} skipped (outputs exist), " if skipped is not None else "") + f"{self.failed} failed"
            + (f", {len(self.special)} skipped as not regular files (FIFOs, sockets or devices; first: "
               f"{str(self.special[0])!r})" if self.special else "")
        )


def raise_keyboard_interrupt(signum, frame) -> None:
    """A signal handler: stop as Ctrl-C does (SIGTERM from a scheduler or a --jobs parent)."""
    raise KeyboardInterrupt
