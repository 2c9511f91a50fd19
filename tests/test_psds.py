"""PSDS: atst-detect --scores writes frame score tables, atst-score --scores computes PSDS1 and PSDS2
from them with sed_scores_eval, equal to psds_eval on a stored case (tests/data/psds_case)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import write_audio

from atst_features import save_pretrained
from atst_features.cli.detect import detect
from atst_features.cli.tools import score
from atst_features.config import ModelConfig
from atst_features.encoder import EncoderConfig
from atst_features.events import median_filter
from atst_features.model import ATSTModel

pytest.importorskip("sed_scores_eval")

CASE = Path(__file__).parent / "data" / "psds_case"


def test_psds_equals_psds_eval_on_the_stored_case(tmp_path):
    """psds_eval at every distinct score is exact; sed_scores_eval, behind atst-score, must agree. Only the
    19 clips with events count (the DCASE baselines' rule): the 5 other score tables are left out."""
    expected = json.loads((CASE / "psds_eval.json").read_text())
    result = CliRunner().invoke(score, [str(CASE / "reference.tsv"), "--scores", str(CASE / "scores"),
                                        "--json", str(tmp_path / "s.json")])
    assert result.exit_code == 0, result.output
    got = json.loads((tmp_path / "s.json").read_text())["psds"]
    for scenario in ("PSDS1", "PSDS2"):
        assert got[scenario]["value"] == pytest.approx(expected[scenario], abs=1e-9)
    assert 0.1 < expected["PSDS1"] < 0.9 and 0.1 < expected["PSDS2"] < 1.0  # a case that can tell
    assert got["PSDS2"]["cttc_threshold"] == 0.3 and got["PSDS1"]["alpha_st"] == 1.0
    assert "PSDS1 0.132 (dtc 0.7, gtc 0.7, alpha_ct 0, alpha_st 1; sed_scores_eval, 19 files with events)" in result.output


def test_reference_files_need_score_tables_and_events_must_not_overlap(tmp_path):
    reference = tmp_path / "ref.tsv"
    reference.write_text("filename\tonset\toffset\tevent_label\nclip_01.wav\t1.0\t2.0\tdog\nnew.wav\t0.5\t1.0\tdog\n")
    result = CliRunner().invoke(score, [str(reference), "--scores", str(CASE / "scores")])
    assert result.exit_code == 1 and "no score table for 1 reference file(s), e.g. 'new'" in result.output
    reference.write_text("filename\tonset\toffset\tevent_label\nclip_01.wav\t1.0\t2.0\tdog\nclip_01.wav\t1.5\t3.0\tdog\n")
    result = CliRunner().invoke(score, [str(reference), "--scores", str(CASE / "scores")])
    assert result.exit_code == 1 and "overlapping or touching 'dog' events in 'clip_01'" in result.output
    result = CliRunner().invoke(score, [str(reference)])
    assert result.exit_code == 2 and "give DETECTED events (a TSV) and/or --scores DIR" in result.output


def test_detect_writes_score_tables_sed_scores_eval_reads(tmp_path):
    from sed_scores_eval.base_modules.io import read_sed_scores

    torch.manual_seed(0)
    encoder = EncoderConfig(cls_token=False, embed_dim=32, depth=2, num_heads=2, mlp_hidden_dim=64)
    model = ATSTModel(ModelConfig("frame", encoder, num_classes=2, labels=("beep", "hiss"), head_type="events"))
    folder = save_pretrained(model, tmp_path / "detector")
    for name, seconds in (("a.wav", 3.3), ("b.wav", 12.5)):
        write_audio(tmp_path / "audio" / name, seconds, seed=len(name))
    args = [str(tmp_path / "audio"), "--model", str(folder), "--median", "5", "--scores", str(tmp_path / "scores"), "-q",
            "--format", "tsv"]
    result = CliRunner().invoke(detect, args)
    assert result.exit_code == 0, result.output
    tables = read_sed_scores(tmp_path / "scores")  # sed_scores_eval's own reader and checks
    assert sorted(tables) == ["a", "b"] and list(tables["a"].columns) == ["onset", "offset", "beep", "hiss"]
    strong, _, _ = model.get_event_probabilities(str(tmp_path / "audio" / "b.wav"))
    table = tables["b"]
    assert len(table) == len(strong[0]) and table["offset"].iloc[-1] == pytest.approx(12.5)
    np.testing.assert_allclose(table[["beep", "hiss"]].to_numpy(), median_filter(strong[0].numpy(), 5), atol=1e-6)
    result = CliRunner().invoke(detect, args)
    assert result.exit_code == 2 and "score tables would be replaced); pass --overwrite" in result.output
    assert CliRunner().invoke(detect, args + ["--overwrite"]).exit_code == 0
