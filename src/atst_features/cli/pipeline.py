"""atst-embed's pipeline in one process: files decoded ahead (:mod:`.runs`), pooled and sorted by
length into encoder batches, long files streamed to disk piece by piece, outputs written behind the
model in a thread; every file reported once, written or failed."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch

from ..audio import SAMPLE_RATE
from ..errors import NonFiniteError, one_line_message
from ..inputs import AudioInput
from ..outputs import FrameStream
from ..shards import ShardLost
from .destinations import Outputs
from .runs import Reporter

__all__ = ["POOL_BATCHES", "STREAM_BYTES", "embed_items"]

STREAM_BYTES = 256 * 2**20  # frame outputs larger than this are streamed to disk, not held in memory
POOL_BATCHES = 8  # files decoded ahead and sorted by length together, in encoder batches


class _WritesBehind:
    """Writes a batch's outputs in one thread while the model computes the next batch, and reports each file to
    ``run`` once written. At most two batches' outputs are held: a batch is handed over after the previous one is
    on disk. A write's OSError fails its file; anything else (a bug) is re-raised in the caller's thread."""

    def __init__(self, write, run: Reporter) -> None:
        self.write, self.run = write, run
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="atst-write")
        self.pending: tuple[list[tuple[AudioInput, dict, float]], Future] | None = None
        self.stopping = False

    def hand_over(self, outputs: list[tuple[AudioInput, dict, float]]) -> None:
        """``(item, arrays on the CPU, audio seconds)`` of one batch."""
        self.wait()
        self.pending = outputs, self.thread.submit(self._write_all, outputs)

    def _write_all(self, outputs: list[tuple[AudioInput, dict, float]]) -> list[OSError | None]:
        """Each file's OSError or None, in one task: a task per file costs the main process a quarter more time
        per file (``bulk_embed.py --stand-in --format tar``)."""
        errors = []
        for item, arrays, _ in outputs:
            if self.stopping:
                break
            try:
                self.write(item, arrays, None)
                errors.append(None)
            except OSError as error:
                errors.append(error)
        return errors

    def wait(self) -> None:
        if self.pending is None:
            return
        (outputs, future), self.pending = self.pending, None
        for (item, _, seconds), error in zip(outputs, future.result()):
            if error is None:
                self.run.succeeded(seconds)
            else:
                self.run.error(item, error)

    def close(self) -> None:
        """Stop: writes not started are dropped (a rerun makes them), one under way finishes."""
        self.stopping = True
        self.thread.shutdown(wait=True)


def _embed_batch(model, batch, level, n_blocks, batch_size, writer: _WritesBehind) -> None:
    waves = [waveform for _, waveform in batch]
    options = dict(n_blocks=n_blocks, batch_size=batch_size)
    clips = frames = stamps = None
    try:
        if level == "both":  # one encoder pass for ATST-Frame / C2F
            clips, frames, stamps = model.get_embeddings(waves, **options)
        elif level == "clip":
            clips = model.get_clip_embedding(waves, **options)
        else:
            frames, stamps = model.get_frame_embeddings(waves, **options)
    except NonFiniteError as error:  # only the files whose clips gave NaN or Inf fail; the others run again
        rest = writer.run.failed_non_finite(batch, set(error.items), error)
        if rest:
            _embed_batch(model, rest, level, n_blocks, batch_size, writer)
        return
    except Exception as error:  # e.g. out of memory: every file of the batch failed
        for item, _ in batch:
            writer.run.error(item, error)
        return
    # To the CPU here, in one step per array: the writing thread then never waits on the device.
    clips = clips.cpu() if clips is not None else None
    frames = [piece.cpu() for piece in frames] if frames is not None else None
    stamps = [piece.cpu() for piece in stamps] if stamps is not None else None
    outputs = []
    for index, (item, waveform) in enumerate(batch):
        arrays = {}
        if clips is not None:
            arrays["clip"] = clips[index]
        if frames is not None:
            arrays.update(frame=frames[index], timestamps=stamps[index])
        outputs.append((item, arrays, len(waveform) / SAMPLE_RATE))
    writer.hand_over(outputs)


def _embed_long(model, item, waveform, level, n_blocks, batch_size, write, base) -> None:
    """One long file: frame embeddings appended to a file on disk, piece by piece."""
    stream = FrameStream(base, (model.num_frame_embeddings(len(waveform)), model.frame_embedding_size(n_blocks)))
    try:
        timestamps = []
        for first, piece, stamps in model.iter_frame_embeddings(waveform, n_blocks=n_blocks, batch_size=batch_size):
            stream.write(first, piece)
            timestamps.append(stamps)
        stream.finish()
        arrays = {"timestamps": torch.cat(timestamps)}
        if level == "both":
            arrays["clip"] = model.get_clip_embedding(waveform, n_blocks=n_blocks, batch_size=batch_size)[0]
        write(item, arrays, stream)
    except BaseException:
        stream.discard()
        raise


def embed_items(model, todo: list[AudioInput], run: Reporter, outputs: Outputs, level: str, n_blocks: int,
                batch_size: int, num_workers: int) -> None:
    """Embed ``todo`` (decoding ahead, pooling short files, streaming long ones, writing behind) and
    report every file to ``run``."""
    write = outputs.write
    writer = _WritesBehind(write, run)
    try:
        pool, windows, pool_bytes = [], 0, 0
        for item, result in run.decoded(todo, num_workers):
            frame_bytes = model.num_frame_embeddings(len(result)) * model.frame_embedding_size(n_blocks) * 4
            if level != "clip" and frame_bytes > STREAM_BYTES:
                writer.wait()
                try:
                    _embed_long(model, item, result, level, n_blocks, batch_size, write, outputs.stream_base(item))
                except Exception as error:
                    run.error(item, error)
                else:
                    run.succeeded(len(result) / SAMPLE_RATE)
                continue
            # A pool of several batches' worth of files goes to the model at once: it sorts their
            # windows by length into batches, so short files are padded little.
            pool.append((item, result))
            windows += model.num_windows(len(result))
            pool_bytes += frame_bytes if level != "clip" else 0
            if windows >= POOL_BATCHES * batch_size or pool_bytes >= STREAM_BYTES:
                _embed_batch(model, pool, level, n_blocks, batch_size, writer)
                pool, windows, pool_bytes = [], 0, 0
        if pool:
            _embed_batch(model, pool, level, n_blocks, batch_size, writer)
        writer.wait()
    finally:
        writer.close()
        try:
            outputs.close()  # the inputs written so far are complete, even when interrupted
        except ShardLost as error:  # the open shard could not be written
            run.written_lost(error.earlier, f"{one_line_message(error)}; its {error.earlier} input(s) are lost; "
                                            "a rerun embeds them")
