"""WebDataset tar shards: keys, rotation, streamed frames, the index, interrupted and failed writes."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
import webdataset as wds

from atst_features import InputError, OutputError, read_embeddings
from atst_features.outputs import FrameStream
from atst_features.shards import ShardWriter, complete_shards, completed_inputs, sample_key

METADATA = {"model": "atst-frame", "n_blocks": 1}
RELATIVES = ["a.wav", "speech/b.c.wav", "with space/ü 名.flac", "tab\there/x.wav", "100%/.hidden.wav",
             "deep/er/still/z.v2.mp3", "new\nline/y.wav"]


def arrays_for(index: int, frames: int = 5) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(index)
    return {"clip": rng.standard_normal(8).astype(np.float32),
            "frame": rng.standard_normal((frames, 4)).astype(np.float32),
            "timestamps": (np.arange(frames, dtype=np.float32) * 40 + 20)}


def write(folder: Path, relatives=RELATIVES, **options) -> list[str]:
    """Add one sample per relative path; returns the input paths."""
    paths = [f"/data/{relative}" for relative in relatives]
    with ShardWriter(folder, **options) as writer:
        for index, (path, relative) in enumerate(zip(paths, relatives)):
            writer.add(path, relative, arrays_for(index), METADATA)
    return paths


def assert_same(actual: dict, expected: dict) -> None:
    assert set(actual) == {*expected, "model", "n_blocks"}
    assert (actual["model"], actual["n_blocks"]) == ("atst-frame", 1)
    for key, value in expected.items():
        assert actual[key].dtype == np.float32
        np.testing.assert_array_equal(actual[key], value)


def test_keys_escape_dots_and_percent_reversibly():
    assert sample_key("speech/a.b.wav") == "speech/a%2Eb"
    assert sample_key("v1.0/x.wav") == "v1.0/x"
    assert sample_key("100%/.hidden.wav") == "100%25/%2Ehidden"
    assert sample_key("a") == "a"
    assert sample_key("new\nline/y.wav") == "new%0Aline/y"
    for relative in RELATIVES:
        assert unquote(sample_key(relative)) == relative.rsplit(".", 1)[0]
        assert "." not in sample_key(relative).rpartition("/")[2]


def test_round_trip_in_one_shard(tmp_path):
    paths = write(tmp_path)
    assert [path.name for path in complete_shards(tmp_path)] == ["shard-000000.tar"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-000000.index.tsv", "shard-000000.tar"]
    read = list(read_embeddings(tmp_path / "shard-000000.tar"))
    assert [name for name, _ in read] == paths
    for index, (_, arrays) in enumerate(read):
        assert_same(arrays, arrays_for(index))
    assert completed_inputs(tmp_path) == set(paths)


def test_shards_are_reproducible(tmp_path):
    write(tmp_path / "one")
    write(tmp_path / "two")
    assert (tmp_path / "one/shard-000000.tar").read_bytes() == (tmp_path / "two/shard-000000.tar").read_bytes()
    with tarfile.open(tmp_path / "one/shard-000000.tar") as tar:
        assert {(m.mtime, m.uid, m.gid, m.uname) for m in tar.getmembers()} == {(0, 0, 0, "")}


def test_rotation_by_count_and_by_bytes(tmp_path):
    paths = write(tmp_path / "count", inputs_per_shard=4)
    assert [p.name for p in complete_shards(tmp_path / "count")] == ["shard-000000.tar", "shard-000001.tar"]
    write(tmp_path / "bytes", max_bytes=1)  # every sample fills a shard
    assert len(complete_shards(tmp_path / "bytes")) == len(RELATIVES)
    for folder in ("count", "bytes"):
        assert [name for name, _ in read_embeddings(tmp_path / folder)] == paths
        assert completed_inputs(tmp_path / folder) == set(paths)


def test_streamed_frames_are_copied_and_removed(tmp_path):
    frames = arrays_for(0, frames=3000)
    stream = FrameStream(tmp_path / "stream", frames["frame"].shape)
    stream.write(0, frames["frame"][:1000])
    stream.write(1000, frames["frame"][1000:])
    stream.finish()
    with ShardWriter(tmp_path / "shards") as writer:
        writer.add("long.wav", "long.wav", {"clip": frames["clip"], "timestamps": frames["timestamps"]}, METADATA,
                   frames=stream)
    assert not stream.path.exists()
    ((name, arrays),) = read_embeddings(tmp_path / "shards")
    assert name == "long.wav"
    assert_same(arrays, frames)


def test_index_gives_random_access(tmp_path):
    paths = write(tmp_path, inputs_per_shard=100)
    shard = tmp_path / "shard-000000.tar"
    lines = (tmp_path / "shard-000000.index.tsv").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "path\tkey\toffset\tsize"
    assert len(lines) == len(paths) + 1
    assert lines[4].split("\t")[0] == "/data/tab\\there/x.wav"  # the tab escaped
    with open(shard, "rb") as handle:
        for index in (3, 0, 5):
            _, key, offset, size = lines[index + 1].split("\t")
            handle.seek(int(offset))
            with tarfile.open(fileobj=io.BytesIO(handle.read(int(size)))) as sample:
                members = {m.name: sample.extractfile(m).read() for m in sample.getmembers()}
            key = key.replace("\\t", "\t")
            assert sorted(members) == sorted(f"{key}.{suffix}" for suffix in ("clip.npy", "frame.npy", "json",
                                                                                "timestamps.npy"))
            assert json.loads(members[f"{key}.json"])["path"] == paths[index]
            np.testing.assert_array_equal(np.load(io.BytesIO(members[f"{key}.clip.npy"])), arrays_for(index)["clip"])


def test_webdataset_reads_the_samples(tmp_path):
    paths = write(tmp_path, inputs_per_shard=4)
    urls = [str(path) for path in complete_shards(tmp_path)]
    samples = list(wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()))
    assert [sample["__key__"] for sample in samples] == [sample_key(relative) for relative in RELATIVES]
    for index, sample in enumerate(samples):
        assert set(sample) == {"__key__", "__url__", "clip.npy", "frame.npy", "timestamps.npy", "json"}
        assert json.loads(sample["json"]) == {"path": paths[index], **METADATA}
        for key, value in arrays_for(index).items():
            np.testing.assert_array_equal(np.load(io.BytesIO(sample[f"{key}.npy"])), value)
    decoded = next(iter(wds.WebDataset(urls[0], shardshuffle=False).decode()))
    np.testing.assert_array_equal(decoded["frame.npy"], arrays_for(0)["frame"])


KILLED = """
import os, sys
import numpy as np
from atst_features.shards import ShardWriter
writer = ShardWriter(sys.argv[1], inputs_per_shard=3)
for index in range(5):
    writer.add(f"/data/{index}.wav", f"{index}.wav", {"clip": np.zeros(4, np.float32)}, {"model": "m", "n_blocks": 1})
