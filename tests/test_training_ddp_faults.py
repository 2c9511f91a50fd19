"""A dead process in a two-process DDP run on CPU (gloo): the survivor stops within a bounded time
with one ``error:`` line, and a rerun with ``--ckpt_path last`` continues from the last checkpoint."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from test_training_run import audio_folder, run_atst_train  # noqa: F401 - audio_folder is a fixture

BOUND = 30.0  # seconds for the survivor: the watch needs ~1-3 s (rank 0) or ~11 s (rank 1) at most
STEPS = 60  # the tiny preset saves every 10 steps, ~0.1 s each: kills land well before the end


def command(audio: Path, *extra: str) -> list[str]:
    return ["frame", "--config", "frame-tiny", "--data.path", str(audio), "--trainer.devices", "2",
            "--trainer.strategy", "ddp", "--model.max_steps", str(STEPS), "--trainer.enable_progress_bar", "false",
            *extra]


def checkpoints(root: Path) -> set[str]:
    return {path.name for path in (root / "runs/frame-tiny/checkpoints").glob("*step=*.ckpt")}


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        found += [int(word) for word in (task / "children").read_text().split()]
    return found


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def start_and_kill(root: Path, args: list[str], victim: str, log: Path) -> tuple[float, int]:
    """Start ``atst-train args``, SIGKILL rank 0 or rank 1 (``victim``) once a new checkpoint is written;
    (seconds until the survivor was gone, rank 0's exit code)."""
    script = shutil.which("atst-train") or pytest.skip("atst-train is not installed as a command")
    before = checkpoints(root)
    with open(log, "w") as stderr:
        rank0 = subprocess.Popen([script, *args], cwd=root, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        deadline = time.monotonic() + 120
        while not checkpoints(root) - before:
            assert rank0.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        (rank1,) = children(rank0.pid)
        victim_pid, survivor = (rank1, rank0.pid) if victim == "rank 1" else (rank0.pid, rank1)
        os.kill(victim_pid, signal.SIGKILL)
        killed = time.monotonic()
        while running(survivor) and time.monotonic() - killed < 120:
            time.sleep(0.05)
            rank0.poll()  # reaps rank 0
        return time.monotonic() - killed, rank0.wait()
    finally:
        for pid in [*children(rank0.pid), rank0.pid] if running(rank0.pid) else []:
            os.kill(pid, signal.SIGKILL)
        rank0.wait()


def first_step(stderr: str) -> int:
    """The step of ProgressLog's first line ("epoch 4, step 12/60: ...")."""
    return int(re.search(r"^epoch \d+, step (\d+)/", stderr, re.MULTILINE).group(1))


def assert_one_error_line(stderr: str, lost: str) -> None:
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert errors[0].startswith(f"error: training process {lost} of 2 stopped (") and "--ckpt_path last" in errors[0]


@pytest.mark.slow
def test_a_dead_rank_stops_the_other_with_one_line_and_the_run_continues(tmp_path, audio_folder):  # noqa: F811
    # Rank 1 dies: rank 0 (its launcher) stops with one line and exit code 1.
    seconds, exit_code = start_and_kill(tmp_path, command(audio_folder), "rank 1", tmp_path / "a.txt")
    assert seconds < BOUND and exit_code == 1
    assert_one_error_line((tmp_path / "a.txt").read_text(), "rank 1")
    saved = max(int(re.search(r"step=(\d+)", name).group(1)) for name in checkpoints(tmp_path))

    # The rerun continues from there; this time rank 0 dies: rank 1, an orphan, stops with one line.
    seconds, _ = start_and_kill(tmp_path, command(audio_folder, "--ckpt_path", "last"), "rank 0", tmp_path / "b.txt")
    assert seconds < BOUND
    stderr = (tmp_path / "b.txt").read_text()
    assert_one_error_line(stderr, "rank 0")
    assert first_step(stderr) > saved
    saved = max(int(re.search(r"step=(\d+)", name).group(1)) for name in checkpoints(tmp_path))

    # And the next rerun finishes the run.
    result = run_atst_train(command(audio_folder, "--ckpt_path", "last"), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert first_step(result.stderr) > saved
    last = torch.load(tmp_path / "runs/frame-tiny/checkpoints/last.ckpt", weights_only=True)
    assert last["global_step"] == STEPS


def test_only_distributed_failures_count_as_a_lost_process(monkeypatch):
    import torch.distributed as dist

    from atst_features.errors import PeerLostError
    from atst_features.training.distributed import PeerWatch, distributed_failure

    closed = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer "
                          "[127.0.0.1]:56234. This is typically caused by a remote worker crashing.")
    wrapped = ValueError("while logging")
    wrapped.__cause__ = closed
    assert distributed_failure(closed) == distributed_failure(wrapped) == ("lost", None)
    assert distributed_failure(RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed "
                                            "out waiting 1800000ms for recv operation to complete")) == ("timeout", 1800)
    assert distributed_failure(dist.DistStoreError("Timed out after 4 seconds waiting for clients. 1/2 clients joined.")
                               ) == ("timeout", 4)
    assert distributed_failure(dist.DistBackendError("NCCL error: remote process exited or there was a network error")
                               ) == ("lost", None)
    for bug in (RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 4x3)"),
                RuntimeError("Connection closed by peer"),  # not from torch.distributed
                dist.DistBackendError("NCCL error: invalid usage"), ConnectionResetError("Connection reset by peer")):
        assert distributed_failure(bug) is None and PeerWatch(training=False).explain(bug) is bug

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    lost = PeerWatch(training=False).explain(closed)
    assert isinstance(lost, PeerLostError) and lost.__cause__ is closed
    assert str(lost) == ("training process rank 1 of 2 stopped (connection lost); the run is stopped too: "
                         "rerun with --ckpt_path last to continue from the last checkpoint")
