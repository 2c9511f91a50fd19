"""A new kind of head is one HEADS entry: the model, saving and loading, checkpoint reading,
conversion, the model card and the commands all follow it with no other change."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import write_audio
from torch import nn

from atst_features import load_model, save_pretrained
from atst_features.cli.tag import tag
from atst_features.cli.tools import convert
from atst_features.config import ModelConfig
from atst_features.encoder import EncoderConfig
from atst_features.heads import HEADS, HeadSpec
from atst_features.model import ATSTModel


class TwoLayerHead(nn.Module):
    """A clip-level head the package does not have: Linear, ReLU, Linear."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.hidden = nn.Linear(dim, 16)
        self.out = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.hidden(x)))


@pytest.fixture
def mlp_head(monkeypatch):
    spec = HeadSpec("mlp", "clip", lambda size, classes, norm: TwoLayerHead(size, classes), marker="out.weight",
                    optional_norm=False, title="two-layer tagging head", outputs="two-layer logits",
                    how_to_get="train one", predict=lambda model, audio: model.get_tag_logits(audio),
                    card="\n## Two-layer head\n\n{classes} classes{shown}.\n")
    monkeypatch.setitem(HEADS, "mlp", spec)
    return spec


def test_a_new_kind_of_head_is_one_entry(tmp_path, mlp_head):
    torch.manual_seed(0)
    encoder = EncoderConfig(cls_token=False, embed_dim=32, depth=2, num_heads=2, mlp_hidden_dim=64)
    labels = ("bird", "car", "rain")
    model = ATSTModel(ModelConfig("frame", encoder, num_classes=3, labels=labels, head_type="mlp")).eval()
    assert isinstance(model.head, TwoLayerHead) and model.head_spec is mlp_head
    audio = write_audio(tmp_path / "a.wav", 2.0)
    logits = model.get_tag_logits(audio)

    folder = save_pretrained(model, tmp_path / "folder")
    assert "## Two-layer head\n\n3 classes (`bird`, `car`, `rain`)." in (folder / "README.md").read_text()
    assert torch.equal(load_model(folder, device="cpu").get_tag_logits(audio), logits)

    # as a training module saves it (the model under model.*), converted and verified
    state = {f"model.{key}": value for key, value in model.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": {"labels": list(labels)}}, tmp_path / "run.ckpt")
    result = CliRunner().invoke(convert, [str(tmp_path / "run.ckpt"), str(tmp_path / "converted")])
    assert result.exit_code == 0, result.output
    assert "two-layer logits (3 classes) of the converted model equal the source's" in result.output
    config = json.loads((tmp_path / "converted" / "config.json").read_text())
    assert config["model"]["head_type"] == "mlp"

    result = CliRunner().invoke(tag, [str(audio), "--model", str(tmp_path / "converted"), "--format", "json", "-k", "3"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output[result.output.index("["):result.output.rindex("]") + 1])
    expected = logits.sigmoid()[0]
    assert [row["label"] for row in rows] == [labels[i] for i in expected.argsort(descending=True).tolist()]
    # printed to 6 decimals, computed in a batch of windows: float32 rounding apart
    np.testing.assert_allclose([row["probability"] for row in rows], expected.sort(descending=True).values, atol=5e-6)