os._exit(0)
"""


def test_a_killed_writer_leaves_its_complete_shards_only(tmp_path):
    subprocess.run([sys.executable, "-c", KILLED, str(tmp_path)], check=True)
    assert [p.name for p in complete_shards(tmp_path)] == ["shard-000000.tar"]
    assert completed_inputs(tmp_path) == {f"/data/{index}.wav" for index in range(3)}
    assert len(list(tmp_path.glob(".atst-*"))) == 1  # the unfinished shard, hidden
    with ShardWriter(tmp_path, inputs_per_shard=3) as writer:  # continues the numbering
        writer.add("/data/5.wav", "5.wav", {"clip": np.ones(4, np.float32)}, METADATA)
    assert [p.name for p in complete_shards(tmp_path)] == ["shard-000000.tar", "shard-000001.tar"]
    assert not list(tmp_path.glob(".atst-*"))  # the dead writer's temporary swept
    assert [name for name, _ in read_embeddings(tmp_path)] == [f"/data/{index}.wav" for index in (0, 1, 2, 5)]


def test_an_index_without_its_tar_is_ignored_and_overwritten(tmp_path):
    (tmp_path / "shard-000000.index.tsv").write_text("path\tkey\toffset\tsize\n/stale.wav\tstale\t0\t1\n")
    assert completed_inputs(tmp_path) == set()
    paths = write(tmp_path, RELATIVES[:2])
    assert completed_inputs(tmp_path) == set(paths)


def test_a_shard_without_its_index_is_named(tmp_path):
    write(tmp_path, RELATIVES[:2])
    (tmp_path / "shard-000000.index.tsv").unlink()
    with pytest.raises(InputError, match="shard .*shard-000000.tar' has no index 'shard-000000.index.tsv'"):
        completed_inputs(tmp_path)


def test_writer_names_number_their_own_shards(tmp_path):
    write(tmp_path, RELATIVES[:2], writer="job-1")
    write(tmp_path, RELATIVES[2:4], writer="job-1")
    write(tmp_path, RELATIVES[4:], writer="job-2")
    assert [p.name for p in complete_shards(tmp_path)] == ["job-1-000000.tar", "job-1-000001.tar", "job-2-000000.tar"]


def test_discard_and_exceptions_leave_nothing(tmp_path):
    with pytest.raises(KeyError), ShardWriter(tmp_path) as writer:
        writer.add("/data/a.wav", "a.wav", arrays_for(0), METADATA)
        raise KeyError("stop")
    writer = ShardWriter(tmp_path)
    writer.add("/data/a.wav", "a.wav", arrays_for(0), METADATA)
    writer.discard()
    writer.close()  # nothing left to finish
    assert not list(tmp_path.iterdir())


FULL_DISK = """
import resource, signal, sys
import numpy as np
from atst_features import OutputError
from atst_features.shards import ShardWriter
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
try:
    with ShardWriter(sys.argv[1]) as writer:
        for index in range(10):
            writer.add(f"/data/{index}.wav", f"{index}.wav", {"frame": np.zeros((5000, 4), np.float32)}, {})
except OutputError as error:
    print(error)
"""


def test_a_full_disk_is_one_output_error_and_leaves_no_shard(tmp_path):
    result = subprocess.run([sys.executable, "-c", FULL_DISK, str(tmp_path)], capture_output=True, text=True,
                            check=True)
    message = result.stdout.strip()
    assert message.startswith(f"cannot write {str(tmp_path / 'shard-000000.tar')!r}") and "Free space" in message
    assert len(message.splitlines()) == 1
    assert not list(tmp_path.iterdir())
    assert issubclass(OutputError, OSError)
