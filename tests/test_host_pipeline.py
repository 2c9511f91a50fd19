"""atst-embed's host pipeline: decoding in worker processes (order, per-file errors, bugs, equal outputs),
--jobs with workers, and an interrupted run that leaves no process behind."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile
import soxr
from click.testing import CliRunner
from conftest import waveform, write_audio

from atst_features.cli import runs
from atst_features.cli.embed import embed
from atst_features.errors import AudioDecodeError
from atst_features.inputs import find_inputs
from atst_features.registry import OFFLINE_MODEL

FORKS = sys.platform == "linux"  # the workers are forked: they inherit what a test patches in this process


@pytest.fixture
def mixed(tmp_path) -> Path:
    """A manifest of good files (WAV and FLAC, 16 and 44.1 kHz, 0.3-2.5 s), a corrupt and a missing file among them."""
    data = tmp_path / "data"
    data.mkdir()
    names = []
    for index, (seconds, rate, suffix) in enumerate([(1.0, 16000, "wav"), (2.5, 44100, "flac"), (0.3, 16000, "flac"),
                                                     (1.7, 44100, "wav"), (2.0, 16000, "wav")]):
        mono = waveform(seconds, index)
        name = f"{index}.{suffix}"
        soundfile.write(data / name, soxr.resample(mono, 16000, rate) if rate != 16000 else mono, rate)
        names.append(name)
        if index == 1:
            (data / "corrupt.wav").write_bytes(b"RIFF....WAVEjunk")
            names.append("corrupt.wav")
        if index == 3:
            names.append("missing.wav")
    (data / "list.txt").write_text("".join(f"{name}\n" for name in names))
    return data / "list.txt"


def test_workers_keep_the_order_and_return_each_failure(mixed, monkeypatch):
    monkeypatch.setattr(runs, "FILES_PER_TRANSFER", 2)  # several transfers per worker, one with a failure inside
    items = find_inputs([], mixed)
    here = list(runs.decoded(items, 0))
    there = list(runs.decoded(items, 2))
    assert [item for item, _ in there] == items == [item for item, _ in here]
    for (item, ours), (_, theirs) in zip(here, there):
        if item.path.name in ("corrupt.wav", "missing.wav"):
            assert isinstance(ours, AudioDecodeError) and isinstance(theirs, AudioDecodeError)
            assert str(theirs) == str(ours) and str(item.path) in str(theirs)
        else:
            assert theirs.dtype == np.float32 and np.array_equal(theirs, ours)


def _bug(path):
    raise TypeError("a bug in decoding")


@pytest.mark.skipif(not FORKS, reason="the patched decoder reaches forked workers only")
def test_a_bug_in_a_worker_surfaces_with_its_traceback(mixed, monkeypatch):
    monkeypatch.setattr(runs, "load_audio", _bug)
    with pytest.raises(TypeError, match="(?s)Original Traceback.*in _bug.*a bug in decoding"):
        list(runs.decoded(find_inputs([], mixed), 1))


def _killed_by_the_kernel(path):
    import os

    import torch

    if torch.utils.data.get_worker_info() is not None:  # what the out-of-memory killer does to a worker
        os.kill(os.getpid(), signal.SIGKILL)
    raise AssertionError("decoded outside a worker")


@pytest.mark.skipif(not FORKS, reason="the patched decoder reaches forked workers only")
def test_a_worker_killed_by_the_kernel_is_one_line(mixed, tmp_path, monkeypatch):
    monkeypatch.setattr(runs, "load_audio", _killed_by_the_kernel)
    result = CliRunner().invoke(embed, ["--manifest", str(mixed), "-d", str(tmp_path / "out"), "--num-workers", "1",
                                        "--model", OFFLINE_MODEL])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.lower().startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("Error: a data-loading worker process (pid "), result.output
    assert "out of memory" in errors[0] and "--num-workers" in errors[0]


def _embed(*args: str) -> "click.testing.Result":  # noqa: F821
    return CliRunner().invoke(embed, [*args, "--model", OFFLINE_MODEL, "--level", "both"], catch_exceptions=False)


def _assert_same_outputs(one: Path, other: Path) -> None:
    names = sorted(path.name for path in one.glob("*.npz"))
    assert names and names == sorted(path.name for path in other.glob("*.npz"))
    for name in names:
        with np.load(one / name) as ours, np.load(other / name) as theirs:
            assert sorted(ours.files) == sorted(theirs.files)
            for key in ours.files:  # --jobs split the CPU threads: sums in another order
                if ours[key].dtype.kind == "f":
                    np.testing.assert_allclose(ours[key], theirs[key], rtol=0, atol=1e-5)
                else:
                    assert ours[key] == theirs[key]


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_outputs_and_errors_do_not_depend_on_workers(mixed, tmp_path, jobs):
    here, there = tmp_path / "here", tmp_path / "there"
    assert _embed("--manifest", str(mixed), "-d", str(here), "--num-workers", "0").exit_code == 1
    result = _embed("--manifest", str(mixed), "-d", str(there), "--num-workers", "2", "--jobs", jobs)
    assert result.exit_code == 1, result.output
    errors = sorted(line for line in result.output.splitlines() if line.startswith("error: "))
    assert len(errors) == 2, result.output
    assert "corrupt.wav" in errors[0] and "cannot decode" in errors[0]
    assert "missing.wav" in errors[1] and "no such file" in errors[1]
    assert "5 embedded" in result.output and "2 failed" in result.output
    _assert_same_outputs(here, there)


def _process_table() -> dict[int, tuple[int, str, str]]:
    """Linux's processes: pid -> (parent pid, state, start time)."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # it ended meanwhile
                continue
            table[int(entry.name)] = (int(fields[1]), fields[0], fields[19])
    return table


def _descendants(pid: int) -> dict[int, str]:
    """The processes below ``pid``: pid -> start time (to tell a reused pid apart)."""
    table = _process_table()
    found, parents = {}, {pid}
    while parents:
        children = {child: start for child, (parent, _, start) in table.items() if parent in parents}
        parents = set(children) - set(found)
        found.update(children)
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the workers through Linux's /proc")
def test_sigterm_stops_the_run_and_leaves_no_worker(tmp_path):
    data = tmp_path / "data"
    for index in range(200):
        write_audio(data / f"{index:03d}.wav", seconds=2.0, seed=index)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "atst_features", str(data), "-d", str(out), "--model", OFFLINE_MODEL, "--level",
               "both", "--batch-size", "1", "--num-workers", "2", "-q"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None and not any(out.glob("*.npz")):
        time.sleep(0.02)
    workers = _descendants(process.pid)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert stderr.startswith("interrupted: ") and "Traceback" not in stderr
    assert 1 <= len(list(out.glob("*.npz"))) < 200
    assert len(workers) >= 2  # the decoding workers, seen while the run went on
    table = _process_table()
    left = [pid for pid, start in workers.items() if pid in table and table[pid][2] == start and table[pid][1] != "Z"]
    assert not left
