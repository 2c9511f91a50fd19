"""Shared fixtures: checkpoints rebuilt from the parity recipe, expected outputs, test audio."""

from __future__ import annotations

import importlib.util
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

DATA = Path(__file__).parent / "data"

_spec = importlib.util.spec_from_file_location("parity_recipe", DATA / "recipe.py")
recipe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(recipe)


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Caches (atst-probe's embeddings) go to a temporary folder, never the user's ~/.cache."""
    patch = pytest.MonkeyPatch()
    patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
    yield
    patch.undo()


@pytest.fixture(autouse=True, scope="session")
def _temporary_files_are_cleaned_up(tmp_path_factory):
    """The system's temporary folder, for this process (tempfile) and its subprocesses (TMPDIR), is
    a watched folder of the session; whatever is left in it at the end fails the run. Tests write
    into their own ``tmp_path``; the library and the examples remove what they put there."""
    tmp_path_factory.getbasetemp()  # pytest's own folders stay where pytest keeps them
    watched = tmp_path_factory.mktemp("system-temp", numbered=False)
    patch = pytest.MonkeyPatch()
    for variable in ("TMPDIR", "TEMP", "TMP"):
        patch.setenv(variable, str(watched))
    patch.setattr(tempfile, "tempdir", str(watched))
    # torch._dynamo's import (ONNX export) makes its cache folder in the temporary folder unless told where
    patch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path_factory.mktemp("torchinductor")))
    yield
    patch.undo()
    # onnxruntime writes a session id into the temporary folder when imported, outside our control
    left = sorted(path.name for path in watched.iterdir() if path.name != ".ses")
    if left:
        pytest.fail(f"left in the temporary folder by the suite ({watched}): {', '.join(left)}", pytrace=False)


def recipe_state_dict(fmt: str, only_prefix: str = "") -> dict[str, torch.Tensor]:
    """State dict of a fixture format (``tests/data/formats/<fmt>.json``), values from the recipe."""
    spec = json.loads((DATA / "formats" / f"{fmt}.json").read_text())
    return {
        key: torch.from_numpy(recipe.tensor_for(key, shape))
        for key, shape, _ in spec["state_dict"]
        if key.startswith(only_prefix)
    }


def recipe_checkpoint(fmt: str, only_prefix: str = "") -> dict:
    """The official-layout checkpoint of a fixture format: a Lightning dict, or a bare state dict."""
    spec = json.loads((DATA / "formats" / f"{fmt}.json").read_text())
    state = recipe_state_dict(fmt, only_prefix)
    if "hyper_parameters" not in spec:
        return state
    return {
        "epoch": 0,
        "global_step": 0,
        "pytorch-lightning_version": spec["pytorch-lightning_version"],
        "state_dict": state,
        "hyper_parameters": spec["hyper_parameters"],
    }


def registry_stand_in(name: str, checkpoint: Path, tmp_path: Path, monkeypatch, **changes):
    """The registry's ``name``, downloaded from a local server holding ``checkpoint`` (a small stand-in
    in the official layout), converted, checked and cached as a user's first load does; the entry as
    it is but for ``changes``. Afterwards the Hub is offline: what the test loads again comes from the cache."""
    import dataclasses

    from download_server import DownloadServer

    from atst_features import load_model
    from atst_features.registry import REGISTRY

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    with DownloadServer({checkpoint.name: checkpoint.read_bytes()}) as server:
        entry = dataclasses.replace(REGISTRY[name], download_url=f"{server.url}/direct/{checkpoint.name}", **changes)
        monkeypatch.setitem(REGISTRY, name, entry)
        model = load_model(name, device="cpu")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return model


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("checkpoints")


def _saved(checkpoint_dir: Path, fmt: str) -> Path:
    path = checkpoint_dir / f"{fmt}.ckpt"
    if not path.exists():
        torch.save(recipe_checkpoint(fmt), path)
    return path


@pytest.fixture(scope="session")
def frame_small_ckpt(checkpoint_dir) -> Path:
    """Official ATST-Frame small Lightning checkpoint layout (297 keys, hyper_parameters)."""
    return _saved(checkpoint_dir, "atst_frame_small")


@pytest.fixture(scope="session")
def clip_small_ckpt(checkpoint_dir) -> Path:
    """Official ATST-Clip small Lightning checkpoint layout (299 keys, hyper_parameters)."""
    return _saved(checkpoint_dir, "atst_clip_small")


@pytest.fixture(scope="session")
def frame_prompt_ckpt(checkpoint_dir) -> Path:
    """Bare ATST-Frame small encoder state dict with one prompt token."""
    return _saved(checkpoint_dir, "atst_frame_small_nprompt1_encoder")


@pytest.fixture(scope="session")
def frame_small(frame_small_ckpt):
    from atst_features import load_model

    return load_model(frame_small_ckpt, device="cpu")


@pytest.fixture(scope="session")
def clip_small(clip_small_ckpt):
    from atst_features import load_model

    return load_model(clip_small_ckpt, device="cpu")


@pytest.fixture(scope="session")
def frame_prompt(frame_prompt_ckpt):
    from atst_features import load_model

    return load_model(frame_prompt_ckpt, device="cpu")


def expected(name: str) -> dict[str, np.ndarray]:
    with np.load(DATA / f"expected_{name}.npz") as data:
        return {key: data[key] for key in data.files}


@pytest.fixture(scope="session")
def expected_frame_small():
    return expected("atst_frame_small")


def waveform(seconds: float, seed: int = 0) -> np.ndarray:
    """Audio-like test signal from the parity recipe (tones, noise, 0.25 s of silence first)."""
    return recipe.waveform(seconds, seed)


def write_two_classes(root: Path, per_class: int = 24) -> Path:
    """Tones and noise, 1.5 s each, ``per_class`` clips of each class: the first two thirds train, the
    next sixth valid, the rest test; ``root/set.csv`` lists them (path, label, split). Returns ``root``."""
    rows = ["path,label,split"]
    for index in range(per_class):
        split = "train" if index < per_class * 2 // 3 else "valid" if index < per_class * 5 // 6 else "test"
        write_audio(root / "tone" / f"{index}.wav", 1.5, freq=300 + 25 * index)
        write_audio(root / "noise" / f"{index}.wav", 1.5, freq=0.0, noise=0.2 + 0.01 * index, seed=index)
        rows += [f"tone/{index}.wav,tone,{split}", f"noise/{index}.wav,noise,{split}"]
    (root / "set.csv").write_text("\n".join(rows) + "\n")
    return root


def write_audio(path: Path, seconds: float = 0.5, freq: float = 440.0, noise: float = 0.0, seed: int = 0) -> Path:
    """A 16 kHz WAV file: a sine of ``freq`` Hz (amplitude 0.3) plus Gaussian noise of std ``noise``."""
    import soundfile

    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    audio = 0.3 * np.sin(2 * np.pi * freq * t) + noise * rng.standard_normal(t.size)
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(path, audio.astype(np.float32), 16000)
    return path
