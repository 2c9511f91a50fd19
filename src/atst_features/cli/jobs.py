"""``atst-embed --jobs N``: the whole pipeline in N processes, each with its own model and every N-th
file, reporting to the parent; for bulk extraction where decoding and writing, not the model, set
the pace. A job that fails, is killed or loses its parent stops the others cleanly."""

from __future__ import annotations

import os
import signal
import sys
import traceback
import warnings
from contextlib import suppress

import click
import torch

from ..errors import BUG_REPORT, SlowPrecisionWarning, expected_failure, one_line_message
from ..inputs import AudioInput
from .destinations import Outputs
from .pipeline import embed_items
from .runs import Reporter, Run, python_stderr_kept, raise_keyboard_interrupt

__all__ = ["JobReporter", "run_jobs"]


class JobReporter(Reporter):
    """In an ``atst-embed --jobs`` process: sends each file's outcome to the parent, and stops (as if
    interrupted) once the parent is gone, so a killed run leaves no process behind for long."""

    def __init__(self, queue, parent: int) -> None:
        self.queue, self.parent = queue, parent

    def succeeded(self, audio_seconds: float) -> None:
        self.queue.put(("done", audio_seconds))

    def file_failed(self, message: str) -> None:
        self.queue.put(("failed", message))

    def written_lost(self, count: int, message: str) -> None:
        self.queue.put(("lost", (count, message)))

    def decoded(self, items: list[AudioInput], workers: int):
        for pair in super().decoded(items, workers):
            if os.getppid() != self.parent:
                raise KeyboardInterrupt
            yield pair


def _job(index: int, todo: list[AudioInput], outputs: Outputs, model_name: str, device: str | None, precision: str,
         threads: int, options: dict, queue, parent: int) -> None:
    """One ``--jobs`` process (started by :func:`run_jobs`): loads the model, embeds its part of the
    files and ends with ``("end", index)``, after ``("fatal", message)`` for an expected failure that
    stops it or ``("bug", traceback)`` for anything else (printed by the parent, below its progress bar)."""
    from ..loading import load_model

    signal.signal(signal.SIGTERM, raise_keyboard_interrupt)
    torch.set_num_threads(threads)
    try:
        with python_stderr_kept():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", SlowPrecisionWarning)  # the parent has said it once
                model = load_model(model_name, device=device, precision=precision)
            embed_items(model, todo, JobReporter(queue, parent), outputs, **options)
    except KeyboardInterrupt:
        return  # stopped by the parent, Ctrl-C or the parent's end: the parent reports it; "end" follows
    except Exception as error:  # noqa: BLE001 - sorted into expected failures and bugs, as one_line_errors does
        if expected_failure(error):
            queue.put(("fatal", one_line_message(error)))
        else:
            queue.put(("bug", traceback.format_exc()))
    finally:
        for stop in (signal.SIGINT, signal.SIGTERM):  # a second interruption must not cut the last word
            signal.signal(stop, signal.SIG_IGN)
        queue.put(("end", index))


def _stop(processes) -> None:
    """Ask running ``--jobs`` processes to stop as if interrupted (SIGTERM)."""
    for process in processes:
        if process.is_alive():
            os.kill(process.pid, signal.SIGTERM)


def _job_ended(index: int, jobs: int, code: int) -> str:
    """The error of a ``--jobs`` process that ended with exit code ``code`` before saying it was done."""
    if code < 0:
        oom = ", as the out-of-memory killer does" if -code == signal.SIGKILL else ""
        return (f"job {index + 1} of {jobs} was killed (signal {-code}{oom}); rerun the same command to finish, "
                "with fewer --jobs or a smaller --batch-size if memory ran out")
    return f"job {index + 1} of {jobs} ended with exit code {code} before finishing (see above); rerun the same command to finish"


def run_jobs(jobs: int, todo: list[AudioInput], run: Run, outputs: Outputs, model_name: str, device: str | None,
              precision: str, options: dict) -> None:
    """Embed ``todo`` in ``jobs`` processes, each with its own model and every ``jobs``-th file, and
    report their files to ``run``. CPU threads are split between them; without --device on a CUDA
    machine, job k uses GPU k mod the number of GPUs."""
    import multiprocessing
    import queue as queues

    context = multiprocessing.get_context("spawn")  # a forked child would inherit torch's threads and CUDA state
    messages = context.Queue()
    threads = max(1, torch.get_num_threads() // jobs)
    processes = []
    for index in range(jobs):
        job_device = device
        if device is None and torch.cuda.is_available():
            job_device = f"cuda:{index % torch.cuda.device_count()}"
        part = todo[index::jobs]
        # Not daemonic: a daemonic process may not start the processes that decode for it (--num-workers).
        # The finally below stops and joins every job, and a job whose parent is gone stops by itself.
        process = context.Process(target=_job, name=f"atst-embed-job-{index + 1}", args=(
            index, part, outputs.part(index), model_name, job_device, precision, threads, options, messages,
            os.getpid()))
        process.start()
        processes.append(process)
    running = set(range(jobs))
    problem = None
    try:
        while running:
            try:
                kind, value = messages.get(timeout=1.0)
            except queues.Empty:
                for index in [index for index in running if processes[index].exitcode is not None]:
                    code = processes[index].exitcode
                    if code != 0 and problem is None:  # it ended without a word: killed, or Python itself failed
                        problem = ("fatal", _job_ended(index, jobs, code))
                        _stop(processes)
                    running.discard(index)
                continue
            if kind == "done":
                run.succeeded(value)
            elif kind == "failed":
                run.file_failed(value)
            elif kind == "lost":
                run.written_lost(*value)
            elif kind == "end":
                running.discard(value)
            elif problem is None:  # "fatal" or "bug": reported once the other jobs have stopped
                problem = (kind, value)
                _stop(processes)
    finally:
        _stop(processes)
        while any(process.is_alive() for process in processes):  # a job exits once its messages are read
            with suppress(queues.Empty):
                messages.get(timeout=0.1)
        for process in processes:
            process.join()
    if problem is not None:
        kind, message = problem
        run.bar.close()
        if kind == "fatal":
            raise click.ClickException(message)
        click.echo(message.rstrip(), err=True)  # the job's traceback
        click.echo(BUG_REPORT, err=True)
        sys.exit(1)
