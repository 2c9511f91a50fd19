"""atst-convert and atst-models, run as users run them."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import torch
from click.testing import CliRunner
from conftest import recipe_checkpoint, waveform

from atst_features import load_model
from atst_features.cli.tools import convert, models
from atst_features.files import sha256_of

AUDIO = waveform(12.0, 41)


@pytest.mark.slow
def test_convert_round_trip(frame_small_ckpt, frame_small, tmp_path):
    out = tmp_path / "atst-frame-small"
    result = CliRunner().invoke(convert, [str(frame_small_ckpt), str(out)])
    assert result.exit_code == 0, result.output
    assert f"sha256 {sha256_of(frame_small_ckpt)}" in result.output
    assert f"sha256 {sha256_of(out / 'model.safetensors')} (model.safetensors)" in result.output
    assert "verified: frame and clip embeddings of the converted model equal the source's" in result.output
    converted = load_model(out, device="cpu")
    assert torch.equal(converted.get_frame_embeddings(AUDIO)[0], frame_small.get_frame_embeddings(AUDIO)[0])
    assert torch.equal(converted.get_clip_embedding(AUDIO), frame_small.get_clip_embedding(AUDIO))
    config = json.loads((out / "config.json").read_text())
    assert config["provenance"]["source_sha256"] == sha256_of(frame_small_ckpt)
    assert config["provenance"]["hyper_parameters"]["arch"] == "small"
    assert [p.name for p in tmp_path.iterdir()] == ["atst-frame-small"]  # no staging folder left


@pytest.mark.slow
def test_converted_full_training_checkpoint_is_small(clip_small_ckpt, tmp_path):
    """A full official training checkpoint (student, teacher, projectors, predictor, optimizer state)."""
    full = recipe_checkpoint("atst_clip_small")
    full["optimizer_states"] = [
        {"state": {i: {"exp_avg": torch.zeros(1000, 384), "exp_avg_sq": torch.zeros(1000, 384)} for i in range(8)}}
    ]
    source = tmp_path / "full.ckpt"
    torch.save(full, source)
    out = tmp_path / "converted"
    result = CliRunner().invoke(convert, [str(source), str(out)])
    assert result.exit_code == 0, result.output
    ratio = (out / "model.safetensors").stat().st_size / source.stat().st_size
    assert ratio < 0.6, ratio
    plain = tmp_path / "plain"
    assert CliRunner().invoke(convert, [str(clip_small_ckpt), str(plain)]).exit_code == 0
    ratio_plain = (plain / "model.safetensors").stat().st_size / clip_small_ckpt.stat().st_size
    assert ratio_plain < 0.6, ratio_plain  # student + teacher + heads, without optimizer state


@pytest.mark.slow
def test_convert_refuses_to_overwrite(frame_small_ckpt, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = CliRunner().invoke(convert, [str(frame_small_ckpt), str(out)])
    assert result.exit_code == 2 and "pass --overwrite" in result.output
    assert (out / "keep.txt").read_text() == "mine"
    result = CliRunner().invoke(convert, [str(frame_small_ckpt), str(out), "--overwrite"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]


def test_convert_bad_source_is_one_line(tmp_path):
    bad = tmp_path / "notes.ckpt"
    bad.write_text("not a checkpoint")
    script = shutil.which("atst-convert") or pytest.skip("atst-convert is not installed as a command")
    result = subprocess.run([script, str(bad), str(tmp_path / "out")], capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr and "notes.ckpt" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_convert_push_to_hub(frame_small_ckpt, tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    class RecordingApi:
        def __init__(self, endpoint=None):
            calls.append(("init", endpoint))

        def create_repo(self, repo_id, private=False, exist_ok=False):
            calls.append(("create_repo", repo_id, private, exist_ok))

        def upload_folder(self, repo_id, folder_path, allow_patterns, commit_message):
            from pathlib import Path

            calls.append(("upload_folder", repo_id, sorted(p.name for p in Path(folder_path).iterdir()), allow_patterns))
            return type("CommitInfo", (), {"oid": "abc123"})()

    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    result = CliRunner().invoke(convert, [str(frame_small_ckpt), str(tmp_path / "o"), "--push-to-hub", "me/atst", "--private"])
    assert result.exit_code == 0, result.output
    assert "pushed  me/atst (commit abc123)" in result.output
    assert calls[0] == ("init", "http://127.0.0.1:9")
    assert calls[1] == ("create_repo", "me/atst", True, True)
    assert calls[2][:3] == ("upload_folder", "me/atst", ["README.md", "config.json", "model.safetensors"])


def test_models_command():
    result = CliRunner().invoke(models, [])
    assert result.exit_code == 0
    for name in ["atst-clip-small", "atst-clip-base", "atst-frame-small", "atst-frame-base", "atst-c2f-base", "atst-frame-base-desed"]:
        assert name in result.output
    lines = {line.split()[0]: " ".join(line.split()[1:]) for line in result.output.splitlines() if line.startswith("atst-")}
    assert lines["atst-frame-mini"] == "frame mini embeddings 1536 1536 (ships in the package) cc-by-sa-4.0"
    assert lines["atst-frame-base"] == "(default) frame base embeddings 9216 9216 authors' Google Drive cc-by-4.0"
    assert lines["atst-clip-base"] == "clip base embeddings 9216 18432 authors' Aliyun link cc-by-4.0"
    assert lines["atst-c2f-base"] == "c2f base tags (527) 9216 9216 none yet: load its checkpoint cc-by-4.0"
    assert lines["atst-frame-base-as-strong-447"] == "frame base events (447) 9216 9216 GitHub release mit"
    listed = json.loads(CliRunner().invoke(models, ["--json"]).output)
    assert {entry["name"] for entry in listed} >= {"atst-frame-base", "atst-frame-base-desed"}


def test_models_console_script():
    script = shutil.which("atst-models") or pytest.skip("atst-models is not installed as a command")
    result = subprocess.run([script], capture_output=True, text=True)
    assert result.returncode == 0 and "atst-frame-base" in result.stdout
