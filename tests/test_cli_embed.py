"""atst-embed on real files: inputs, outputs, formats, broken files, resume, interruption, long files."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile
import soxr
import torch
from click.testing import CliRunner
from conftest import waveform

from atst_features.cli import pipeline
from atst_features.cli.embed import embed
from atst_features.cli.jobs import JobReporter
from atst_features.errors import InputError
from atst_features.inputs import find_inputs


def write_audio(path: Path, seconds: float, seed: int, rate: int = 16000, channels: int = 1, **kwargs) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    mono = waveform(seconds, seed)
    audio = soxr.resample(mono, 16000, rate) if rate != 16000 else mono
    soundfile.write(path, np.stack([audio] * channels, axis=1), rate, **kwargs)
    return mono


def run(*args: str, model: Path) -> "click.testing.Result":  # noqa: F821
    return CliRunner().invoke(embed, [*args, "--model", str(model), "--num-workers", "1"], catch_exceptions=False)


def test_single_file_frame_level(tmp_path, frame_small_ckpt, frame_small):
    path = tmp_path / "speech.wav"
    write_audio(path, 3.0, 1)
    result = run(str(path), "--level", "frame", "--n-blocks", "1", model=frame_small_ckpt)
    assert result.exit_code == 0, result.output
    assert "1 embedded" in result.output and "0 failed" in result.output
    with np.load(tmp_path / "speech.npz") as out:
        assert sorted(out.files) == ["frame", "model", "n_blocks", "timestamps"]
        expected, stamps = frame_small.get_frame_embeddings(path, n_blocks=1)
        np.testing.assert_allclose(out["frame"], expected[0].numpy(), atol=1e-5, rtol=0)
        np.testing.assert_array_equal(out["timestamps"], stamps[0].numpy())
        assert out["frame"].shape == (75, 384) and out["frame"].dtype == np.float32
        assert out["timestamps"][:2].tolist() == [15.0, 55.0]
        assert str(out["model"]) == str(frame_small_ckpt) and int(out["n_blocks"]) == 1


def test_formats_and_levels(tmp_path, clip_small_ckpt, clip_small):
    path = tmp_path / "in" / "a.flac"
    write_audio(path, 2.0, 2, rate=44100, channels=2)
    clip = clip_small.get_clip_embedding(path)[0].numpy()
    frames, stamps = clip_small.get_frame_embeddings(path)
    out = tmp_path / "out"
    assert run(str(path), "--level", "both", "--format", "npy", "-d", str(out), model=clip_small_ckpt).exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == ["a.clip.npy", "a.frame.npy", "a.meta.json", "a.timestamps.npy"]
    assert json.loads((out / "a.meta.json").read_text()) == {"model": str(clip_small_ckpt), "n_blocks": 12,
                                                             "arrays": ["clip", "frame", "timestamps"]}
    np.testing.assert_allclose(np.load(out / "a.clip.npy"), clip, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.load(out / "a.frame.npy"), frames[0].numpy(), atol=1e-5, rtol=0)
    np.testing.assert_array_equal(np.load(out / "a.timestamps.npy"), stamps[0].numpy())
    single = tmp_path / "one.pt"
    assert run(str(path), "-o", str(single), model=clip_small_ckpt).exit_code == 0
    saved = torch.load(single, weights_only=True)
    assert sorted(saved) == ["clip", "model", "n_blocks"]
    torch.testing.assert_close(saved["clip"], torch.from_numpy(clip), rtol=0, atol=1e-5)


def test_folder_is_mirrored(tmp_path, frame_small_ckpt):
    data = tmp_path / "data"
    write_audio(data / "a.wav", 1.0, 1)
    write_audio(data / "sub" / "b.ogg", 1.0, 2)
    write_audio(data / "sub" / "deeper" / "c 1.mp3", 1.0, 3)
    (data / "sub" / "notes.txt").write_text("not audio")
    out = tmp_path / "emb"
    result = run(str(data), "-d", str(out), "-q", model=frame_small_ckpt)
    assert result.exit_code == 0, result.output
    assert result.output == ""  # --quiet
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*.npz"))
    assert written == ["a.npz", "sub/b.npz", "sub/deeper/c 1.npz"]


def test_glob_and_manifests(tmp_path, frame_small_ckpt):
    data = tmp_path / "data"
    for name in ["x/1.wav", "x/2.wav", "y/3.wav"]:
        write_audio(data / name, 0.5, len(name))
    out = tmp_path / "glob"
    assert run(str(data / "**" / "*.wav"), "-d", str(out), model=frame_small_ckpt).exit_code == 0
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.npz")) == ["x/1.npz", "x/2.npz", "y/3.npz"]
    lines = data / "list.txt"
    lines.write_text("# my files\nx/1.wav\n\ny/3.wav\n")
    out = tmp_path / "lines"
    assert run("--manifest", str(lines), "-d", str(out), model=frame_small_ckpt).exit_code == 0
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.npz")) == ["x/1.npz", "y/3.npz"]
    table = data / "meta.csv"
    table.write_text(f"label,path,duration\ndog,x/2.wav,0.5\ncat,{data / 'y' / '3.wav'},0.5\n")
    out = tmp_path / "csv"
    assert run("--manifest", str(table), "-d", str(out), model=frame_small_ckpt).exit_code == 0
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.npz")) == ["x/2.npz", "y/3.npz"]
    bad = data / "bad.csv"
    bad.write_text("label,where\ndog,x/2.wav\n")
    result = run("--manifest", str(bad), model=frame_small_ckpt)
    assert result.exit_code == 2 and "no path column" in result.output


@pytest.mark.filterwarnings("ignore")
def test_broken_files_are_reported_and_the_batch_goes_on(tmp_path, frame_small_ckpt):
    data = tmp_path / "data"
    write_audio(data / "good 1 é.wav", 1.0, 1)
    write_audio(data / "good 2.flac", 1.5, 2, rate=48000, channels=6)
    (data / "empty.wav").write_bytes(b"")
    soundfile.write(data / "header.wav", np.zeros(0, np.float32), 16000)
    write_audio(tmp_path / "full.flac", 3.0, 3)
    (data / "cut.flac").write_bytes((tmp_path / "full.flac").read_bytes()[:3000])
    (data / "notes.wav").write_text("not audio")
    (data / "x.wav").mkdir()
    nan = waveform(1.0, 4)
    nan[100] = np.nan
    soundfile.write(data / "nan.wav", nan, 16000, subtype="FLOAT")
    out = tmp_path / "out"
    result = run(str(data / "*"), "-d", str(out), model=frame_small_ckpt)
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    expected = {
        "empty.wav": "cannot decode (Format not recognised)",
        "header.wav": "the file holds no audio samples",
        "cut.flac": "cannot decode (",
        "notes.wav": "cannot decode (Format not recognised)",
        "x.wav": "is a directory, not an audio file",
        "nan.wav": "contains NaN or Inf samples",
    }
    assert len(errors) == len(expected), result.output
    for name, message in expected.items():
        assert any(name in line and message in line for line in errors), (name, errors)
    assert "2 embedded" in result.output and "6 failed" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["good 1 é.npz", "good 2.npz"]
    assert "Traceback" not in result.output


def test_rerun_resumes_and_overwrite_recomputes(tmp_path, frame_small_ckpt):
    data = tmp_path / "data"
    for index in range(3):
        write_audio(data / f"{index}.wav", 0.5, index)
    out = tmp_path / "out"
    assert run(str(data), "-d", str(out), model=frame_small_ckpt).exit_code == 0
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    (out / "1.npz").unlink()
    result = run(str(data), "-d", str(out), model=frame_small_ckpt)
    assert result.exit_code == 0 and "1 embedded" in result.output and "2 skipped" in result.output
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != "1.npz"} == {
        k: v for k, v in stamps.items() if k != "1.npz"
    }
    result = run(str(data), "-d", str(out), "--overwrite", model=frame_small_ckpt)
    assert result.exit_code == 0 and "3 embedded" in result.output and "0 skipped" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "give audio files"),
        (["{a}", "{b}", "-o", "{tmp}/x.npz"], "takes exactly one input"),
        (["{a}", "-o", "{tmp}/x.npy"], "takes a .npz or .pt file"),
        (["{a}", "-o", "{tmp}/x.npz", "-d", "{tmp}/d"], "not both"),
        (["{tmp}/nothing-here"], "no audio files found"),
        (["{a}", "{a2}"], "would both write"),
        (["{a}", "--level", "pixels"], "Invalid value for '--level'"),
        (["{a}", "--n-blocks", "13"], "--n-blocks 13 exceeds the model's 12 blocks"),
    ],
)
def test_usage_errors_exit_2(tmp_path, frame_small_ckpt, args, message):
    write_audio(tmp_path / "a.wav", 0.5, 1)
    write_audio(tmp_path / "b.wav", 0.5, 2)
    write_audio(tmp_path / "a.flac", 0.5, 3)
    (tmp_path / "nothing-here").mkdir()
    names = {"a": tmp_path / "a.wav", "b": tmp_path / "b.wav", "a2": tmp_path / "a.flac", "tmp": tmp_path}
    result = run(*[arg.format(**names) for arg in args], model=frame_small_ckpt)
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_bad_model_is_one_line(tmp_path):
    write_audio(tmp_path / "a.wav", 0.5, 1)
    result = CliRunner().invoke(embed, [str(tmp_path / "a.wav"), "--model", str(tmp_path / "missing.ckpt")])
    assert result.exit_code == 2  # a model source that names nothing is a usage error
    assert result.output.strip().splitlines()[-1].startswith("Error: ") and "missing.ckpt" in result.output
    assert not (tmp_path / "a.npz").exists()


@pytest.mark.slow
def test_python_dash_m_is_atst_embed(tmp_path, frame_small_ckpt):
    path = tmp_path / "a b.wav"
    write_audio(path, 1.0, 5)
    result = subprocess.run(
        [sys.executable, "-m", "atst_features", str(path), "--model", str(frame_small_ckpt), "--level", "frame",
         "--n-blocks", "1", "-q"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    with np.load(tmp_path / "a b.npz") as out:
        assert out["frame"].shape == (25, 384)
    usage = subprocess.run([sys.executable, "-m", "atst_features", "--help"], capture_output=True, text=True)
    assert usage.returncode == 0 and usage.stdout.startswith("Usage: atst-embed")


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["npz", "npy", "pt"])
def test_long_files_are_streamed_to_disk(tmp_path, frame_small_ckpt, frame_small, monkeypatch, fmt):
    monkeypatch.setattr(pipeline, "STREAM_BYTES", 0)  # stream every file
    path = tmp_path / "long.wav"
    write_audio(path, 25.0, 6)
    out = tmp_path / "out"
    result = run(str(path), "--level", "both", "--n-blocks", "2", "--format", fmt, "-d", str(out), "--batch-size", "1",
                 model=frame_small_ckpt)
    assert result.exit_code == 0, result.output
    frames, stamps = frame_small.get_frame_embeddings(path, n_blocks=2)
    clip = frame_small.get_clip_embedding(path, n_blocks=2)[0]
    if fmt == "npz":
        with np.load(out / "long.npz") as saved:
            got = {key: saved[key] for key in ("clip", "frame", "timestamps")}
    elif fmt == "npy":
        got = {key: np.load(out / f"long.{key}.npy") for key in ("clip", "frame", "timestamps")}
    else:
        got = {k: v.numpy() for k, v in torch.load(out / "long.pt", weights_only=True).items() if k != "model" and k != "n_blocks"}
    np.testing.assert_allclose(got["frame"], frames[0].numpy(), atol=1e-5, rtol=0)
    np.testing.assert_array_equal(got["timestamps"], stamps[0].numpy())
    np.testing.assert_allclose(got["clip"], clip.numpy(), atol=1e-5, rtol=0)
    assert got["frame"].shape == (625, 768)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no leftovers


@pytest.mark.slow
@pytest.mark.parametrize("how, jobs", [(signal.SIGTERM, "1"), (signal.SIGKILL, "1"), (signal.SIGTERM, "2")])
def test_interrupted_run_leaves_only_complete_files(tmp_path, frame_small_ckpt, how, jobs):
    data = tmp_path / "data"
    for index in range(24):
        write_audio(data / f"{index:02d}.wav", 4.0, index)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "atst_features", str(data), "-d", str(out), "--model", str(frame_small_ckpt),
               "--level", "both", "--n-blocks", "12", "--batch-size", "1", "--jobs", jobs, "-q"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("*.npz"))) < 3:
        time.sleep(0.05)
    process.send_signal(how)
    process.wait(timeout=60)
    finished = sorted(out.glob("*.npz"))
    assert 3 <= len(finished) < 24, "the run should be interrupted part-way"
    for path in finished:  # every visible output is whole
        with np.load(path) as saved:
            assert saved["frame"].shape == (100, 4608) and saved["clip"].shape == (4608,)
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(".")]
    if how == signal.SIGTERM:
        assert process.returncode == 130 and leftovers == []
    else:
        assert all(name.endswith(".partial") for name in leftovers)
    before = {p.name: p.stat().st_mtime_ns for p in finished}
    rerun = subprocess.run(command[:-1], capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{len(finished)} skipped" in rerun.stderr and f"{24 - len(finished)} embedded" in rerun.stderr
    assert len(list(out.glob("*.npz"))) == 24
    assert {p: (out / p).stat().st_mtime_ns for p in before} == before  # finished files untouched
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []


@pytest.mark.slow
def test_symlink_loops_fifos_and_long_names(tmp_path, frame_small_ckpt):
    data = tmp_path / "data"
    write_audio(data / "a.wav", 0.5, 0)
    long_name = "b" * 248 + ".wav"  # 252 bytes: the longest names still leave room for ".npz"
    write_audio(data / long_name, 0.5, 1)
    (data / "loop").symlink_to(data, target_is_directory=True)
    (data / "up").symlink_to(tmp_path, target_is_directory=True)
    os.mkfifo(data / "pipe.wav")
    out = tmp_path / "out"
    result = run(str(data), "-d", str(out), model=frame_small_ckpt)
    assert result.exit_code == 0, result.output
    assert "2 embedded" in result.output  # each file once: no loop, no FIFO
    assert f"1 skipped as not regular files (FIFOs, sockets or devices; first: {str(data / 'pipe.wav')!r})" in result.output
    assert sorted(p.name for p in out.rglob("*.npz")) == sorted(["a.npz", "b" * 248 + ".npz"])
    result = run(str(data / "pipe.wav"), "-o", str(tmp_path / "pipe.npz"), model=frame_small_ckpt)
    assert result.exit_code == 1 and "not a regular file" in result.output  # and no hang


def test_concurrent_writers_never_share_a_temporary_file(tmp_path):
    from atst_features.outputs import _atomic

    target = tmp_path / ("x" * 250 + ".npz")
    with _atomic(target) as first, _atomic(target) as second:
        assert first != second and len(first.name) < 64 and first.name.startswith(".atst-")
        first.write_bytes(b"1")
        second.write_bytes(b"2")
    assert target.read_bytes() == b"1" and not list(tmp_path.glob(".atst-*"))


def test_names_that_are_not_utf8(tmp_path, frame_small_ckpt):
    data = tmp_path / "data"
    write_audio(data / "x.wav", 0.5, 0)
    latin1 = data / b"caf\xe9.wav".decode("utf-8", "surrogateescape")  # a Latin-1 name on a UTF-8 system
    os.rename(data / "x.wav", latin1)
    (data / b"bad\xff.wav".decode("utf-8", "surrogateescape")).write_bytes(b"not audio")
    result = run(str(data), "-d", str(tmp_path / "out"), model=frame_small_ckpt)
    assert result.exit_code == 1 and "1 embedded" in result.output and "1 failed" in result.output
    errors = [line for line in result.output.splitlines() if "error:" in line]
    assert len(errors) == 1 and "bad\\udcff.wav': cannot decode (Format not recognised)" in errors[0]
    assert os.listdir(tmp_path / "out") == [b"caf\xe9.npz".decode("utf-8", "surrogateescape")]


@pytest.mark.slow
def test_two_concurrent_runs_never_show_a_torn_output(tmp_path, frame_small_ckpt):
    data = tmp_path / "data"
    for index in range(12):
        write_audio(data / f"{index:02d}.wav", 1.0, index)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "atst_features", str(data), "-d", str(out), "--model", str(frame_small_ckpt),
               "--level", "both", "--n-blocks", "2", "--batch-size", "1", "--overwrite", "-q"]
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    reads = 0
    while any(p.poll() is None for p in processes):
        for path in out.glob("*.npz") if out.exists() else []:
            with np.load(path) as saved:  # a visible output is always whole
                assert saved["frame"].shape == (25, 768) and saved["clip"].shape == (768,)
            reads += 1
    assert [p.wait(timeout=60) for p in processes] == [0, 0], [p.stderr.read() for p in processes]
    assert reads > 0 and len(list(out.glob("*.npz"))) == 12 and not list(out.glob(".*"))


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["npz", "npy", "pt"])
def test_full_disk_is_one_line_per_file_in_every_format(tmp_path, frame_small_ckpt, fmt):
    """Writes fail in the kernel (a file-size limit: EFBIG, as ENOSPC on a full disk): each file gets
    one error line, the run goes on to the next and exits 1, and nothing partial is left."""
    data = tmp_path / "data"
    for index in range(2):
        write_audio(data / f"{index}.wav", 0.5, index)
    out = tmp_path / "out"
    code = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
        "from atst_features.cli.embed import embed\n"
        "embed(sys.argv[1:])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(data), "-d", str(out), "--format", fmt, "--level", "frame",
         "--model", str(frame_small_ckpt), "--device", "cpu", "-q"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("error: ") and "cannot write" in line and "disk full" in line
                                   for line in lines), lines
    assert "0.wav" in lines[0] and "1.wav" in lines[1] and "Traceback" not in result.stderr
    assert [p for p in out.rglob("*") if p.is_file()] == []  # no output, no temporary file left


def _outputs(folder: Path) -> dict[str, dict[str, np.ndarray]]:
    result = {}
    for path in sorted(folder.rglob("*.npz")):
        with np.load(path) as saved:
            result[str(path.relative_to(folder))] = {key: saved[key] for key in saved.files}
    return result


def _assert_same_outputs(a: Path, b: Path) -> None:
    first, second = _outputs(a), _outputs(b)
    assert sorted(first) == sorted(second) and first
    for name in first:
        assert sorted(first[name]) == sorted(second[name])
        for key, value in first[name].items():
            if value.dtype.kind == "f":
                np.testing.assert_allclose(value, second[name][key], rtol=0, atol=1e-5)
            else:
                assert value == second[name][key]


@pytest.fixture
def five_files(tmp_path) -> Path:
    data = tmp_path / "data"
    for index, seconds in enumerate([0.5, 2.0, 1.2, 3.1, 0.8]):
        write_audio(data / ("sub" if index % 2 else "") / f"{index}.wav", seconds, index)
    return data


def test_shards_together_equal_one_run(tmp_path, frame_small_ckpt, five_files):
    whole, sharded = tmp_path / "whole", tmp_path / "sharded"
    assert run(str(five_files), "-d", str(whole), "--level", "both", model=frame_small_ckpt).exit_code == 0
    counts = []
    for part in ("1/2", "2/2"):
        result = run(str(five_files), "-d", str(sharded), "--level", "both", "--shard", part, model=frame_small_ckpt)
        assert result.exit_code == 0, result.output
        assert f"shard {part}: " in result.output
        counts.append(int(result.output.split(f"shard {part}: ")[1].split()[0]))
    assert counts == [3, 2]  # every 2nd of the sorted inputs
    _assert_same_outputs(whole, sharded)
    result = run(str(five_files), "-d", str(sharded), "--level", "both", "--shard", "2/2", model=frame_small_ckpt)
    assert "0 embedded" in result.output and "2 skipped" in result.output  # resumable per shard


@pytest.mark.parametrize("shard", ["0/2", "3/2", "1", "a/b", "1/0"])
def test_bad_shard_is_a_usage_error(tmp_path, frame_small_ckpt, five_files, shard):
    result = run(str(five_files), "-d", str(tmp_path / "o"), "--shard", shard, model=frame_small_ckpt)
    assert result.exit_code == 2 and "--shard takes K/N" in result.output


@pytest.mark.slow
def test_torchrun_processes_split_the_inputs(tmp_path, frame_small_ckpt, five_files):
    torchrun = shutil.which("torchrun") or pytest.skip("torchrun is not installed")
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert run(str(five_files), "-d", str(whole), model=frame_small_ckpt).exit_code == 0
    result = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node", "2", "--log-dir", str(tmp_path / "torchrun"), "-m", "atst_features", str(five_files), "-d", str(split),
         "--model", str(frame_small_ckpt), "--device", "cpu", "--num-workers", "1"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "shard 1/2: 3 embedded" in result.stderr and "shard 2/2: 2 embedded" in result.stderr
    _assert_same_outputs(whole, split)


@pytest.mark.slow
def test_jobs_together_equal_one_run(tmp_path, frame_small_ckpt, five_files):
    (five_files / "broken.wav").write_text("not audio")
    whole, jobs = tmp_path / "whole", tmp_path / "jobs"
    assert run(str(five_files), "-d", str(whole), "--level", "both", model=frame_small_ckpt).exit_code == 1
    result = run(str(five_files), "-d", str(jobs), "--level", "both", "--jobs", "3", model=frame_small_ckpt)
    assert result.exit_code == 1, result.output
    assert "5 embedded" in result.output and "1 failed" in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "broken.wav" in errors[0] and "cannot decode" in errors[0]
    _assert_same_outputs(whole, jobs)
    result = run(str(five_files), "-d", str(jobs), "--jobs", "3", model=frame_small_ckpt)
    assert "0 embedded" in result.output and "5 skipped" in result.output  # resumes like one process


def test_a_job_stops_when_its_parent_is_gone(tmp_path):
    write_audio(tmp_path / "a.wav", 1.0, 1)
    item = find_inputs([str(tmp_path / "a.wav")], None)[0]
    messages = []
    reporter = JobReporter(type("Queue", (), {"put": lambda self, message: messages.append(message)})(), os.getppid())
    assert [pair[0] for pair in reporter.decoded([item], 0)] == [item]  # parent alive: goes on
    orphan = JobReporter(reporter.queue, parent=os.getppid() + 1)
    with pytest.raises(KeyboardInterrupt):
        list(orphan.decoded([item], 0))
    reporter.error(item, InputError("cannot decode"))
    assert messages == [("failed", f"{str(item.path)!r}: cannot decode")]


def _job_processes(parent: int) -> list[int]:
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    return [int(pid) for pid in children if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the jobs through Linux's /proc")
def test_a_killed_job_ends_the_run_with_one_line(tmp_path, frame_small_ckpt):
    data = tmp_path / "data"
    for index in range(48):  # 24 per job, in pools of 8: a job is still busy when the first outputs appear
        write_audio(data / f"{index:02d}.wav", 4.0, index)
    out = tmp_path / "out"
    process = subprocess.Popen(
        [sys.executable, "-m", "atst_features", str(data), "-d", str(out), "--model", str(frame_small_ckpt), "--level",
         "both", "--batch-size", "1", "--jobs", "2", "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not out.exists():
        time.sleep(0.05)
    jobs = _job_processes(process.pid)
    assert len(jobs) == 2
    os.kill(jobs[0], signal.SIGKILL)  # as the out-of-memory killer would
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 1
    assert stderr.strip().splitlines()[-1] == (
        "Error: job 1 of 2 was killed (signal 9, as the out-of-memory killer does); rerun the same command to finish, "
        "with fewer --jobs or a smaller --batch-size if memory ran out")
    assert "Traceback" not in stderr
    assert not any(Path(f"/proc/{pid}").exists() for pid in jobs[1:])  # the other job was stopped


def test_dead_writers_temporaries_are_swept_once_per_folder(tmp_path, monkeypatch):
    """A dead process's temporary is removed at the first write into its folder; the folder is listed
    once per process, not once per output (which made N outputs in one folder cost O(N^2))."""
    from atst_features import outputs

    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(finished.stdout)
    leftover = tmp_path / f".atst-0123456789abcdef-{dead}-cafe0123.partial"
    leftover.write_bytes(b"half")
    mine = tmp_path / f".atst-0123456789abcdef-{os.getpid()}-cafe0123.partial"
    mine.write_bytes(b"in progress")  # a live writer's file stays
    listings = []
    real_glob = Path.glob
    monkeypatch.setattr(Path, "glob", lambda self, pattern: listings.append(self) or real_glob(self, pattern))
    names = {outputs.temporary_beside(tmp_path / f"{i}.npz").name for i in range(50)}
    assert len(names) == 50 and listings == [tmp_path]
    assert not leftover.exists() and mine.exists()


def test_npy_outputs_of_an_input_are_whole_or_absent(tmp_path):
    """The metadata sidecar is written last; when it cannot be (here a folder stands in its way), the
    arrays written before it are removed, so a rerun sees the input as not done."""
    from atst_features.errors import OutputError
    from atst_features.outputs import output_files, write_outputs

    (tmp_path / "a.meta.json").mkdir()
    arrays = {"clip": np.ones(3, np.float32), "timestamps": np.arange(2, dtype=np.float32)}
    with pytest.raises(OutputError, match="a.meta.json"):
        write_outputs(tmp_path / "a", "npy", arrays, {"model": "m", "n_blocks": 1})
    assert [p.name for p in tmp_path.iterdir()] == ["a.meta.json"]
    assert [p.name for p in output_files(tmp_path / "b", "npy", ["clip", "timestamps"])] == \
        ["b.clip.npy", "b.timestamps.npy", "b.meta.json"]
