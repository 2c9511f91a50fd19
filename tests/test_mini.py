"""atst-frame-mini: the model that ships inside the package, resolved offline and checked by sha256."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from atst_features import ChecksumError, DownloadError, example_audio, load_model
from atst_features import hub
from atst_features.cli.embed import embed
from atst_features.files import sha256_of
from atst_features.registry import OFFLINE_MODEL, REGISTRY

EXAMPLE = example_audio()
FIXTURE = Path(__file__).parent / "data" / "expected_atst_frame_mini.npz"


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network and an empty Hub cache, as on a fresh machine."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    return tmp_path / "hub-cache"


def test_registry_entry_resolves_to_the_package_offline(offline):
    entry = REGISTRY[OFFLINE_MODEL]
    assert entry.packaged and entry.kind == "frame" and (entry.embed_dim, entry.depth) == (256, 6)
    folder = hub.download(OFFLINE_MODEL)
    assert folder == hub.PACKAGED_MODELS / OFFLINE_MODEL
    weights = folder / "model.safetensors"
    assert sha256_of(weights) == entry.sha256 and weights.stat().st_size == entry.num_bytes
    assert entry.num_bytes < 25 * 2**20
    model = load_model(OFFLINE_MODEL, device="cpu")
    assert (model.embed_dim, model.depth, model.kind) == (256, 6, "frame")
    assert model.clip_embedding_size() == 1536 and model.frame_embedding_size() == 1536
    assert not offline.exists()  # nothing was downloaded or cached


def test_packaged_embeddings_of_the_example_are_stable(offline):
    model = load_model(OFFLINE_MODEL, device="cpu")
    clip = model.get_clip_embedding(str(EXAMPLE))
    frames, timestamps = model.get_frame_embeddings(str(EXAMPLE), n_blocks=1)
    assert torch.isfinite(clip).all() and torch.isfinite(frames).all()
    with np.load(FIXTURE) as expected:
        np.testing.assert_allclose(clip.numpy(), expected["clip"], atol=1e-4, rtol=0)
        np.testing.assert_allclose(frames.numpy(), expected["frame_n1"], atol=1e-4, rtol=0)
        np.testing.assert_array_equal(timestamps.numpy(), expected["timestamps"])


def test_tampered_packaged_weights_raise_checksum_error(offline, monkeypatch, tmp_path):
    copy = tmp_path / "models"
    shutil.copytree(hub.PACKAGED_MODELS / OFFLINE_MODEL, copy / OFFLINE_MODEL)
    weights = copy / OFFLINE_MODEL / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x01  # one bit of one weight
    weights.write_bytes(bytes(data))
    monkeypatch.setattr(hub, "PACKAGED_MODELS", copy)
    with pytest.raises(ChecksumError, match=r"packaged with atst-features.*reinstall atst-features"):
        load_model(OFFLINE_MODEL, device="cpu")


def test_missing_packaged_files_say_reinstall(offline, monkeypatch, tmp_path):
    monkeypatch.setattr(hub, "PACKAGED_MODELS", tmp_path / "nothing")
    with pytest.raises(DownloadError, match="files are missing: reinstall atst-features"):
        load_model(OFFLINE_MODEL, device="cpu")


def test_failed_download_names_the_offline_model(offline):
    with pytest.raises(DownloadError, match=r"offline mode.*'atst-frame-mini' ships inside the package"):
        load_model("atst-frame-base", device="cpu")


def test_atst_embed_with_the_packaged_model_offline(offline, tmp_path):
    out = tmp_path / "speech.npz"
    result = CliRunner().invoke(embed, [str(EXAMPLE), "--model", OFFLINE_MODEL, "--level", "both", "-o", str(out),
                                        "--device", "cpu", "-q"])
    assert result.exit_code == 0, result.output
    with np.load(out) as saved:
        assert saved["clip"].shape == (1536,) and saved["frame"].shape == (263, 1536)
        assert np.isfinite(saved["frame"]).all()


def test_hear_module_loads_the_packaged_model(offline):
    from atst_features import hear

    model = hear.load_model(OFFLINE_MODEL)
    audio = torch.zeros(2, 16000)
    audio[:, ::100] = 0.5
    scene = hear.get_scene_embeddings(audio, model)
    frames, stamps = hear.get_timestamp_embeddings(audio, model)
    assert scene.shape == (2, model.scene_embedding_size) == (2, 1536)
    assert frames.shape == (2, 25, model.timestamp_embedding_size) and stamps.shape == (2, 25)
