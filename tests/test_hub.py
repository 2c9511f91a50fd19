"""Our folder format and the Hub: save/load, download, cache, offline, revisions, integrity, registry."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from conftest import waveform
from hub_server import FakeHub

import atst_features
from atst_features import CheckpointError, ChecksumError, DownloadError, list_models, load_model, save_pretrained
from atst_features.encoder import EncoderConfig
from atst_features.files import sha256_of
from atst_features.config import ModelConfig
from atst_features.model import ATSTModel
from atst_features.registry import DEFAULT_MODEL, REGISTRY, PretrainedModel

AUDIO = waveform(2.5, 31)
REPO = "atst-features/test-frame"


def tiny_model(seed: int, kind: str = "frame") -> ATSTModel:
    """A small random model: the Hub tests are about bytes and files, not architecture."""
    torch.manual_seed(seed)
    encoder = EncoderConfig(cls_token=kind == "clip", embed_dim=64, depth=2, num_heads=2, mlp_hidden_dim=128)
    return ATSTModel(ModelConfig(kind, encoder)).eval()


def embeddings(model: ATSTModel) -> torch.Tensor:
    return model.get_frame_embeddings(AUDIO, n_blocks=2)[0]


def folder_files(model: ATSTModel, tmp_path: Path, name: str = "export") -> dict[str, bytes]:
    folder = save_pretrained(model, tmp_path / name, provenance={"source_file": "test.ckpt"})
    return {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.fixture
def hub(tmp_path, monkeypatch):
    server = FakeHub().start()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    yield server
    server.stop()


# ------------------------------------------------------------------ our folder format
def test_save_pretrained_folder(frame_small, tmp_path):
    folder = save_pretrained(frame_small, tmp_path / "atst-frame-small")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["format"] == "atst-features" and config["format_version"] == 1
    assert config["model"]["kind"] == "frame" and config["model"]["encoder"]["embed_dim"] == 384
    assert config["model"]["frontend"]["n_mels"] == 64
    assert config["license"] == "cc-by-4.0" and "2306.04186" in config["citation"]
    assert config["provenance"]["source_file"].endswith(".ckpt")
    assert config["provenance"]["atst_features_version"] == atst_features.__version__
    assert config["embedding_sizes"]["clip_n_blocks_12"] == 4608
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: atst-features\nlicense: cc-by-4.0\ntags:\n- audio\n")
    assert "from atst_features import load_model" in card and "@article{li2024atst" in card
    reloaded = load_model(folder, device="cpu")
    assert torch.equal(reloaded.get_frame_embeddings(AUDIO)[0], frame_small.get_frame_embeddings(AUDIO)[0])
    assert torch.equal(reloaded.get_clip_embedding(AUDIO), frame_small.get_clip_embedding(AUDIO))


def test_truncated_local_weights(tmp_path):
    folder = save_pretrained(tiny_model(0), tmp_path / "m")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*corrupted or truncated.*force_download=True") as info:
        load_model(folder, device="cpu")
    assert "\n" not in str(info.value)


def test_config_from_the_future(tmp_path):
    folder = save_pretrained(tiny_model(0), tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["format_version"] = 99
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="upgrade atst-features"):
        load_model(folder, device="cpu")


def test_folder_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="without config.json"):
        load_model(tmp_path / "empty", device="cpu")


# ------------------------------------------------------------------ downloads
def test_download_cache_and_offline(hub, tmp_path, monkeypatch):
    model = tiny_model(1)
    hub.commit(REPO, folder_files(model, tmp_path))
    first = load_model(REPO, device="cpu")
    assert torch.equal(embeddings(first), embeddings(model))
    assert hub.downloads("model.safetensors") == 1
    # cache reuse: the weights are not sent again
    again = load_model(REPO, device="cpu")
    assert torch.equal(embeddings(again), embeddings(model))
    assert hub.downloads("model.safetensors") == 1
    # offline: no request at all
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    seen = len(hub.requests)
    offline = load_model(REPO, device="cpu")
    assert torch.equal(embeddings(offline), embeddings(model))
    assert len(hub.requests) == seen
    # the Hub unreachable (not offline mode): served from the cache too
    monkeypatch.delenv("HF_HUB_OFFLINE")
    hub.stop()
    assert torch.equal(embeddings(load_model(REPO, device="cpu")), embeddings(model))


def test_no_network_and_no_cache_names_the_offline_options(hub, tmp_path, monkeypatch):
    hub.commit(REPO, folder_files(tiny_model(1), tmp_path))
    hub.stop()
    with pytest.raises(DownloadError, match=r"cannot download 'atst-features/test-frame': cannot reach") as info:
        load_model(REPO, device="cpu")
    message = str(info.value)
    assert "HF_HUB_OFFLINE=1" in message and "local folder" in message and "checkpoint file" in message
    assert "\n" not in message
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DownloadError, match="offline mode"):
        load_model(REPO, device="cpu")


def test_revision_pinning(hub, tmp_path, monkeypatch):
    old, new = tiny_model(1), tiny_model(2)
    first = hub.commit(REPO, folder_files(old, tmp_path, "old"), tag="v1")
    hub.commit(REPO, folder_files(new, tmp_path, "new"))
    assert torch.equal(embeddings(load_model(REPO, device="cpu")), embeddings(new))
    assert torch.equal(embeddings(load_model(REPO, revision="v1", device="cpu")), embeddings(old))
    assert torch.equal(embeddings(load_model(REPO, revision=first, device="cpu")), embeddings(old))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert torch.equal(embeddings(load_model(REPO, revision=first, device="cpu")), embeddings(old))
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(DownloadError, match=r"at revision 'v9': no such revision"):
        load_model(REPO, revision="v9", device="cpu")


def test_corrupted_cached_weights_are_refused(hub, tmp_path):
    model = tiny_model(3)
    hub.commit(REPO, folder_files(model, tmp_path))
    load_model(REPO, device="cpu")
    blobs = sorted((tmp_path / "hub-cache").glob("models--atst-features--test-frame/blobs/*"), key=lambda p: -p.stat().st_size)
    blob = blobs[0]  # the weights, by far the largest file
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match=r"model\.safetensors.*sha256 .* is not the expected .*force_download=True") as info:
        load_model(REPO, device="cpu")
    assert "\n" not in str(info.value)
    repaired = load_model(REPO, device="cpu", force_download=True)
    assert torch.equal(embeddings(repaired), embeddings(model))


def test_missing_repository_and_unpublished_registry_model(hub):
    with pytest.raises(DownloadError, match="no Hub repository 'someone/nothing'"):
        load_model("someone/nothing", device="cpu")
    with pytest.raises(DownloadError, match=r"'atst-c2f-base' may not be published yet.*github\.com.*atst-convert"):
        load_model("atst-c2f-base", device="cpu")  # no official download link


def test_repository_in_another_format(hub):
    hub.commit("someone/bert", {"pytorch_model.bin": b"x" * 100, "README.md": b"hi"})
    with pytest.raises(DownloadError, match="not an atst-features model repository"):
        load_model("someone/bert", device="cpu")


def test_typo_in_a_local_path_is_not_sent_to_the_hub(hub):
    with pytest.raises(FileNotFoundError, match="no such checkpoint file"):
        load_model("checkpoints/atstframe_base.ckpt", device="cpu")
    assert hub.requests == []
    with pytest.raises(FileNotFoundError, match="not a file, a folder, a registry name"):
        load_model("atst-frame-bse", device="cpu")


# ------------------------------------------------------------------ registry
@pytest.fixture
def registry_entry(monkeypatch):
    def add(**fields) -> PretrainedModel:
        entry = dataclasses.replace(REGISTRY["atst-frame-base"], **{"download_url": None, **fields})  # Hub only
        monkeypatch.setitem(REGISTRY, entry.name, entry)
        return entry

    return add


def test_registry_checksum(hub, tmp_path, registry_entry):
    model = tiny_model(4)
    files = folder_files(model, tmp_path)
    hub.commit(REPO, files)
    import hashlib

    good = hashlib.sha256(files["model.safetensors"]).hexdigest()
    registry_entry(name="test-good", repo_id=REPO, sha256=good)
    assert torch.equal(embeddings(load_model("test-good", device="cpu")), embeddings(model))
    registry_entry(name="test-bad", repo_id=REPO, sha256="0" * 64)
    with pytest.raises(ChecksumError, match="is not the expected 0000"):
        load_model("test-bad", device="cpu")


@pytest.mark.slow
def test_registry_third_party_checkpoint(hub, tmp_path, registry_entry, frame_small_ckpt):
    """A registry entry pointing at a checkpoint file (as atst-frame-base-desed does), sha256-verified."""
    checkpoint = torch.load(frame_small_ckpt, weights_only=True)
    prefix = "model.teacher.encoder."
    sed = {"atst_frame.atst." + k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    sed["cnn.cnn.conv0.weight"] = torch.zeros(16, 1, 3, 3)
    sed["dense.weight"] = torch.zeros(10, 256)
    path = tmp_path / "model.pth"
    torch.save(sed, path)
    hub.commit("someone/ATST-SED", {"model.pth": path.read_bytes()})
    registry_entry(name="test-desed", repo_id="someone/ATST-SED", filename="model.pth", sha256=sha256_of(path))
    model = load_model("test-desed", device="cpu")
    reference = load_model(frame_small_ckpt, device="cpu")
    assert torch.equal(model.get_frame_embeddings(AUDIO)[0], reference.get_frame_embeddings(AUDIO)[0])
    registry_entry(name="test-desed-bad", repo_id="someone/ATST-SED", filename="model.pth", sha256="f" * 64)
    with pytest.raises(ChecksumError, match=r"model\.pth"):
        load_model("test-desed-bad", device="cpu")


def test_list_models():
    models = {m.name: m for m in list_models()}
    assert DEFAULT_MODEL == "atst-frame-base"
    assert set(models) == {
        "atst-clip-small", "atst-clip-base", "atst-frame-small", "atst-frame-base", "atst-c2f-base",
        "atst-frame-base-desed", "atst-frame-mini", "atst-frame-base-as-strong-447", "atst-frame-base-as-strong",
        "atst-sed-desed", "atst-frame-base-as2m",
    }
    strong = models["atst-frame-base-as-strong-447"]
    assert strong.head == "strong" and strong.outputs == "events (447)" and strong.detection["windows"] == "audio"
    assert strong.download_url.startswith("https://github.com/fschmid56/PretrainedSED/releases/download/v0.0.1/")
    assert models["atst-clip-base"].clip_embedding_size(12) == 18432
    assert models["atst-frame-small"].frame_embedding_size(1) == 384
    assert models["atst-c2f-base"].kind == "c2f"
    desed = models["atst-frame-base-desed"]
    assert desed.repo_id == "igonzf/ATST-SED" and desed.filename == "model.pth"
    assert desed.num_bytes == 346_657_710
    assert desed.sha256 == "295e9c10c4ce4d3106d5110ff51fea04ddb2173302bd5b3d546a6eef6cb119ae"
    mini = models["atst-frame-mini"]
    assert mini.packaged and (mini.embed_dim, mini.depth) == (256, 6) and mini.clip_embedding_size() == 1536
    assert not any(entry.packaged for name, entry in models.items() if name != "atst-frame-mini")
    for entry in models.values():
        assert entry.license and entry.citation and entry.source_url.startswith("https://")
