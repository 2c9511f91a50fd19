"""atst-embed --format tar: WebDataset shards that hold what the per-file outputs hold, resume after a kill
with every input present exactly once, and split with --shard, --jobs and torchrun."""

from __future__ import annotations

import collections
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from test_cli_embed import write_audio

from atst_features import read_embeddings
from atst_features.cli import pipeline
from atst_features.cli.embed import embed


def run(*args: str, model: Path) -> "click.testing.Result":  # noqa: F821
    return CliRunner().invoke(embed, [*args, "--model", str(model), "--num-workers", "1"], catch_exceptions=False)


@pytest.fixture
def seven_files(tmp_path) -> Path:
    data = tmp_path / "data"
    for index, seconds in enumerate([0.5, 2.0, 1.2, 3.1, 0.8, 1.0, 2.5]):
        write_audio(data / ("sub" if index % 2 else "") / f"{index}.take.wav", seconds, index)
    return data


def _by_input(folder: Path) -> dict[str, dict]:
    """``read_embeddings`` of shards, by input path; fails if an input is there twice."""
    pairs = list(read_embeddings(folder))
    counts = collections.Counter(path for path, _ in pairs)
    assert max(counts.values()) == 1, [path for path, count in counts.items() if count > 1]
    return dict(pairs)


def _assert_shards_equal_files(shards: Path, files: Path, data: Path) -> None:
    """The shards hold, for every input, exactly the arrays of the npz written beside the same inputs' tree."""
    stored = _by_input(shards)
    expected = {f"{data / Path(base).relative_to(files)}.wav": arrays
                for base, arrays in read_embeddings(files)}
    assert sorted(stored) == sorted(expected)
    for path, arrays in expected.items():
        assert sorted(stored[path]) == sorted(arrays)
        for key in {"clip", "frame", "timestamps"} & set(arrays):  # batches differ between parts: within 1e-5
            np.testing.assert_allclose(stored[path][key], arrays[key], rtol=0, atol=1e-5)
        assert stored[path]["model"] == arrays["model"] and stored[path]["n_blocks"] == arrays["n_blocks"]


def test_shards_hold_what_the_files_hold_and_a_rerun_resumes(tmp_path, frame_small_ckpt, seven_files):
    files, shards = tmp_path / "files", tmp_path / "shards"
    assert run(str(seven_files), "-d", str(files), "--level", "both", model=frame_small_ckpt).exit_code == 0
    result = run(str(seven_files), "-d", str(shards), "--level", "both", "--format", "tar", "--files-per-tar", "3",
                 model=frame_small_ckpt)
    assert result.exit_code == 0 and "7 embedded" in result.output, result.output
    assert sorted(p.name for p in shards.iterdir()) == [
        f"shard-00000{n}.{suffix}" for n in range(3) for suffix in ("index.tsv", "tar")]
    _assert_shards_equal_files(shards, files, seven_files)
    result = run(str(seven_files), "-d", str(shards), "--level", "both", "--format", "tar", model=frame_small_ckpt)
    assert "0 embedded" in result.output and "7 skipped" in result.output
    write_audio(seven_files / "new.wav", 1.0, 9)
    result = run(str(seven_files), "-d", str(shards), "--level", "both", "--format", "tar", model=frame_small_ckpt)
    assert "1 embedded" in result.output and "7 skipped" in result.output
    assert (shards / "shard-000003.tar").is_file() and len(_by_input(shards)) == 8


def test_long_files_are_streamed_into_the_shard(tmp_path, frame_small_ckpt, seven_files, monkeypatch):
    monkeypatch.setattr(pipeline, "STREAM_BYTES", 0)  # stream every file's frames through a temporary file
    files, shards = tmp_path / "files", tmp_path / "shards"
    assert run(str(seven_files), "-d", str(files), "--level", "frame", model=frame_small_ckpt).exit_code == 0
    assert run(str(seven_files), "-d", str(shards), "--level", "frame", "--format", "tar",
               model=frame_small_ckpt).exit_code == 0
    _assert_shards_equal_files(shards, files, seven_files)
    assert not [p.name for p in shards.iterdir() if p.name.startswith(".")]  # no temporary left


def test_parts_and_jobs_together_hold_every_input_once(tmp_path, frame_small_ckpt, seven_files):
    files, shards = tmp_path / "files", tmp_path / "shards"
    assert run(str(seven_files), "-d", str(files), model=frame_small_ckpt).exit_code == 0
    for part in ("1/2", "2/2"):
        result = run(str(seven_files), "-d", str(shards), "--format", "tar", "--shard", part, "--jobs", "2",
                     model=frame_small_ckpt)
        assert result.exit_code == 0, result.output
    names = sorted(p.name for p in shards.glob("*.tar"))
    assert names == [f"shard-{k}of2-job{j}-000000.tar" for k in (1, 2) for j in (1, 2)]
    _assert_shards_equal_files(shards, files, seven_files)
    result = run(str(seven_files), "-d", str(shards), "--format", "tar", model=frame_small_ckpt)
    assert "0 embedded" in result.output and "7 skipped" in result.output  # done is done, whoever wrote it


