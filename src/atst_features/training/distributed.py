"""A process of a distributed (DDP) run that dies must not leave the others hanging.

What happens without this module, on one machine with two CPU processes (gloo):

* The survivor in a collective (every step has one) raises at once, gloo's ``Connection closed
  by peer`` / ``Connection reset by peer``: a 120-line traceback and a request to report a bug.
* Lightning's own launcher (``--trainer.devices N``: rank 0 starts the others) polls its children
  every 5 s and, when one exits with an error, kills rank 0 with SIGKILL: no message at all.
* A process killed before the process group is complete leaves the others waiting in
  ``init_process_group`` for its timeout (30 min); a rank that Lightning started waits as long
  once rank 0 is gone, an orphan.

:class:`PeerWatch` (``atst-train``'s ``main()`` runs the training inside one) turns all of these
into one line, ``error: training process rank 1 of 2 stopped (...); the run is stopped too: rerun
with --ckpt_path last ...``, exit code 1, within :data:`POLL_SECONDS` + :data:`GRACE_SECONDS`:

* :meth:`PeerWatch.explain` names the distributed errors that mean a lost peer (gloo's closed or
  reset connection and its timeouts, torch's ``DistNetworkError`` and ``DistStoreError``, an
  NCCL error about a remote process, an abort or a timeout); any other error stays what it is
  (a bug keeps its traceback).
* A thread watches the other processes while the run lasts: rank 0 the ranks Lightning started
  (it takes over Lightning's observer, which would kill it without a word), a rank that Lightning
  started its parent, rank 0. A process that is gone gives the main thread
  :data:`CHILD_GRACE_SECONDS` (rank 0) or :data:`GRACE_SECONDS` (the others: a run that has just
  ended may still be closing its logs when rank 0 has exited) to fail, or finish, by itself; then
  the thread prints the line, ends the remaining ranks it started and exits. Under torchrun the
  agent stops the other workers when one fails.

A process that hangs instead of dying is found by the collectives' own timeout, torch's 30 min by
default: long enough for rank 0 to write a large checkpoint or prepare the data while the others
wait at a barrier, so it stays a backstop. ``--trainer.strategy DDPStrategy
--trainer.strategy.timeout 0:10:00`` changes it; its expiry is one line as well.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
import time
from contextlib import suppress

from ..errors import PeerLostError

__all__ = ["CHILD_GRACE_SECONDS", "GRACE_SECONDS", "POLL_SECONDS", "PeerWatch", "distributed_failure"]

POLL_SECONDS = 0.5
"""How often the watch looks at the other processes (a ``poll()`` and a ``getppid()``: nothing)."""

GRACE_SECONDS = 10.0
"""How long a rank whose rank 0 is gone waits for its main thread to stop by itself: a collective
fails at once, a step in progress finishes first, and a run that has just ended normally may still
close its logs when rank 0 has exited. Past this the watch ends the process (~11 s at most)."""

CHILD_GRACE_SECONDS = 2.0
"""The same for rank 0 when a rank it started exits with an error, never a normal end (~3 s at most)."""

ADVICE = "rerun with --ckpt_path last to continue from the last checkpoint"
LONGER_WAIT = "to wait longer: --trainer.strategy DDPStrategy --trainer.strategy.timeout H:MM:SS"

_LOST = re.compile(r"connection (?:closed|reset|refused|lost)|broken pipe|remote process|network error|"
                   r"communicator was aborted|ncclRemoteError|socket (?:closed|error)", re.IGNORECASE)
_TIMEOUT = re.compile(r"timed out|timing out|timeout", re.IGNORECASE)
_MILLISECONDS = re.compile(r"(\d+)\s*(?:ms|milliseconds)\b")
_SECONDS = re.compile(r"(\d+)\s*(?:s|sec|seconds)\b")


def distributed_failure(error: BaseException) -> tuple[str, float | None] | None:
    """``("lost", None)`` or ``("timeout", seconds or None)`` when ``error`` (or what it was raised
    from) is a distributed failure that means another process is gone or did not answer; None for
    anything else. Only torch.distributed's own errors and gloo's transport errors count."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch is a dependency
        return None
    dist_error = getattr(dist, "DistError", None)
    network = tuple(kind for kind in (getattr(dist, "DistNetworkError", None), getattr(dist, "DistStoreError", None)) if kind)
    seen: set[int] = set()
    while error is not None and id(error) not in seen and len(seen) < 8:
        seen.add(id(error))
        text = str(error)
        first = text.splitlines()[0] if text else ""
        ours = isinstance(error, network) or (
            isinstance(error, RuntimeError)
            and (dist_error is not None and isinstance(error, dist_error) or "gloo/transport/" in first)
        )
        if ours and _TIMEOUT.search(first):
            return "timeout", _timeout_seconds(first)
        if ours and (_LOST.search(first) or isinstance(error, network)):
            return "lost", None
        error = error.__cause__ or error.__context__
    return None


