"""One family for every expected failure: catch :class:`ATSTError` to handle them all.

Each class also derives from the built-in error it is about (``ValueError`` for a bad value or
file content, ``OSError`` for an unreachable resource), so ``except ValueError`` keeps working.
Messages are one line that names the input and says what to do. :class:`SlowPrecisionWarning` is
the one warning: a request that works but runs far slower than the user can have expected.

Every module of the package takes its errors from here. The commands sort what reaches them with
:func:`expected_failure`: one ``error:`` line (:func:`one_line_message`) for what the user can act
on, the traceback and :data:`BUG_REPORT` for anything else.
"""

from __future__ import annotations

import re

__all__ = [
    "ATSTError",
    "AudioDecodeError",
    "CheckpointError",
    "ChecksumError",
    "DownloadError",
    "EmptyAudioError",
    "InputError",
    "ModelNotFoundError",
    "NonFiniteError",
    "OutputError",
    "PeerLostError",
    "Preempted",
    "SlowPrecisionWarning",
    "TrainingDiverged",
]


class ATSTError(Exception):
    """Base of the errors atst-features raises on purpose."""


class AudioDecodeError(ATSTError, ValueError):
    """A file that cannot be decoded: missing, a directory, unreadable, corrupt or an unsupported format."""


class EmptyAudioError(ATSTError, ValueError):
    """Audio with no samples."""


class InputError(ATSTError, ValueError):
    """Inputs that cannot be used at all (e.g. a manifest without a path column)."""


class CheckpointError(ATSTError, ValueError):
    """A file that is not a readable ATST checkpoint; the message names it and what was expected."""


class ChecksumError(ATSTError, ValueError):
    """A downloaded weights file whose sha256 is not the expected one; the file is not used."""


class DownloadError(ATSTError, OSError):
    """A model that could not be fetched from the Hub or the authors' link (and is not in the cache)."""


class OutputError(ATSTError, OSError):
    """An output that could not be written (a full disk, a size limit, no permission); the message names it."""


class NonFiniteError(ATSTError, ValueError):
    """A model that computed NaN or Inf for some audio (an overflowing 16-bit precision, or weights
    too large to compute with): such embeddings are never returned or written. ``items``: the
    indices of the audio in the call that gave them; ``cause``: the likely reason and the fix."""

    def __init__(self, message: str, items: tuple[int, ...] = (), cause: str = "") -> None:
        super().__init__(message)
        self.items, self.cause = items, cause


class TrainingDiverged(ATSTError, FloatingPointError):
    """A training run stopped after too many optimizer steps in a row with a non-finite loss or
    gradients (see :class:`~atst_features.training.guards.FiniteSteps`); the message says what to do."""


class ModelNotFoundError(ATSTError, FileNotFoundError):
    """A model source that is neither a file, a folder, a registry name nor a Hub id."""


class PeerLostError(ATSTError, RuntimeError):
    """Another process of a distributed training run stopped, or stopped answering: this one stops
    too (see :mod:`atst_features.training.distributed`); the message names it and how to continue."""


class Preempted(ATSTError):
    """A training run that stopped on a signal (SIGTERM, SIGUSR1) after saving a checkpoint: not a
    failure. ``exit_code``: 128 + the signal's number, as a shell reports a process the signal ended."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


class SlowPrecisionWarning(UserWarning):
    """A 16-bit precision on a CPU without fast kernels for it: it works, several times slower than fp32."""


def check_field(owner: str, name: str, value, kind: type | tuple, low=None, high=None) -> None:
    """:class:`InputError` unless ``value`` is a ``kind`` (bool is not an int) within ``[low, high]``:
    architecture values come from untrusted files and size memory, so they are checked first."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise InputError(f"{owner}.{name} must be {names}, got {value!r:.60}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise InputError(f"{owner}.{name} must be in [{low}, {high}], got {value!r:.60}")


def check_fields(owner: str, instance, rules) -> None:
    """:func:`check_field` for each ``(name, kind, low, high)`` of ``rules`` on ``instance``'s attributes."""
    for name, kind, low, high in rules:
        check_field(owner, name, getattr(instance, name), kind, low, high)


BUG_REPORT = ("error: this is a bug in atst-features, not a problem with your input; please report it "
              "with the traceback above")


_WORKER_DIED = re.compile(r"^DataLoader worker \(pids?(?:\(s\))? ([\d, ]+)\) (?:is killed by signal: (Killed)|exited unexpectedly)")


def _worker_died(error: BaseException) -> re.Match | None:
    """torch's error for a DataLoader worker process killed by SIGKILL (the kernel's out-of-memory
    killer, most often) or gone without a word; a worker that crashed (SIGSEGV, ...) stays a bug."""
    return _WORKER_DIED.match(str(error)) if isinstance(error, RuntimeError) else None


def expected_failure(error: BaseException) -> bool:
    """Whether ``error`` is a failure the user can act on: the library's own errors (:class:`ATSTError`),
    the operating system's (a full disk, a permission), running out of memory, and a worker process
    that was killed (by the kernel, when memory runs out). Anything else is a bug and keeps its traceback."""
    if isinstance(error, (ATSTError, OSError, MemoryError)) or _worker_died(error):
        return True
    import torch  # loaded already wherever an error can come from a model

    message = str(error).lower()
    return isinstance(error, torch.cuda.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and ("out of memory" in message or "can't allocate memory" in message)
    )


def one_line_message(error: BaseException) -> str:
    """The first line of ``error``'s message; for an error a DataLoader worker raised (re-raised as
    "Caught X in DataLoader worker process N. Original Traceback ..."), the original's message."""
    if died := _worker_died(error):
        how = "was killed (SIGKILL)" if died.group(2) else "exited unexpectedly"
        pids = died.group(1).strip()
        return (f"a data-loading worker process ({'pids' if ',' in pids else 'pid'} {pids}) {how}: the system may have run out of "
                "memory; use fewer worker processes (--num-workers, --data.num_workers) or smaller batches")
    text = str(error)
    if text.startswith("Caught ") and "Original Traceback" in text:
        text = text.rstrip().splitlines()[-1].split(": ", 1)[-1]  # "package.XError: its message"
    return text.splitlines()[0] if text else type(error).__name__
