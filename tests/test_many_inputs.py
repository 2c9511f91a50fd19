"""Listing many inputs: compact AudioInput objects, manifests read line by line, output names and repeats
found without a Path per input, with the same results as the Path-based rules they replace."""

from __future__ import annotations

import pickle
import tracemalloc
from pathlib import Path

import pytest

from atst_features.cli.destinations import FileOutputs
from atst_features.inputs import AudioInput, find_inputs, read_manifest, repeats

TRICKY = ["a.wav", "x/a.b.wav", "x/.hidden", "x/a.", "./y/b.wav", "y//c.flac", "z/./d.wav", "../up.wav",
          "u/../v.wav", "sp ace/ü.wav", "dir.with.dots/e"]


def test_manifest_inputs_equal_the_path_rules(tmp_path):
    (tmp_path / "m.txt").write_text("\n".join([*TRICKY, str(tmp_path / "abs" / "f.wav"), "/elsewhere/g.wav"]) + "\n")
    items = find_inputs([], tmp_path / "m.txt")
    root = tmp_path
    expected = []
    for path, _ in read_manifest(tmp_path / "m.txt"):
        try:
            relative = path.relative_to(root)
        except ValueError:
            relative = Path(*path.resolve().parts[1:])
        expected.append((path, relative))
    assert [(item.path, item.relative) for item in items] == expected
    assert [item.path_str for item in items][:2] == [str(tmp_path / "a.wav"), str(tmp_path / "x" / "a.b.wav")]
    assert pickle.loads(pickle.dumps(items)) == items


@pytest.mark.parametrize("output_dir", [None, "out"])
def test_output_names_equal_the_path_rules(tmp_path, output_dir):
    outputs = FileOutputs("npz", {}, ("clip",), Path(output_dir) if output_dir else None)
    for entry in TRICKY:
        item = AudioInput(Path("root") / entry, entry)
        old = (Path(output_dir) / item.relative.parent / item.relative.stem if output_dir
               else item.path.with_name(item.path.stem))
        assert outputs.base(item) == old, entry


def test_repeats_finds_each_later_copy():
    keys = ["a", "b", "a", "c", "b", "a"]
    assert repeats(keys, str) == [(0, 2), (1, 4), (0, 5)]
    assert repeats([], str) == [] and repeats(["x"], str) == []


def test_duplicates_and_outputs_that_clash(tmp_path):
    (tmp_path / "a.wav").write_bytes(b"")
    (tmp_path / "m.txt").write_text("a.wav\n./a.wav\n" + str(tmp_path / "a.wav") + "\nb.wav\n")
    assert [item.relative_str for item in find_inputs([], tmp_path / "m.txt")] == ["a.wav", "b.wav"]
    outputs = FileOutputs("npz", {}, ("clip",), tmp_path / "out")
    with pytest.raises(Exception, match="would both write"):
        outputs.check_distinct([AudioInput(tmp_path / "a.wav", "a.wav"), AudioInput(tmp_path / "a.flac", "a.flac")])


def test_a_hundred_thousand_inputs_stay_small(tmp_path):
    lines = [f"audio/d{i // 1000:04d}/f{i:07d}.wav" for i in range(100_000)]
    (tmp_path / "m.txt").write_text("\n".join(lines) + "\n")
    tracemalloc.start()
    items = find_inputs([], tmp_path / "m.txt")
    held, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(items) == 100_000 and items[-1].relative_str == lines[-1]
    assert held / len(items) < 250 and peak / len(items) < 400, (held, peak)  # bytes per input; Paths took ~1 500