@pytest.mark.parametrize("args, message", [
    (["--format", "tar"], "give -d DIR"),
    (["--format", "tar", "-d", "{out}", "--overwrite"], "use a new folder instead of --overwrite"),
])
def test_tar_usage_errors(tmp_path, frame_small_ckpt, seven_files, args, message):
    args = [arg.replace("{out}", str(tmp_path / "out")) for arg in args]
    result = run(str(seven_files), *args, model=frame_small_ckpt)
    assert result.exit_code == 2 and message in result.output, result.output


def test_two_inputs_of_one_key_are_refused(tmp_path, frame_small_ckpt):
    write_audio(tmp_path / "in" / "a.wav", 0.5, 1)
    write_audio(tmp_path / "in" / "a.flac", 0.5, 2)
    result = run(str(tmp_path / "in"), "-d", str(tmp_path / "out"), "--format", "tar", model=frame_small_ckpt)
    assert result.exit_code == 2 and "would both be sample 'a' of the shards" in result.output, result.output


def _tar_command(tmp_path: Path, model: Path, count: int, *options: str) -> tuple[Path, Path, list[str]]:
    """``count`` 2 s files in ``tmp_path/data`` and the atst-embed command that shards them into ``tmp_path/out``,
    one window per batch (a slow run, to stop part-way)."""
    data, out = tmp_path / "data", tmp_path / "out"
    for index in range(count):
        write_audio(data / f"{index:03d}.wav", 2.0, index)
    return data, out, [sys.executable, "-m", "atst_features", str(data), "-d", str(out), "--model", str(model),
                       "--format", "tar", "--batch-size", "1", "-q", *options]


@pytest.mark.slow
def test_a_killed_run_and_its_rerun_hold_every_input_exactly_once(tmp_path, frame_small_ckpt):
    data, out, command = _tar_command(tmp_path, frame_small_ckpt, 40, "--files-per-tar", "4", "--level", "both")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("*.tar"))) < 2:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    before = len(_by_input(out))
    assert 8 <= before < 40, "the run should be killed part-way"
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    stored = _by_input(out)
    assert sorted(stored) == sorted(str(path) for path in data.glob("*.wav"))
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # the killed run's temporary was swept


@pytest.mark.slow
def test_sigterm_finishes_the_open_shard(tmp_path, frame_small_ckpt):
    _, out, command = _tar_command(tmp_path, frame_small_ckpt, 150, "--files-per-tar", "1000")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    deadline = time.time() + 120
    while time.time() < deadline and not any(p.name.endswith(".partial") for p in out.glob(".*")):
        time.sleep(0.02)
    time.sleep(0.5)  # some samples in the open shard
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130 and "interrupted:" in stderr, stderr
    kept = _by_input(out)
    assert 0 < len(kept) < 150 and [p.name for p in out.glob("*.tar")] == ["shard-000000.tar"]


@pytest.mark.slow
def test_torchrun_processes_write_their_own_shards(tmp_path, frame_small_ckpt, seven_files):
    torchrun = shutil.which("torchrun") or pytest.skip("torchrun is not installed")
    files, shards = tmp_path / "files", tmp_path / "shards"
    assert run(str(seven_files), "-d", str(files), model=frame_small_ckpt).exit_code == 0
    result = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node", "2", "--log-dir", str(tmp_path / "torchrun"), "-m",
         "atst_features", str(seven_files), "-d", str(shards), "--format", "tar", "--model", str(frame_small_ckpt),
         "--device", "cpu", "--num-workers", "1"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in shards.glob("*.tar")) == ["shard-1of2-000000.tar", "shard-2of2-000000.tar"]
    _assert_shards_equal_files(shards, files, seven_files)


@pytest.mark.parametrize("failing, embedded, failed", [(2, 4, 3), (3, 6, 1)], ids=["full-shard", "last-shard"])
def test_a_shard_that_cannot_be_written_counts_its_inputs_as_failed(tmp_path, frame_small_ckpt, seven_files, monkeypatch,
                                                                    failing, embedded, failed):
    """Shards of 3 inputs (7 inputs: 3, 3, 1). The 2nd shard (an input fills it) or the last one (written when
    the run ends) cannot be written: its inputs are failures in the summary, not 'embedded', and a rerun
    embeds exactly them."""
    from atst_features.errors import OutputError
    from atst_features.shards import ShardWriter

    finish, calls = ShardWriter.finish, []

    def full_disk_at_one_shard(self):
        if self._tar is not None:
            calls.append(1)
            if len(calls) == failing:
                self.discard()
                raise OutputError("cannot write 'shard' (No space left on device)")
        finish(self)

    monkeypatch.setattr(ShardWriter, "finish", full_disk_at_one_shard)
    shards = tmp_path / "shards"
    result = run(str(seven_files), "-d", str(shards), "--format", "tar", "--files-per-tar", "3", "--batch-size", "1",
                 model=frame_small_ckpt)
    assert result.exit_code == 1
    assert f"{embedded} embedded" in result.output and f"{failed} failed" in result.output, result.output
    assert "a rerun embeds them" in result.output
    assert len(_by_input(shards)) == embedded
    monkeypatch.setattr(ShardWriter, "finish", finish)
    rerun = run(str(seven_files), "-d", str(shards), "--format", "tar", model=frame_small_ckpt)
    assert rerun.exit_code == 0 and f"{failed} embedded" in rerun.output, rerun.output
    assert len(_by_input(shards)) == 7
