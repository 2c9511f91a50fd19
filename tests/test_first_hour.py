"""A new user's first minutes, offline: each friction found by trying the package from a fresh clone, fixed."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import warnings
from contextlib import suppress
from pathlib import Path

import numpy as np
import pytest
import soundfile
from click.testing import CliRunner
from conftest import write_audio
from download_server import DownloadServer

from atst_features import DownloadError, example_audio, load_model
from atst_features.cli import runs
from atst_features.cli.detect import detect
from atst_features.cli.embed import embed
from atst_features.cli.tag import tag
from atst_features.cli.tools import convert, export, models
from atst_features.errors import InputError, SlowPrecisionWarning
from atst_features.hub import no_connection
from atst_features import official
from atst_features.official import official_folder
from atst_features.registry import DEFAULT_MODEL, OFFLINE_MODEL, REGISTRY

EXAMPLES = Path(__file__).parent.parent / "examples"
NOWHERE = "http://127.0.0.1:9"  # nothing listens there: a connection is refused at once


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hub cache of the test's own, online mode, and a Hub that refuses connections."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache" / "hub"))
    monkeypatch.setenv("HF_ENDPOINT", NOWHERE)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return tmp_path / "cache" / "hub"


def shown_lines(text: str) -> list[str]:
    """The lines a terminal shows for ``text``: each as its last carriage return left it."""
    return [line.rsplit("\r", 1)[-1] for line in text.split("\n")]


# ------------------------------------------------------------------ 1. offline, the default model
def test_offline_default_model_names_what_to_type(hub_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    audio = write_audio(tmp_path / "a.wav")
    result = CliRunner().invoke(embed, [str(audio), "-d", str(tmp_path / "out")])  # --model left at its default
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    line = result.output.strip()
    assert line.startswith(f"Error: cannot download '{DEFAULT_MODEL}': offline mode (HF_HUB_OFFLINE) is on")
    assert line.endswith(f"the small demo model '{OFFLINE_MODEL}' ships inside the package and works offline: "
                         f"--model {OFFLINE_MODEL}")
    assert "load_model(" not in line
    with pytest.raises(DownloadError) as info:
        load_model(device="cpu")
    assert str(info.value).endswith(f"works offline: load_model('{OFFLINE_MODEL}')") and "--model" not in str(info.value)
    # what it names works, offline
    result = CliRunner().invoke(embed, [str(audio), "-d", str(tmp_path / "out"), "--model", OFFLINE_MODEL, "-q"])
    assert result.exit_code == 0 and (tmp_path / "out" / "a.npz").is_file()


# ------------------------------------------------------------------ 2. online, without network
def test_unreachable_official_link_fails_at_once_and_leaves_nothing(hub_cache, monkeypatch):
    entry = dataclasses.replace(REGISTRY[DEFAULT_MODEL], download_url=f"{NOWHERE}/uc?export=download&id=x")
    monkeypatch.setitem(REGISTRY, DEFAULT_MODEL, entry)
    started = time.perf_counter()
    with pytest.raises(DownloadError) as info:
        load_model(DEFAULT_MODEL, device="cpu")
    assert time.perf_counter() - started < 5  # not four attempts 2, 4 and 6 s apart
    message = str(info.value)
    assert f"cannot download '{DEFAULT_MODEL}' from {NOWHERE}/uc?export=download&id=x: no connection to 127.0.0.1 (" in message
    assert "partial" not in message and "bytes are kept" not in message
    assert not official_folder(entry).parent.exists()  # no .lock, no empty folders


def test_failed_first_download_leaves_no_lock_or_empty_folders(hub_cache, monkeypatch):
    with DownloadServer({}) as server:
        entry = dataclasses.replace(REGISTRY[DEFAULT_MODEL], download_url=f"{server.url}/direct/missing.ckpt")
        monkeypatch.setitem(REGISTRY, DEFAULT_MODEL, entry)
        with pytest.raises(DownloadError, match="HTTP 404") as info:
            load_model(DEFAULT_MODEL, device="cpu")
    assert "partial" not in str(info.value)
    assert not official_folder(entry).parent.exists()


def test_a_waiter_locks_anew_after_a_failed_first_download(tmp_path):
    """The holder fails and removes the lock and its folders while another load waits: the waiter goes on."""
    home = tmp_path / "atst-features-official" / "atst-frame-base"
    holding, fail, waited = threading.Event(), threading.Event(), []

    def first():
        with suppress(DownloadError), official._locked(home):
            holding.set()
            fail.wait(10)
            raise DownloadError("refused")

    def second():
        with official._locked(home):
            waited.append(home.is_dir())

    holder = threading.Thread(target=first)
    holder.start()
    assert holding.wait(10)
    waiter = threading.Thread(target=second)
    waiter.start()
    time.sleep(0.5)  # the waiter is polling the lock
    fail.set()
    holder.join(10)
    waiter.join(10)
    assert waited == [True]


def test_unreachable_hub_fails_at_once(hub_cache):
    started = time.perf_counter()
    with pytest.raises(DownloadError) as info:
        load_model("someone/some-model", device="cpu")
    assert time.perf_counter() - started < 5  # not huggingface_hub's five retries over 23 s
    assert f"cannot reach {NOWHERE} (Connection refused) and it is not in the cache" in str(info.value)
    assert not hub_cache.parent.exists()


@pytest.mark.parametrize("error, reason", [
    (urllib.error.URLError(ConnectionRefusedError(111, "Connection refused")), "Connection refused"),
    (ConnectionRefusedError(111, "Connection refused"), "Connection refused"),
    (OSError(101, "Network is unreachable"), "Network is unreachable"),
    (urllib.error.URLError(TimeoutError("timed out")), None),  # a slow network: worth the retries
    (urllib.error.URLError(ConnectionResetError(104, "Connection reset by peer")), None),  # transient
    (socket.gaierror(-2, "Name or service not known"), "Name or service not known"),
    (TimeoutError("timed out"), None),
    (urllib.error.HTTPError("http://x", 503, "Service Unavailable", {}, None), None),  # an answer
])
def test_only_a_connection_that_cannot_be_made_is_given_up_at_once(error, reason):
    assert no_connection(error) == reason


# ------------------------------------------------------------------ 3. an unknown model is a usage error
@pytest.mark.parametrize("command, args", [
    (embed, ["{audio}", "--model", "no-such-model"]),
    (tag, ["{audio}", "--model", "no-such-model"]),
    (detect, ["{audio}", "--model", "no-such-model"]),
    (export, ["no-such-model", "{tmp}/out.onnx"]),
    (convert, ["{audio}", "--as", "no-such-model"]),
])
def test_unknown_model_source_exits_2(tmp_path, command, args):
    audio = write_audio(tmp_path / "a.wav")
    result = CliRunner().invoke(command, [arg.format(audio=audio, tmp=tmp_path) for arg in args])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert lines[0].startswith("Usage: ") and lines[-1].startswith("Error: 'no-such-model' is not ")
    assert sum(line.startswith("Error:") for line in lines) == 1


# ------------------------------------------------------------------ 4. messages above the progress bar, not in it
def _raise_bug(path):
    raise RuntimeError("a bug while decoding")


def _warn_and_decode(path):
    warnings.warn("slower than you think", SlowPrecisionWarning, stacklevel=2)
    return runs.load_audio(path)[0]


def _failing_write(self, item, arrays, frames):
    raise InputError("cannot write this")


@pytest.mark.parametrize("target, replacement, first", [
    ("atst_features.cli.runs._decode", _raise_bug, "Traceback (most recent call last):"),
    ("atst_features.cli.destinations.FileOutputs.write", _failing_write, "Error: cannot write this"),
    ("atst_features.cli.runs._decode", _warn_and_decode, "warning: slower than you think"),
])
def test_messages_during_a_run_start_their_own_line(tmp_path, monkeypatch, target, replacement, first):
    for index in range(2):
        write_audio(tmp_path / "in" / f"{index}.wav", seed=index)
    monkeypatch.setattr(target, replacement)
    result = CliRunner().invoke(embed, [str(tmp_path / "in"), "--model", OFFLINE_MODEL, "-d", str(tmp_path / "out"),
                                        "--num-workers", "0"])
    assert "file/s]" in result.output  # the bar was drawn
    lines = shown_lines(result.output)
    assert first in lines, result.output
    assert not [line for line in lines if first.split()[0] in line and not line.startswith(first.split()[0])]


def test_per_file_errors_print_above_the_bar(tmp_path):
    write_audio(tmp_path / "in" / "good.wav")
    (tmp_path / "in" / "bad.wav").write_bytes(b"RIFF....WAVEjunk")
    result = CliRunner().invoke(embed, [str(tmp_path / "in"), "--model", OFFLINE_MODEL, "-d", str(tmp_path / "out")])
    assert result.exit_code == 1
    errors = [line for line in shown_lines(result.output) if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith(f"error: '{tmp_path / 'in' / 'bad.wav'}': cannot decode")


# ------------------------------------------------------------------ 5. atst-models marks the default
def test_models_marks_the_default_and_agrees_with_the_readme():
    table = CliRunner().invoke(models, []).output
    marked = [line.split()[0] for line in table.splitlines() if "(default)" in line.split("  ")[0]]
    assert marked == [DEFAULT_MODEL]
    assert next(param for param in embed.params if param.name == "model_name").default == DEFAULT_MODEL
    listed = json.loads(CliRunner().invoke(models, ["--json"]).output)
    assert [entry["name"] for entry in listed if entry["default"] is True] == [DEFAULT_MODEL]
    assert all(entry["default"] is False for entry in listed if entry["name"] != DEFAULT_MODEL)
    # the README: atst-c2f-base is the C2F checkpoint with its 527-class head, with no download yet
    c2f = next(line for line in table.splitlines() if line.startswith("atst-c2f-base "))
    assert "tags (527)" in c2f and "none yet: load its checkpoint" in c2f and "atst-features/atst-c2f-base" not in c2f


# ------------------------------------------------------------------ 6. atst-train without its required options
@pytest.mark.parametrize("args, message", [
    (["finetune"], "error: the following arguments are required: model.init, data.manifest"),
    (["finetune", "--config", "finetune-tiny", "--data.manifest", "m.csv", "--no-such-option", "1"],
     "error: unrecognized arguments: --no-such-option 1"),
])
def test_train_option_errors_are_one_line(capsys, args, message):
    pytest.importorskip("lightning")
    from atst_features.training.cli import main

    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [message, "see: atst-train finetune --help"]


# ------------------------------------------------------------------ 7. examples without their extras
@pytest.mark.parametrize("example, blocked, extra", [
    ("onnx_runtime.py", "onnxruntime", "onnx"),
    ("onnx_runtime.py", "onnxscript", "onnx"),
    ("pretrain_tiny.py", "lightning", "train"),
])
def test_examples_without_their_extra_say_which_to_install(tmp_path, example, blocked, extra):
    path = str(EXAMPLES / example)
    without = (f"import runpy, sys; sys.modules[{blocked!r}] = None; sys.argv = [{path!r}]; "
               f"runpy.run_path({path!r}, run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", without], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f'error: this example needs the {extra} extra: pip install -e ".[{extra}]" '
                                          "(in the atst-features checkout)"]
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ 8. a damaged MP3: our line, not the decoder's notes
def damaged_mp3(path: Path) -> Path:
    """One second of a tone encoded as MP3, 600 bytes of its middle overwritten: libsndfile's mpg123 notes the
    broken frames on fd 2 ("Note: Illegal Audio-MPEG-Header ...") and decodes half of it."""
    encoded = io.BytesIO()
    soundfile.write(encoded, (0.3 * np.sin(np.arange(16000) / 16000 * 2 * np.pi * 440)).astype(np.float32), 16000,
                    format="MP3")
    data = bytearray(encoded.getvalue())
    middle = len(data) // 3
    data[middle : middle + 600] = np.random.default_rng(0).integers(0, 256, 600, dtype=np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(data))
    return path


@pytest.fixture
def damaged_folder(tmp_path) -> Path:
    if "MP3" not in soundfile.available_formats():
        pytest.skip("this libsndfile has no MP3")
    damaged_mp3(tmp_path / "in" / "damaged.mp3")
    write_audio(tmp_path / "in" / "good.wav")
    return tmp_path / "in"


@pytest.mark.parametrize("workers", ["0", "2"])
def test_decoder_notes_never_reach_the_terminal(damaged_folder, tmp_path, capfd, workers):
    result = CliRunner().invoke(embed, [str(damaged_folder), "--model", OFFLINE_MODEL, "-d", str(tmp_path / "out"),
                                        "--num-workers", workers])
    assert result.exit_code == 1
    errors = [line for line in shown_lines(result.output) if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith(f"error: '{damaged_folder / 'damaged.mp3'}': truncated or corrupt")
    os.write(2, b"fd 2 works again\n")
    assert capfd.readouterr().err == "fd 2 works again\n"  # nothing of mpg123's


def test_decoder_notes_never_reach_the_terminal_of_a_process(damaged_folder, tmp_path):
    result = subprocess.run([sys.executable, "-m", "atst_features", str(damaged_folder), "--model", OFFLINE_MODEL, "-d",
                             str(tmp_path / "out")], capture_output=True, timeout=300)  # bytes: carriage returns kept
    assert result.returncode == 1
    lines = [line for line in shown_lines(result.stderr.decode()) if line.strip()]
    assert len(lines) == 3, result.stderr  # the file's error, the bar at its end, the summary
    assert lines[0].startswith(f"error: '{damaged_folder / 'damaged.mp3'}': truncated or corrupt")
    assert lines[1].startswith("100%|") and lines[2].startswith("1 embedded") and lines[2].endswith("1 failed")
    assert (tmp_path / "out" / "good.npz").is_file()


def test_dropping_the_notes_costs_microseconds():
    started = time.perf_counter()
    for _ in range(1000):
        with runs._decoder_notes_dropped:
            pass
    assert (time.perf_counter() - started) / 1000 < 200e-6  # about 10 us here; decoding a file takes milliseconds


# ------------------------------------------------------------------ 9. the example audio lives in the package
def test_outputs_are_not_written_into_the_package(tmp_path):
    example = example_audio()
    result = CliRunner().invoke(embed, [str(example), "--model", OFFLINE_MODEL])
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1] == (
        f"Error: outputs go beside the inputs by default, but '{example.parent}' is inside the installed atst-features "
        "package: write them elsewhere with -o FILE.npz (one input) or -d DIR")
    assert not example.with_suffix(".npz").exists()
    result = CliRunner().invoke(embed, [str(example), "--model", OFFLINE_MODEL, "-o", str(tmp_path / "speech.npz"), "-q"])
    assert result.exit_code == 0 and (tmp_path / "speech.npz").is_file()


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_outputs_beside_inputs_in_a_read_only_folder(tmp_path):
    audio = write_audio(tmp_path / "ro" / "a.wav")
    audio.parent.chmod(0o555)
    try:
        result = CliRunner().invoke(embed, [str(audio), "--model", OFFLINE_MODEL])
    finally:
        audio.parent.chmod(0o755)
    assert result.exit_code == 2 and f"'{audio.parent}' cannot be written" in result.output and "-d DIR" in result.output
