"""read_embeddings over every output form, and the HEAR-style memmap export."""

from __future__ import annotations

import json

import numpy as np
import pytest

from atst_features import InputError, export_memmap, read_embeddings
from atst_features.outputs import write_outputs
from atst_features.shards import ShardWriter

METADATA = {"model": "atst-frame", "n_blocks": 2}


def arrays_for(index: int, frames: int = 5, width: int = 4) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(index)
    return {"clip": rng.standard_normal(8).astype(np.float32),
            "frame": rng.standard_normal((frames, width)).astype(np.float32),
            "timestamps": np.arange(frames, dtype=np.float32) * 40 + 20}


def check(read: list, expected: dict) -> None:
    """``read`` (what read_embeddings yielded) holds ``expected``'s arrays under its names, in that order."""
    assert [name for name, _ in read] == list(expected)
    for (_, arrays), values in zip(read, expected.values()):
        assert set(arrays) == {*values, "model", "n_blocks"}
        assert (arrays["model"], arrays["n_blocks"]) == ("atst-frame", 2)
        for key, value in values.items():
            assert arrays[key].dtype == np.float32
            np.testing.assert_array_equal(arrays[key], value)


@pytest.mark.parametrize("fmt", ["npz", "npy", "pt"])
def test_each_per_file_form(tmp_path, fmt):
    expected = {str(tmp_path / name): arrays_for(index) for index, name in enumerate(["b.x", "a", "c d"])}
    for base, values in expected.items():
        write_outputs(tmp_path / base, fmt, values, METADATA)
    expected = dict(sorted(expected.items()))
    check(list(read_embeddings(tmp_path)), expected)
    first = next(iter(expected))
    files = {"npz": [".npz"], "pt": [".pt"], "npy": [".meta.json", ".clip.npy", ".frame.npy"]}[fmt]
    for suffix in files:  # one output, by any of its files
        check(list(read_embeddings(first + suffix)), {first: expected[first]})


def test_a_mixed_folder(tmp_path):
    expected = {}
    for index, fmt in enumerate(["npz", "npy", "pt"]):
        base = tmp_path / "nested" / fmt / f"out{index}"
        write_outputs(base, fmt, arrays_for(index), METADATA)
        expected[str(base)] = arrays_for(index)
    only_clip = {"clip": arrays_for(3)["clip"]}
    write_outputs(tmp_path / "nested" / "clip", "npz", only_clip, METADATA)
    with ShardWriter(tmp_path / "shards") as writer:
        writer.add("/data/s.wav", "s.wav", arrays_for(4), METADATA)
    (tmp_path / "nested" / "stray.npy").write_bytes(b"not an output")  # no .meta.json: not ours
    (tmp_path / "nested" / ".atst-0123-1-ab.npz").write_bytes(b"hidden: not read")
    expected = {**dict(sorted({**expected, str(tmp_path / "nested" / "clip"): only_clip}.items())),
                "/data/s.wav": arrays_for(4)}
    check(list(read_embeddings(tmp_path)), expected)


def test_missing_empty_and_torn(tmp_path):
    with pytest.raises(InputError, match="no such file or folder: .*nowhere"):
        read_embeddings(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no embeddings here")
    with pytest.raises(InputError, match="no embedding outputs in .*empty.*expected .npz"):
        read_embeddings(tmp_path / "empty")
    with pytest.raises(InputError, match="notes.txt.* is not an embedding output"):
        read_embeddings(tmp_path / "empty" / "notes.txt")
    with ShardWriter(tmp_path / "shards") as writer:
        writer.add("/data/a.wav", "a.wav", arrays_for(0, frames=1000), METADATA)
    shard = tmp_path / "shards" / "shard-000000.tar"
    write_outputs(tmp_path / "out", "pt", arrays_for(0), METADATA)
    for torn in (shard, tmp_path / "out.pt"):
        torn.write_bytes(torn.read_bytes()[:torn.stat().st_size // 2])
    (tmp_path / "torn.npz").write_bytes(b"PK\x03\x04 torn")
    for torn in (shard, tmp_path / "out.pt", tmp_path / "torn.npz"):
        with pytest.raises(InputError, match=f"cannot read {str(torn)!r} as embeddings .*write it again") as error:
            list(read_embeddings(torn))
        assert len(str(error.value).splitlines()) == 1


def test_export_clip_level(tmp_path):
    expected = {str(tmp_path / "in" / name): arrays_for(index) for index, name in enumerate(["a", "b", "c"])}
    for base, values in expected.items():
        write_outputs(tmp_path / base, "npz", values, METADATA)
    target = export_memmap(tmp_path / "in", tmp_path / "out")
    assert target == tmp_path / "out" / "embeddings.npy"
    embeddings = np.load(target, mmap_mode="r")
    assert embeddings.dtype == np.float32 and embeddings.shape == (3, 8)
    np.testing.assert_array_equal(embeddings, np.stack([values["clip"] for values in expected.values()]))
    assert json.loads((tmp_path / "out" / "filenames.json").read_text()) == list(expected)
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["embeddings.npy", "filenames.json"]


def test_export_frame_level(tmp_path):
    with ShardWriter(tmp_path / "in") as writer:
        for index, frames in enumerate([3, 1, 4]):
            writer.add(f"/data/{index}.wav", f"{index}.wav", arrays_for(index, frames), METADATA)
    export_memmap(tmp_path / "in", tmp_path / "out", level="frame")
    embeddings = np.load(tmp_path / "out" / "embeddings.npy")
    expected = [arrays_for(index, frames) for index, frames in enumerate([3, 1, 4])]
    np.testing.assert_array_equal(embeddings, np.concatenate([values["frame"] for values in expected]))
    rows = json.loads((tmp_path / "out" / "filename-timestamps.json").read_text())
    assert rows == [[f"/data/{index}.wav", float(time)] for index, values in enumerate(expected)
                    for time in values["timestamps"]]


def test_export_errors(tmp_path):
    write_outputs(tmp_path / "in" / "a", "npz", {"clip": arrays_for(0)["clip"]}, METADATA)
    with pytest.raises(InputError, match="has no frame or timestamps array; extract its frame embeddings"):
        export_memmap(tmp_path / "in", tmp_path / "out", level="frame")
    write_outputs(tmp_path / "in" / "b", "npz", {"clip": np.zeros(16, np.float32)}, METADATA)
    with pytest.raises(InputError, match="of size 16, the outputs before it 8"):
        export_memmap(tmp_path / "in", tmp_path / "out")
    with pytest.raises(InputError, match="level must be 'clip' or 'frame'"):
        export_memmap(tmp_path / "in", tmp_path / "out", level="both")
    assert not (tmp_path / "out").exists()