def _timeout_seconds(text: str) -> float | None:
    if match := _MILLISECONDS.search(text):
        return int(match.group(1)) / 1000
    if match := _SECONDS.search(text):
        return float(match.group(1))
    return None


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _rank_and_size() -> tuple[int | None, int | None]:
    """This process's rank and the number of processes: from the process group, else the launcher's
    environment (torchrun: RANK; Lightning on one machine: LOCAL_RANK)."""
    import torch.distributed as dist

    with suppress(RuntimeError, ValueError):  # a process group being torn down: the environment says it
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    env = os.environ
    rank = _int(env.get("RANK"))
    if rank is None and env.get("NODE_RANK", "0") == "0":
        rank = _int(env.get("LOCAL_RANK"))
    return rank, _int(env.get("WORLD_SIZE"))


def _runs_this_command(pid: int) -> bool:
    """Whether process ``pid`` runs this command line (Lightning starts the other ranks with rank 0's
    arguments); True where /proc cannot tell."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            words = file.read().split(b"\0")[:-1]
    except OSError:
        return True
    ours = [os.fsencode(word) for word in sys.argv[1:]]
    return not ours or words[-len(ours):] == ours


def _exit_description(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return "with an error (its message is above)" if code == 1 else f"exit code {code}"


class PeerWatch:
    """Watches the other processes of this distributed run while ``with`` lasts; :meth:`explain`
    sorts an error that ended it (see the module's docstring). ``training``: this command trains
    (only then is Lightning's launcher patched: importing Lightning takes seconds)."""

    def __init__(self, training: bool = True, poll: float = POLL_SECONDS, grace: float = GRACE_SECONDS,
                 child_grace: float = CHILD_GRACE_SECONDS) -> None:
        env = os.environ
        self.training, self.poll, self.grace, self.child_grace = training, poll, grace, child_grace
        # A rank that Lightning started (LOCAL_RANK 1..N-1; rank 0 is its parent). torchrun's workers are
        # not watched: the agent stops the others when one fails, and workers it leaves behind still
        # have each other (a collective with a dead one fails at once).
        started_by_lightning = ((_int(env.get("LOCAL_RANK")) or 0) > 0 and (_int(env.get("WORLD_SIZE")) or 0) > 1
                                and "TORCHELASTIC_RUN_ID" not in env)
        self.parent = os.getppid() if started_by_lightning else None
        # rank 0 may be gone before this process got here: then its parent is whoever adopted it
        self.orphan = self.parent is not None and not _runs_this_command(self.parent)
        self.children: list = []  # the subprocess.Popen of the ranks Lightning started here (rank 0)
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._original = None

    # -- the watch -------------------------------------------------------------------------------------
    def __enter__(self) -> PeerWatch:
        if self.training:
            self._take_over_lightning_observer()
        if self.parent is not None:
            self._start()
        return self

    def __exit__(self, *exc_info) -> bool:
        self.stop()
        return False

    def stop(self) -> None:
        """The run is over (finished or failing in the main thread): the watch says nothing more."""
        with self._lock:
            self._done.set()
        if self._original is not None:
            self._original[0]._launch_process_observer = self._original[1]
            self._original = None

    def _take_over_lightning_observer(self) -> None:
        """Lightning's launcher hands its children to an observer that SIGKILLs every process, rank 0
        included, without a word 0-5 s after one exits with an error; this watch does it instead."""
        try:
            from lightning.pytorch.strategies.launchers import subprocess_script as launcher
        except ImportError:
            return
        if callable(getattr(launcher, "_launch_process_observer", None)):
            self._original = (launcher, launcher._launch_process_observer)
            launcher._launch_process_observer = self._observe

    def _observe(self, children: list) -> None:
        self.children = children
        self._start()

    def _start(self) -> None:
        if self._thread is None and not self._done.is_set():
            self._thread = threading.Thread(target=self._run, name="atst-peer-watch", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._done.wait(self.poll):
            lost = self._lost()
            if lost is not None and not self._done.wait(self.child_grace if self.children else self.grace):
                self._give_up(*lost)
                return

    def _lost(self) -> tuple[str, str] | None:
        """(who, what happened) for a process of the run that is gone, or None."""
        for index, child in enumerate(self.children):
            code = child.poll()
            if code:  # 0: that rank finished, as all do at the end
                return self._child_name(index), f"stopped ({_exit_description(code)})"
        if self.parent is not None and (self.orphan or os.getppid() != self.parent):
            rank, size = _rank_and_size()  # the parent: local rank 0 of this machine
            first = rank - int(os.environ["LOCAL_RANK"]) if rank is not None else 0
            return f"training process rank {first} of {size}", "stopped (its process is gone)"
        return None

    def _child_name(self, index: int) -> str:
        """Lightning starts local ranks 1..N-1 of its machine: child ``index`` is local rank index + 1."""
        local_size = len(self.children) + 1
        node = _int(os.environ.get("NODE_RANK")) or 0
        size = _rank_and_size()[1] or local_size
        return f"training process rank {node * local_size + index + 1} of {size}"

    def _give_up(self, who: str, what: str) -> None:
        with self._lock:
            if self._done.is_set():  # the main thread has it in hand
                return
            self._done.set()
            print(f"error: {message(who, what)}", file=sys.stderr, flush=True)
            self._end_children()
            sys.stdout.flush()
            os._exit(1)

    def _end_children(self) -> None:
        """SIGKILL for the ranks Lightning started here that still run (as Lightning does: SIGTERM does
        not stop a process waiting in a collective)."""
        for child in self.children:
            if child.poll() is None:
                with suppress(OSError):  # it ended in between
                    child.kill()

    # -- the error ----------------------------------------------------------------------------------
    def explain(self, error: BaseException) -> BaseException:
        """A :class:`~atst_features.errors.PeerLostError` naming the lost process when ``error`` is a
        distributed failure (:func:`distributed_failure`), else ``error`` itself."""
        failure = distributed_failure(error)
        if failure is None:
            return error
        kind, seconds = failure
        lost = None
        if kind == "lost" and (self.children or self.parent is not None):  # a dead one is reaped, or orphans us, in a moment
            for _ in range(20):
                if (lost := self._lost()) is not None:
                    break
                time.sleep(0.05)
        self._end_children()
        if lost is not None:
            who, what = lost
        else:
            rank, size = _rank_and_size()
            if size == 2 and rank in (0, 1):
                who = f"training process rank {1 - rank} of 2"
            elif size:
                who = f"another of the {size} training processes"
            else:
                who = "another training process"
            what = "stopped (connection lost)"
            if kind == "timeout":
                what = f"did not answer within {seconds:g} s" if seconds else "did not answer in time"
        lost_error = PeerLostError(message(who, what, timeout=kind == "timeout"))
        lost_error.__cause__ = error
        return lost_error


def message(who: str, what: str, timeout: bool = False) -> str:
    """The one line (without ``error:``) for a lost process ``who`` that ``what``."""
    line = f"{who} {what}; the run is stopped too: {ADVICE}"
    return f"{line} ({LONGER_WAIT})" if timeout else line
