"""The ATST authors' AudioSet-2M tagger (atst_as2M.ckpt, ATST-Frame fine-tuned on AudioSet-2M), from the
layout of their fine-tuning code, equal to it (tests/data/make_audiossl_finetuned_parity.py): the whole
clip by default, and with span="reference" exactly what their evaluation scores on long audio too."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile
import torch
from click.testing import CliRunner
from conftest import DATA, recipe_checkpoint, registry_stand_in, waveform

from atst_features.cli.tag import tag
from atst_features.errors import InputError
from atst_features.heads import audioset_labels
from atst_features.registry import REGISTRY

NAME = "atst-frame-base-as2m"
EXPECTED = np.load(DATA / "expected_audiossl_as2m_small.npz")
CASES = {"a_3s": (3.0, 1), "b_10s": (10.0, 3), "c_11s": (11.0, 6), "d_23s": (23.3, 4)}


@pytest.fixture
def tagger(tmp_path, monkeypatch):
    """The registry's AS-2M tagger from a local server holding a small stand-in (12 classes, not 527)."""
    path = tmp_path / "atst_as2M.ckpt"
    torch.save(recipe_checkpoint("audiossl_as2m_small"), path)
    return registry_stand_in(NAME, path, tmp_path, monkeypatch, labels_file=None)


def test_equal_to_the_authors_fine_tuning_code(tagger):
    """Their evaluation: the central 12 s, then 10 s chunks of which a later one counts only beyond
    5 s; so for 11 s and 23.3 s only 10 s count. span="reference" gives their logits within 1e-4 on all
    four clips; the whole clip (the default) is the same up to 10 s and pools all of a longer one."""
    assert tagger.config.head_type == "clip" and tagger.config.multi_label and tagger.config.num_classes == 12
    for case, (seconds, seed) in CASES.items():
        expected = EXPECTED[f"{case}/logits"]
        logits = tagger.get_tag_logits(waveform(seconds, seed), span="reference")[0].numpy()
        np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)
        whole = tagger.get_tag_logits(waveform(seconds, seed))[0].numpy()
        if seconds <= 10:
            np.testing.assert_allclose(whole, expected, atol=1e-4, rtol=0)
        else:
            assert np.abs(whole - expected).max() > 1e-2  # the rest of the clip counts
    probabilities = tagger.get_tag_probabilities(waveform(23.3, 4), span="reference")[0]
    np.testing.assert_allclose(probabilities.numpy(), 1 / (1 + np.exp(-EXPECTED["d_23s/logits"])), atol=1e-5, rtol=0)


def test_atst_tag_by_name_from_the_cache(tagger, tmp_path):
    soundfile.write(tmp_path / "long.wav", waveform(23.3, 4), 16000, subtype="FLOAT")
    result = CliRunner().invoke(tag, [str(tmp_path / "long.wav"), "--model", NAME, "--span", "reference", "-k", "3",
                                      "--format", "json", "-q"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    expected = 1 / (1 + np.exp(-EXPECTED["d_23s/logits"].astype(np.float64)))
    order = np.argsort(-expected)[:3]
    assert [row["label"] for row in rows] == [f"class_{i}" for i in order]
    np.testing.assert_allclose([row["probability"] for row in rows], expected[order], atol=1e-5)


def test_unknown_span_is_one_line(tagger):
    with pytest.raises(InputError, match=r"span must be one of \('all', 'reference'\), got 'middle'"):
        tagger.get_tag_probabilities(waveform(3.0, 1), span="middle")
    result = CliRunner().invoke(tag, ["x.wav", "--model", NAME, "--span", "middle"])
    assert result.exit_code == 2 and "'middle' is not one of 'all', 'reference'" in result.output


def test_audioset_names_in_the_order_of_the_outputs():
    """Their AudioSet data keeps the index of Google's class_labels_indices.csv (audiossl's
    scripts/dataset_preprocess/audioset.py): the entry's 527 names are those, in that order."""
    entry = REGISTRY[NAME]
    assert entry.labels == audioset_labels() and len(entry.labels) == 527
    assert entry.labels[0] == "Speech" and entry.labels[137] == "Music" and entry.outputs == "tags (527)"
