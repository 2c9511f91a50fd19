"""A run over many audio files: decoding ahead in threads (the decoder's own notes on damaged files
dropped), per-file reporting (one ``error:`` line per failed file, the others counted), the progress
bar and the summary, and interruption by SIGTERM."""

from __future__ import annotations

import os
import sys
import threading
import time
from abc import ABC, abstractmethod
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..audio import load_audio
from ..errors import NonFiniteError, expected_failure, one_line_message
from ..inputs import AudioInput

__all__ = ["Reporter", "Run", "decoded", "python_stderr_kept", "raise_keyboard_interrupt"]


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


def _decode(path: Path) -> np.ndarray:
    with _decoder_notes_dropped:
        return load_audio(path)[0]


def decoded(items: list[AudioInput], workers: int):
    """Yield ``(item, waveform or exception)`` in order, decoding ahead in ``workers`` threads."""
    if workers == 0:
        for item in items:
            try:
                yield item, _decode(item.path)
            except Exception as error:  # noqa: BLE001 - reported per file, the batch goes on
                yield item, error
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="atst-decode") as pool:
        pending: list[tuple[AudioInput, Future]] = []
        upcoming = iter(items)
        try:
            while True:
                while len(pending) < 2 * workers and (item := next(upcoming, None)) is not None:
                    pending.append((item, pool.submit(_decode, item.path)))
                if not pending:
                    return
                item, future = pending.pop(0)
                error = future.exception()
                yield item, error if error is not None else future.result()
        finally:
            for _, future in pending:
                future.cancel()


class Reporter(ABC):
    """Per-file reporting: a run's own (:class:`Run`) or, in an ``atst-embed --jobs`` process, sent
    to the parent (:class:`~atst_features.cli.jobs.JobReporter`)."""

    @abstractmethod
    def succeeded(self, audio_seconds: float) -> None:
        """One file embedded and written."""

    @abstractmethod
    def file_failed(self, message: str) -> None:
        """One file failed in an expected way; ``message`` names it."""

    def error(self, item: AudioInput, error: BaseException) -> None:
        """Report an expected failure of one file in one ``error:`` line; re-raise anything else (a bug)."""
        if not expected_failure(error):
            raise error
        message = one_line_message(error)
        if str(item.path) not in message and repr(str(item.path)) not in message:
            message = f"{str(item.path)!r}: {message}"
        self.file_failed(message)

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
