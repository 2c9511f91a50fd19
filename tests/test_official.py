"""Official downloads: registry models not yet on the Hub come from the authors' links, once."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import waveform, write_audio
from download_server import DownloadServer
from hub_server import FakeHub

from atst_features import CheckpointError, ChecksumError, DownloadError, load_model, save_pretrained
from atst_features.cli.embed import embed
from atst_features.encoder import EncoderConfig
from atst_features.files import sha256_of
from atst_features.registry import REGISTRY
from atst_features.config import ModelConfig
from atst_features.model import ATSTModel
from atst_features.official import fetch_official, official_folder

AUDIO = waveform(1.0)
DRIVE_ID = "1xZoOTuxV415icYONYbeFQzgrmJQf4a4B"


def tiny_checkpoint(path: Path, seed: int, kind: str = "clip") -> Path:
    """An official-style Lightning checkpoint of a small random encoder."""
    torch.manual_seed(seed)
    encoder = EncoderConfig(cls_token=kind == "clip", embed_dim=64, depth=2, num_heads=2, mlp_hidden_dim=128)
    model = ATSTModel(ModelConfig(kind, encoder))
    state = {f"model.teacher.encoder.{k}": v for k, v in model.encoder.state_dict().items()}
    torch.save({"pytorch-lightning_version": "1.9.0", "state_dict": state, "hyper_parameters": {}}, path)
    return path


def frames(model: ATSTModel) -> torch.Tensor:
    return model.get_frame_embeddings(AUDIO, n_blocks=2)[0]


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # no Hub: nothing may go there
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return tmp_path / "hub-cache"


def official_entry(monkeypatch, name: str, url: str):
    entry = dataclasses.replace(REGISTRY[name], download_url=url)
    monkeypatch.setitem(REGISTRY, name, entry)
    return entry


def test_direct_link_download_cache_verify_and_offline(cache, tmp_path, monkeypatch):
    checkpoint = tiny_checkpoint(tmp_path / "small.ckpt", seed=0)
    with DownloadServer({"small.ckpt": checkpoint.read_bytes()}) as server:
        entry = official_entry(monkeypatch, "atst-clip-small", f"{server.url}/direct/small.ckpt")
        model = load_model("atst-clip-small", device="cpu")
        assert torch.equal(frames(model), frames(load_model(checkpoint, device="cpu")))
        assert model.kind == "clip" and len(server.file_requests()) == 1

        home = official_folder(entry)
        assert home == cache.parent / "atst-features-official" / "atst-clip-small"
        record = json.loads((home / "download.json").read_text())
        assert record["source_sha256"] == sha256_of(checkpoint) and record["source_bytes"] == checkpoint.stat().st_size
        assert record["weights_sha256"] == sha256_of(home / "model" / "model.safetensors")
        assert record["url"] == entry.download_url and record["source_file"] == "small.ckpt"
        assert sorted(p.name for p in home.iterdir()) == [".lock", "download.json", "model"]  # checkpoint deleted
        config = json.loads((home / "model" / "config.json").read_text())
        assert config["provenance"]["source_url"] == entry.download_url

        requests = len(server.requests)
        assert torch.equal(frames(load_model("atst-clip-small", device="cpu")), frames(model))
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        assert torch.equal(frames(load_model("atst-clip-small", device="cpu")), frames(model))
        assert len(server.requests) == requests  # cached: no request, online or offline

        weights = home / "model" / "model.safetensors"
        data = bytearray(weights.read_bytes())
        data[-1] ^= 1
        weights.write_bytes(bytes(data))
        with pytest.raises(ChecksumError, match=r"model\.safetensors.*sha256.*force_download=True") as info:
            load_model("atst-clip-small", device="cpu")
        assert "\n" not in str(info.value)
        monkeypatch.delenv("HF_HUB_OFFLINE")
        repaired = load_model("atst-clip-small", device="cpu", force_download=True)
        assert torch.equal(frames(repaired), frames(model)) and len(server.file_requests()) == 2


@pytest.mark.slow
def test_drive_confirmation_page(cache, frame_small_ckpt, frame_small, monkeypatch):
    with DownloadServer({DRIVE_ID: frame_small_ckpt.read_bytes()}) as server:
        entry = official_entry(monkeypatch, "atst-frame-small", f"{server.url}/uc?export=download&id={DRIVE_ID}")
        model = load_model("atst-frame-small", device="cpu")
        assert torch.equal(model.get_frame_embeddings(AUDIO)[0], frame_small.get_frame_embeddings(AUDIO)[0])
        paths = [path for path, _ in server.requests]
        assert paths[0] == f"/uc?export=download&id={DRIVE_ID}"
        assert paths[1] == f"/download?id={DRIVE_ID}&export=download&confirm=t&uuid={server.uuid}"
        assert len(paths) == 2
        record = json.loads((official_folder(entry) / "download.json").read_text())
        assert record["source_file"] == f"atstframe_{DRIVE_ID[:4]}.ckpt"  # the name Drive gives


def test_interrupted_download_resumes(cache, tmp_path, monkeypatch):
    checkpoint = tiny_checkpoint(tmp_path / "base.ckpt", seed=1)
    data = checkpoint.read_bytes()
    with DownloadServer({"base.ckpt": data}) as server:
        official_entry(monkeypatch, "atst-clip-base", f"{server.url}/direct/base.ckpt")
        server.truncate_next = True  # the first response stops half-way
        model = load_model("atst-clip-base", device="cpu")
        assert torch.equal(frames(model), frames(load_model(checkpoint, device="cpu")))
        (_, first_range), (_, second_range) = server.file_requests()
        assert first_range is None and second_range == f"bytes={len(data) // 2}-"


def test_changed_file_is_refused(cache, tmp_path, monkeypatch):
    first = tiny_checkpoint(tmp_path / "first.ckpt", seed=2)
    with DownloadServer({"small.ckpt": first.read_bytes()}) as server:
        entry = official_entry(monkeypatch, "atst-clip-small", f"{server.url}/direct/small.ckpt")
        model = load_model("atst-clip-small", device="cpu")
        server.files["small.ckpt"] = tiny_checkpoint(tmp_path / "second.ckpt", seed=3).read_bytes()
        with pytest.raises(ChecksumError, match=r"differs from the first download.*delete") as info:
            fetch_official(entry, force_download=True)
        assert "\n" not in str(info.value)
        assert torch.equal(frames(load_model("atst-clip-small", device="cpu")), frames(model))  # cache kept
        assert sorted(p.name for p in official_folder(entry).iterdir()) == [".lock", "download.json", "model"]


def test_wrong_kind_is_not_cached(cache, tmp_path, monkeypatch):
    frame = tiny_checkpoint(tmp_path / "frame.ckpt", seed=4, kind="frame")
    with DownloadServer({"small.ckpt": frame.read_bytes()}) as server:
        entry = official_entry(monkeypatch, "atst-clip-small", f"{server.url}/direct/small.ckpt")
        with pytest.raises(CheckpointError, match="holds an ATST-frame model, not the clip model"):
            load_model("atst-clip-small", device="cpu")
        assert not (official_folder(entry) / "model").exists()
        assert not (official_folder(entry) / "download.json").exists()


def test_drive_quota_page_and_missing_file(cache, monkeypatch):
    with DownloadServer({}) as server:
        official_entry(monkeypatch, "atst-frame-base", f"{server.url}/quota?id={DRIVE_ID}")
        with pytest.raises(DownloadError, match=r"web page \('Google Drive - Quota exceeded'\).*browser and install it "
                                                r"as 'atst-frame-base': atst-convert path/to/file --as atst-frame-base$"):
            load_model("atst-frame-base", device="cpu")
        official_entry(monkeypatch, "atst-frame-base", f"{server.url}/direct/missing.ckpt")
        with pytest.raises(DownloadError, match="HTTP 404"):
            load_model("atst-frame-base", device="cpu")


def test_offline_without_cache_and_unreachable(cache, monkeypatch):
    official_entry(monkeypatch, "atst-clip-small", "http://127.0.0.1:9/direct/small.ckpt")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DownloadError, match="offline mode .* not in the cache"):
        load_model("atst-clip-small", device="cpu")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(DownloadError, match=r"cannot download 'atst-clip-small'.*no connection to 127\.0\.0\.1") as info:
        load_model("atst-clip-small", device="cpu")  # at once: a refused connection is not retried
    assert "\n" not in str(info.value) and "bytes are kept" not in str(info.value)


def test_published_entry_prefers_the_hub(cache, tmp_path, monkeypatch):
    hub = FakeHub().start()
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    try:
        torch.manual_seed(5)
        encoder = EncoderConfig(cls_token=True, embed_dim=64, depth=2, num_heads=2, mlp_hidden_dim=128)
        published = ATSTModel(ModelConfig("clip", encoder)).eval()
        folder = save_pretrained(published, tmp_path / "published")
        commit = hub.commit("atst-features/atst-clip-small", {p.name: p.read_bytes() for p in folder.iterdir()})
        with DownloadServer({}) as server:
            entry = official_entry(monkeypatch, "atst-clip-small", f"{server.url}/direct/small.ckpt")
            monkeypatch.setitem(REGISTRY, entry.name, dataclasses.replace(entry, revision=commit))
            assert torch.equal(frames(load_model("atst-clip-small", device="cpu")), frames(published))
            assert server.requests == [] and hub.downloads("model.safetensors") == 1
    finally:
        hub.stop()


def test_cli_embeds_with_an_official_model(cache, tmp_path, monkeypatch):
    checkpoint = tiny_checkpoint(tmp_path / "small.ckpt", seed=6)
    audio = write_audio(tmp_path / "a.wav", seconds=1.0)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    official_entry(monkeypatch, "atst-clip-small", "http://127.0.0.1:9/direct/small.ckpt")
    result = CliRunner().invoke(embed, [str(audio), "--model", "atst-clip-small", "-d", str(tmp_path / "out")])
    assert result.exit_code == 1 and result.output.count("\n") == 1 and "offline mode" in result.output
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with DownloadServer({"small.ckpt": checkpoint.read_bytes()}) as server:
        official_entry(monkeypatch, "atst-clip-small", f"{server.url}/direct/small.ckpt")
        result = CliRunner().invoke(embed, [str(audio), "--model", "atst-clip-small", "-d", str(tmp_path / "out"), "-q"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "a.npz").is_file()


def test_registry_names_the_authors_links():
    links = {name: REGISTRY[name].download_url for name in ("atst-clip-small", "atst-clip-base", "atst-frame-small", "atst-frame-base")}
    assert links["atst-clip-base"] == "https://checkpointstorage.oss-cn-beijing.aliyuncs.com/atst/base.ckpt"
    assert links["atst-frame-base"] == "https://drive.google.com/uc?export=download&id=1bGJSZWlAIIJ6GL5Id5dW0PTB72DL-QDQ"
    assert all(not REGISTRY[name].published for name in links)  # until our Hub repositories are pinned
    assert REGISTRY["atst-c2f-base"].download_url is None  # the authors publish no C2F file


def test_concurrent_first_loads_download_once(cache, tmp_path, monkeypatch):
    """Two loads at once (threads here; processes alike: the lock is a file lock) share one download."""
    from concurrent.futures import ThreadPoolExecutor

    checkpoint = tiny_checkpoint(tmp_path / "small.ckpt", seed=7)
    with DownloadServer({"small.ckpt": checkpoint.read_bytes()}) as server:
        official_entry(monkeypatch, "atst-clip-small", f"{server.url}/direct/small.ckpt")
        with ThreadPoolExecutor(2) as pool:
            folders = list(pool.map(lambda _: fetch_official(REGISTRY["atst-clip-small"]), range(2)))
        assert folders[0] == folders[1] and len(server.file_requests()) == 1


def test_an_interrupted_call_is_resumed_by_the_next(cache, tmp_path, monkeypatch):
    checkpoint = tiny_checkpoint(tmp_path / "small.ckpt", seed=8)
    data = checkpoint.read_bytes()
    monkeypatch.setattr("atst_features.official.ATTEMPTS", 1)  # this call gives up after one cut
    with DownloadServer({"small.ckpt": data}) as server:
        entry = official_entry(monkeypatch, "atst-clip-small", f"{server.url}/direct/small.ckpt")
        server.truncate_next = True
        with pytest.raises(DownloadError, match=rf"{len(data) // 2:,} bytes are kept in .*next attempt resumes"):
            fetch_official(entry)
        assert torch.equal(frames(load_model("atst-clip-small", device="cpu")), frames(load_model(checkpoint, device="cpu")))
        assert server.file_requests()[-1][1] == f"bytes={len(data) // 2}-"


@pytest.mark.parametrize("name", ["download.json", "model", "../../escape.ckpt", ".lock"])
def test_server_file_names_cannot_touch_the_cache(cache, tmp_path, monkeypatch, name):
    checkpoint = tiny_checkpoint(tmp_path / "small.ckpt", seed=9)
    with DownloadServer({"small.ckpt": checkpoint.read_bytes()}) as server:
        server.direct_name = name
        entry = official_entry(monkeypatch, "atst-clip-small", f"{server.url}/direct/small.ckpt")
        model = load_model("atst-clip-small", device="cpu")
    home = official_folder(entry)
    assert sorted(p.name for p in home.iterdir()) == [".lock", "download.json", "model"]
    assert json.loads((home / "download.json").read_text())["weights_sha256"] == sha256_of(home / "model" / "model.safetensors")
    assert torch.equal(frames(model), frames(load_model(checkpoint, device="cpu")))
    assert not (tmp_path / "escape.ckpt").exists()
