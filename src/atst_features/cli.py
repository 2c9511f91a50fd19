"""Command-line tools: ``atst-embed``, ``atst-tag``, ``atst-detect``, ``atst-score``, ``atst-convert`` and ``atst-models``.

Expected failures (a bad file, no network, a refused overwrite) end with one ``Error: ...`` line
and exit code 1 (2 for usage errors), never a traceback.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import time
import traceback
import warnings
from abc import ABC, abstractmethod
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import click
import numpy as np
import torch
from tqdm import tqdm

from .audio import SAMPLE_RATE, load_audio
from .errors import BUG_REPORT, InputError, SlowPrecisionWarning, expected_failure, one_line_message
from .hub import push_to_hub
from .inputs import AudioInput, find_inputs
from .precision import PRECISIONS
from .outputs import FORMATS, FrameStream, output_files, temporary_beside, write_outputs
from .registry import DEFAULT_MODEL, list_models

@contextmanager
def one_line_warnings():
    """Inside: the library's warnings (:class:`SlowPrecisionWarning`) print as one ``warning:`` line,
    without the source line Python shows; other warnings as usual."""
    with warnings.catch_warnings():
        python_way = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, SlowPrecisionWarning):
                click.echo(f"warning: {message}", err=True)
            else:
                python_way(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield


def one_line_errors(command):
    """Expected failures become one ``Error:`` line (exit code 1); a bug prints its traceback and
    asks to be reported (exit code 1). Warnings of the library are one line each."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            with one_line_warnings():
                return command(*args, **kwargs)
        except (click.ClickException, click.exceptions.Exit, click.Abort, KeyboardInterrupt, SystemExit):
            raise
        except Exception as error:  # noqa: BLE001 - sorted into expected failures and bugs
            if expected_failure(error):
                raise click.ClickException(one_line_message(error)) from None
            traceback.print_exc()
            click.echo(BUG_REPORT, err=True)
            sys.exit(1)

    return wrapper


def _find_items(inputs: tuple[str, ...], manifest: Path | None) -> tuple[list[AudioInput], list[Path]]:
    """The audio files named by INPUTS and --manifest, and the FIFOs, sockets or devices skipped in
    folders; a usage error when there are no files."""
    if not inputs and manifest is None:
        raise click.UsageError("give audio files, folders or glob patterns, or --manifest FILE")
    special: list[Path] = []
    try:
        items = find_inputs(list(inputs), manifest, special)
    except (InputError, OSError) as error:
        raise click.UsageError(str(error)) from None
    if not items:
        raise click.UsageError(f"no audio files found in {', '.join(inputs) or str(manifest)}"
                               + (f" ({len(special)} FIFOs, sockets or devices skipped)" if special else ""))
    return items, special


def _result_format(output: Path | None, fmt: str | None, overwrite: bool, suffixes: tuple[str, ...]) -> str:
    """The format of atst-tag / atst-detect results: -o's suffix (one of ``suffixes``, agreeing with
    --format; an existing file only with --overwrite), else --format, else a table."""
    if output is None:
        return fmt or "table"
    suffix = output.suffix.lstrip(".").lower()
    if suffix not in suffixes or fmt not in (None, suffix):
        raise click.UsageError(f"-o/--output takes a {' or '.join('.' + s for s in suffixes)} file (matching --format)")
    if output.exists() and not overwrite:
        raise click.UsageError(f"{str(output)!r} exists; pass --overwrite to replace it")
    return suffix


def _model_with_head(model_name: str, device: str | None, precision: str, level: str):
    """Load a model with a head of ``level`` (``"clip"``: tagging, ``"frame"``: events); one ``Error:`` line otherwise."""
    from .loading import load_model

    model = load_model(model_name, device=device, precision=precision)
    model.require_head(level, repr(model_name))
    return model


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("source", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--push-to-hub", "repo_id", metavar="REPO_ID", help="Upload the folder to this Hub repository (org/name).")
@click.option("--private", is_flag=True, help="Create the Hub repository as private.")
@click.option("--license", "license_", default="cc-by-4.0", show_default=True, help="Licence written in the model card.")
@click.option("--overwrite", is_flag=True, help="Replace OUT_DIR if it exists.")
@one_line_errors
def convert(source: Path, out_dir: Path, repo_id: str | None, private: bool, license_: str, overwrite: bool) -> None:
    """Convert an ATST checkpoint SOURCE into an atst-features folder OUT_DIR.

    SOURCE: an official ATST-Frame / ATST-Clip Lightning checkpoint, the C2F distillation
    checkpoint, a fine-tuned, ATST-SED or bare encoder state dict. OUT_DIR gets config.json,
    model.safetensors (inference weights only) and a model card. The converted model's
    embeddings are checked to equal the source's before success is reported.
    """
    from .convert import convert_checkpoint

    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise click.UsageError(f"{str(out_dir)!r} exists and is not empty; pass --overwrite to replace it")
    click.echo(f"source  {source} ({source.stat().st_size:,} bytes)")
    done = convert_checkpoint(source, out_dir, license=license_, overwrite=overwrite)
    enc = done.model.config.encoder
    click.echo(f"  sha256 {done.source_sha256}")
    click.echo(f"  {done.layout}: {enc.embed_dim} wide, {enc.depth} blocks, {enc.n_prompts} prompt tokens")
    click.echo(f"wrote   {out_dir}: config.json, model.safetensors ({done.weights_bytes:,} bytes, "
               f"{done.weights_bytes / done.source_bytes:.0%} of the source), README.md")
    click.echo(f"  sha256 {done.weights_sha256} (model.safetensors)")
    spec = done.model.head_spec
    extra = f" and {spec.outputs} ({len(done.model.labels)} classes)" if spec is not None else ""
    click.echo(f"verified: frame and clip embeddings{extra} of the converted model equal the source's")
    if repo_id:
        commit = push_to_hub(out_dir, repo_id, private=private)
        click.echo(f"pushed  {repo_id} (commit {commit})")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("source")
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--n-blocks", type=click.IntRange(min=1), default=None,
              help="Return the last N blocks side by side [default: all of the model's].")
@click.option("--frontend", is_flag=True, help="Put the log-mel front end in the graph (input: 16 kHz waveforms).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@one_line_errors
def export(source: str, out: Path, n_blocks: int | None, frontend: bool, overwrite: bool) -> None:
    """Export a model's encoder as an ONNX graph OUT (dynamic batch and time, one window of up to 10 s).

    SOURCE: anything --model takes (registry name, Hub id, folder, checkpoint file). Inputs: mel
    [B, n_mels, T] and n_tokens [B], or with --frontend waveform [B, N]; outputs: frames
    [B, T // 4, n_blocks * D] (and cls for ATST-Clip). With onnxruntime installed, the graph's
    frame embeddings are checked against PyTorch's on 1 s, 3.7 s and 10 s of audio.
    """
    from .export import check_onnx, export_onnx
    from .loading import load_model

    if out.exists() and not overwrite:
        raise click.UsageError(f"{str(out)!r} exists; pass --overwrite to replace it")
    model = load_model(source, device="cpu")
    staging = temporary_beside(out)
    try:
        export_onnx(model, staging, n_blocks=n_blocks, frontend=frontend)
        error = check_onnx(model, staging, n_blocks=n_blocks, frontend=frontend)
        os.replace(staging, out)
    finally:
        staging.unlink(missing_ok=True)
    click.echo(f"wrote   {out} ({out.stat().st_size:,} bytes): {'waveform' if frontend else 'mel, n_tokens'} -> frames"
               + (", cls" if model.config.encoder.cls_token else ""))
    if error is None:
        click.echo("not checked: install onnxruntime to compare the graph with PyTorch")
    else:
        click.echo(f"checked: onnxruntime's frame embeddings equal PyTorch's within {error:.1e} on 1 s, 3.7 s and 10 s")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--json", "as_json", is_flag=True, help="Print the registry as JSON.")
def models(as_json: bool) -> None:
    """List the named models that load_model() and atst-embed --model accept."""
    entries = list_models()
    if as_json:
        click.echo(json.dumps([entry.to_dict() for entry in entries], indent=2))
        return
    header = f"{'name':<23} {'kind':<6} {'size':<6} {'frame':>6} {'clip':>6}  {'comes from':<32} licence"
    click.echo(header)
    click.echo("-" * len(header))
    for entry in entries:
        if entry.packaged:
            where = "(ships in the package)"
        elif entry.download_url and not entry.published:
            host = urlsplit(entry.download_url).hostname or ""
            where = "authors' " + ("Google Drive" if host.endswith("google.com") else "Aliyun link" if "aliyun" in host else host)
        else:
            where = entry.repo_id
        click.echo(
            f"{entry.name:<23} {entry.kind:<6} {entry.size:<6} {entry.frame_embedding_size():>6} "
            f"{entry.clip_embedding_size():>6}  {where:<32} {entry.license}"
        )
    click.echo("\nframe / clip: embedding sizes with all blocks (12; atst-frame-mini: 6); n_blocks=1: divide by that.")
    click.echo("authors' ...: downloaded from the authors' host and converted once, on first use; then cached.")


PRECISION_OPTION = click.option(
    "--precision", type=click.Choice(list(PRECISIONS)), default="fp32", show_default=True,
    help="Encoder compute precision (outputs stay float32): bf16 is several times faster on CPUs with AMX or "
    "AVX512-BF16 and on GPUs, several times slower on CPUs without AVX512; *-mixed keep the residual sum in float32.")


# ---------------------------------------------------------------------------------------------- atst-embed
LEVEL_KEYS = {"clip": ["clip"], "frame": ["frame", "timestamps"], "both": ["clip", "frame", "timestamps"]}
STREAM_BYTES = 256 * 2**20  # frame outputs larger than this are streamed to disk, not held in memory
POOL_BATCHES = 8  # files decoded ahead and sorted by length together, in encoder batches


def _shard(shard: str | None, device: str | None) -> tuple[int, int, str | None]:
    """``(K, N, device)``: this process's part of the inputs, from ``--shard K/N`` or, under torchrun,
    from ``RANK`` / ``WORLD_SIZE`` (the device then defaults to ``cuda:LOCAL_RANK`` when CUDA is there)."""
    if shard is not None:
        part, _, parts = shard.partition("/")
        if not (part.isdigit() and parts.isdigit() and 1 <= int(part) <= int(parts)):
            raise click.UsageError(f"--shard takes K/N with 1 <= K <= N (e.g. 3/8), got {shard!r}")
        return int(part), int(parts), device
    world = os.environ.get("WORLD_SIZE", "1")
    rank = os.environ.get("RANK", "0")
    if not (world.isdigit() and rank.isdigit() and int(rank) < int(world)):
        raise click.UsageError(f"RANK={rank!r} and WORLD_SIZE={world!r} from the environment are not a valid rank")
    if int(world) > 1 and device is None and torch.cuda.is_available():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0')) % torch.cuda.device_count()}"
    return int(rank) + 1, int(world), device


def _output_base(item: AudioInput, output_dir: Path | None, output: Path | None) -> Path:
    if output is not None:
        return output.with_name(output.stem)
    if output_dir is not None:
        return output_dir / item.relative.parent / item.relative.stem
    return item.path.with_name(item.path.stem)


def _decode(path: Path) -> np.ndarray:
    return load_audio(path)[0]


def _decoded(items: list[AudioInput], workers: int):
    """Yield ``(item, waveform or exception)`` in order, decoding ahead in ``workers`` threads."""
    if workers == 0:
        for item in items:
            try:
                yield item, _decode(item.path)
            except Exception as error:  # noqa: BLE001 - reported per file, the batch goes on
                yield item, error
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="atst-decode") as pool:
        pending: list[tuple[AudioInput, Future]] = []
        upcoming = iter(items)
        try:
            while True:
                while len(pending) < 2 * workers and (item := next(upcoming, None)) is not None:
                    pending.append((item, pool.submit(_decode, item.path)))
                if not pending:
                    return
                item, future = pending.pop(0)
                error = future.exception()
                yield item, error if error is not None else future.result()
        finally:
            for _, future in pending:
                future.cancel()


class _Reporter(ABC):
    """Per-file reporting: a run's own (:class:`_Run`) or, in an ``atst-embed --jobs`` process, sent
    to the parent (:class:`_JobReporter`)."""

    @abstractmethod
    def succeeded(self, audio_seconds: float) -> None:
        """One file embedded and written."""

    @abstractmethod
    def file_failed(self, message: str) -> None:
        """One file failed in an expected way; ``message`` names it."""

    def error(self, item: AudioInput, error: BaseException) -> None:
        """Report an expected failure of one file in one ``error:`` line; re-raise anything else (a bug)."""
        if not expected_failure(error):
            raise error
        message = one_line_message(error)
        if str(item.path) not in message and repr(str(item.path)) not in message:
            message = f"{str(item.path)!r}: {message}"
        self.file_failed(message)

    def decoded(self, items: list[AudioInput], workers: int):
        """``(item, waveform)`` of the files that decode, in order; the others are reported."""
        for item, result in _decoded(items, workers):
            if isinstance(result, BaseException):
                self.error(item, result)
            else:
                yield item, result


class _Run(_Reporter):
    """Counts, progress and per-file reporting of one atst-embed run."""

    def __init__(self, total: int, quiet: bool, verb: str = "embedded", special: list[Path] = (),
                 shard: tuple[int, int] | None = None) -> None:
        self.verb = verb
        self.shard = shard
        self.special = list(special)  # FIFOs, sockets, devices found in folders and not read
        self.done = self.failed = 0
        self.seconds = 0.0
        self.started = time.perf_counter()
        self.quiet = quiet
        self.bar = tqdm(total=total, unit="file", disable=quiet, file=sys.stderr, dynamic_ncols=True)

    def succeeded(self, audio_seconds: float) -> None:
        self.done += 1
        self.seconds += audio_seconds
        hours = self.seconds / 3600
        rate = hours / max(time.perf_counter() - self.started, 1e-9)
        self.bar.set_postfix_str(f"{hours:.3f} h audio, {rate:.4f} h/s", refresh=False)
        self.bar.update()

    def file_failed(self, message: str) -> None:
        self.failed += 1
        tqdm.write(f"error: {message}", file=sys.stderr)
        self.bar.update()

    def summary(self, skipped: int) -> str:
        elapsed = time.perf_counter() - self.started
        return (
            (f"shard {self.shard[0]}/{self.shard[1]}: " if self.shard else "")
            + f"{self.done} {self.verb} ({self.seconds / 3600:.2f} h of audio in {elapsed:.1f} s), "
            + (f"{skipped} skipped (outputs exist), " if skipped is not None else "") + f"{self.failed} failed"
            + (f", {len(self.special)} skipped as not regular files (FIFOs, sockets or devices; first: "
               f"{str(self.special[0])!r})" if self.special else "")
        )


class _WritesBehind:
    """Writes a batch's outputs in one thread while the model computes the next batch, and reports
    each file to ``run`` once written. At most two batches' outputs are held: a batch is handed over
    after the previous one is on disk. A write's OSError fails its file; anything else (a bug) is
    re-raised in the caller's thread."""

    def __init__(self, write, run: _Reporter) -> None:
        self.write, self.run = write, run
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="atst-write")
        self.pending: list[tuple[AudioInput, float, Future]] = []

    def hand_over(self, outputs: list[tuple[AudioInput, dict, float]]) -> None:
        """``(item, arrays on the CPU, audio seconds)`` of one batch."""
        self.wait()
        self.pending = [(item, seconds, self.thread.submit(self.write, item, arrays, None))
                        for item, arrays, seconds in outputs]

    def wait(self) -> None:
        pending, self.pending = self.pending, []
        for item, seconds, future in pending:
            error = future.exception()
            if error is None:
                self.run.succeeded(seconds)
            elif isinstance(error, OSError):
                self.run.error(item, error)
            else:
                raise error

    def close(self) -> None:
        """Stop: writes not started are dropped (a rerun makes them), one under way finishes."""
        self.thread.shutdown(wait=True, cancel_futures=True)


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


@dataclass(frozen=True)
class _Outputs:
    """Where and how atst-embed writes each input's outputs (a ``--jobs`` process gets its part)."""

    bases: dict[AudioInput, Path]  # output path without suffix
    fmt: str
    metadata: dict

    def part(self, items: list[AudioInput]) -> _Outputs:
        return _Outputs({item: self.bases[item] for item in items}, self.fmt, self.metadata)

    def write(self, item: AudioInput, arrays: dict, frames: FrameStream | None) -> None:
        write_outputs(self.bases[item], self.fmt, arrays, self.metadata, frames)


def _embed_items(model, todo: list[AudioInput], run: _Reporter, outputs: _Outputs, level: str, n_blocks: int,
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
                    _embed_long(model, item, result, level, n_blocks, batch_size, write, outputs.bases[item])
                except Exception as error:
                    run.error(item, error)
                else:
                    run.succeeded(len(result) / SAMPLE_RATE)
                continue
            # A pool of several batches' worth of files goes to the model at once: it sorts their
            # windows by length into batches, so short files are padded little.
            pool.append((item, result))
            windows += 1 + len(result) // (SAMPLE_RATE * 10)
            pool_bytes += frame_bytes if level != "clip" else 0
            if windows >= POOL_BATCHES * batch_size or pool_bytes >= STREAM_BYTES:
                _embed_batch(model, pool, level, n_blocks, batch_size, writer)
                pool, windows, pool_bytes = [], 0, 0
        if pool:
            _embed_batch(model, pool, level, n_blocks, batch_size, writer)
        writer.wait()
    finally:
        writer.close()


class _JobReporter(_Reporter):
    """In an ``atst-embed --jobs`` process: sends each file's outcome to the parent, and stops (as if
    interrupted) once the parent is gone, so a killed run leaves no process behind for long."""

    def __init__(self, queue, parent: int) -> None:
        self.queue, self.parent = queue, parent

    def succeeded(self, audio_seconds: float) -> None:
        self.queue.put(("done", audio_seconds))

    def file_failed(self, message: str) -> None:
        self.queue.put(("failed", message))

    def decoded(self, items: list[AudioInput], workers: int):
        for pair in super().decoded(items, workers):
            if os.getppid() != self.parent:
                raise KeyboardInterrupt
            yield pair


def _job(index: int, todo: list[AudioInput], outputs: _Outputs, model_name: str, device: str | None, precision: str,
         threads: int, options: dict, queue, parent: int) -> None:
    """One ``--jobs`` process (started by :func:`_run_jobs`): loads the model, embeds its part of the
    files and ends with ``("end", index)``, after ``("fatal", message)`` for an expected failure that
    stops it or ``("bug", message)`` (its traceback printed here) for anything else."""
    from .loading import load_model

    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    torch.set_num_threads(threads)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SlowPrecisionWarning)  # the parent has said it once
            model = load_model(model_name, device=device, precision=precision)
        _embed_items(model, todo, _JobReporter(queue, parent), outputs, **options)
    except KeyboardInterrupt:
        return  # stopped by the parent, Ctrl-C or the parent's end: the parent reports it; "end" follows
    except Exception as error:  # noqa: BLE001 - sorted into expected failures and bugs, as one_line_errors does
        if expected_failure(error):
            queue.put(("fatal", one_line_message(error)))
        else:
            traceback.print_exc()
            queue.put(("bug", one_line_message(error)))
    finally:
        for stop in (signal.SIGINT, signal.SIGTERM):  # a second interruption must not cut the last word
            signal.signal(stop, signal.SIG_IGN)
        queue.put(("end", index))


def _stop(processes) -> None:
    """Ask running ``--jobs`` processes to stop as if interrupted (SIGTERM)."""
    for process in processes:
        if process.is_alive():
            os.kill(process.pid, signal.SIGTERM)


def _job_ended(index: int, jobs: int, code: int) -> str:
    """The error of a ``--jobs`` process that ended with exit code ``code`` before saying it was done."""
    if code < 0:
        oom = ", as the out-of-memory killer does" if -code == signal.SIGKILL else ""
        return (f"job {index + 1} of {jobs} was killed (signal {-code}{oom}); rerun the same command to finish, "
                "with fewer --jobs or a smaller --batch-size if memory ran out")
    return f"job {index + 1} of {jobs} ended with exit code {code} before finishing (see above); rerun the same command to finish"


def _run_jobs(jobs: int, todo: list[AudioInput], run: _Run, outputs: _Outputs, model_name: str, device: str | None,
              precision: str, options: dict) -> None:
    """Embed ``todo`` in ``jobs`` processes, each with its own model and every ``jobs``-th file, and
    report their files to ``run``. CPU threads are split between them; without --device on a CUDA
    machine, job k uses GPU k mod the number of GPUs."""
    import multiprocessing
    import queue as queues

    context = multiprocessing.get_context("spawn")  # a forked child would inherit torch's threads and CUDA state
    messages = context.Queue()
    threads = max(1, torch.get_num_threads() // jobs)
    processes = []
    for index in range(jobs):
        job_device = device
        if device is None and torch.cuda.is_available():
            job_device = f"cuda:{index % torch.cuda.device_count()}"
        part = todo[index::jobs]
        process = context.Process(target=_job, name=f"atst-embed-job-{index + 1}", daemon=True, args=(
            index, part, outputs.part(part), model_name, job_device, precision, threads, options, messages, os.getpid()))
        process.start()
        processes.append(process)
    running = set(range(jobs))
    problem = None
    try:
        while running:
            try:
                kind, value = messages.get(timeout=1.0)
            except queues.Empty:
                for index in [index for index in running if processes[index].exitcode is not None]:
                    code = processes[index].exitcode
                    if code != 0 and problem is None:  # it ended without a word: killed, or Python itself failed
                        problem = ("fatal", _job_ended(index, jobs, code))
                        _stop(processes)
                    running.discard(index)
                continue
            if kind == "done":
                run.succeeded(value)
            elif kind == "failed":
                run.file_failed(value)
            elif kind == "end":
                running.discard(value)
            elif problem is None:  # "fatal" or "bug": reported once the other jobs have stopped
                problem = (kind, value)
                _stop(processes)
    finally:
        _stop(processes)
        while any(process.is_alive() for process in processes):  # a job exits once its messages are read
            with suppress(queues.Empty):
                messages.get(timeout=0.1)
        for process in processes:
            process.join()
    if problem is not None:
        kind, message = problem
        run.bar.close()
        if kind == "fatal":
            raise click.ClickException(message)
        click.echo(BUG_REPORT, err=True)
        sys.exit(1)


def _raise_keyboard_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("inputs", nargs=-1)
@click.option("--manifest", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A file with one audio path per line, or a CSV/TSV with a 'path' column.")
@click.option("--level", type=click.Choice(["clip", "frame", "both"]), default="clip", show_default=True,
              help="Clip embeddings, frame embeddings (one per 40 ms, with timestamps) or both.")
@click.option("--model", "model_name", default=DEFAULT_MODEL, show_default=True,
              help="Registry name (atst-models), Hub id, model folder or checkpoint file.")
@click.option("--device", default=None, help="cpu, cuda, cuda:1, ... [default: CUDA when available]")
@PRECISION_OPTION
@click.option("--n-blocks", type=click.IntRange(min=1), default=None,
              help="Concatenate the outputs of the last N transformer blocks [default: all of the model's].")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True,
              help="10 s windows per encoder pass.")
@click.option("--num-workers", type=click.IntRange(min=0), default=2, show_default=True,
              help="Threads decoding audio ahead of the model (0: decode in the main thread).")
@click.option("-d", "--output-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Write outputs here, mirroring the input folders [default: beside each input].")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Output file for a single input (.npz or .pt).")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default=None, help="Output format [default: npz].")
@click.option("--overwrite", is_flag=True, help="Recompute outputs that exist (default: skip them, so a rerun resumes).")
@click.option("--shard", default=None, metavar="K/N",
              help="Embed only the K-th of N parts of the sorted inputs (array jobs: K = 1..N). Under torchrun, "
              "each process takes its part from RANK and WORLD_SIZE by itself.")
@click.option("--jobs", type=click.IntRange(min=1), default=1, show_default=True,
              help="Processes, each with its own model, sharing the files and the CPU threads (without --device, the "
              "GPUs round-robin). Several pay off when decoding and writing, not the model, set the pace: many short "
              "files with a small model.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no summary; errors are still printed.")
@one_line_errors
def embed(inputs, manifest, level, model_name, device, precision, n_blocks, batch_size, num_workers, output_dir, output,
          fmt, overwrite, shard, jobs, quiet) -> None:
    """Embed audio files with an ATST model.

    INPUTS are audio files, folders (searched recursively for audio files) or glob patterns
    (quote them: 'data/**/*.flac'). Outputs hold float32 arrays: clip [E], frame [T, D] and
    timestamps [T] (ms, token centres); see the README for the layout of each format.
    Exit status: 0 when every file was embedded (or skipped), 1 when some failed, 2 for usage errors.
    """
    if output is not None:
        if output_dir is not None:
            raise click.UsageError("use either -o/--output (one input) or -d/--output-dir, not both")
        suffix = output.suffix.lstrip(".")
        if suffix not in ("npz", "pt") or (fmt is not None and fmt != suffix):
            raise click.UsageError("-o/--output takes a .npz or .pt file (for npy use --output-dir)")
        fmt = suffix
    fmt = fmt or "npz"
    items, special = _find_items(inputs, manifest)
    if output is not None and len(items) != 1:
        raise click.UsageError(f"-o/--output takes exactly one input, got {len(items)}; use --output-dir")

    keys = LEVEL_KEYS[level]
    bases = {item: _output_base(item, output_dir, output) for item in items}
    owners: dict[Path, AudioInput] = {}
    for item, base in bases.items():
        for path in output_files(base, fmt, keys):
            if path in owners:
                raise click.UsageError(f"{str(owners[path].path)!r} and {str(item.path)!r} would both write {str(path)!r}")
            owners[path] = item
    part, parts, device = _shard(shard, device)
    items = sorted(items, key=lambda item: os.fsencode(item.path))[part - 1 :: parts]
    todo = [item for item in items if overwrite or not all(p.exists() for p in output_files(bases[item], fmt, keys))]
    skipped = len(items) - len(todo)
    if todo:  # before the progress bar, which a first download's own bar would interleave with
        from .loading import load_model

        model = load_model(model_name, device=device, precision=precision)
        n_blocks = n_blocks or model.depth
        if n_blocks > model.depth:
            raise click.UsageError(f"--n-blocks {n_blocks} exceeds the model's {model.depth} blocks")
    run = _Run(len(todo), quiet, special=special, shard=(part, parts) if parts > 1 else None)
    if not todo:
        run.bar.close()
        if not quiet:
            click.echo(run.summary(skipped), err=True)
        return
    outputs = _Outputs(bases, fmt, {"model": str(model_name), "n_blocks": n_blocks})
    options = dict(level=level, n_blocks=n_blocks, batch_size=batch_size, num_workers=num_workers)
    jobs = min(jobs, len(todo))
    previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        if jobs > 1:
            del model  # each job loads its own
            if torch.cuda.is_initialized():
                torch.cuda.empty_cache()  # give the jobs the parent's cached copy of the weights
            _run_jobs(jobs, todo, run, outputs, model_name, device, precision, options)
        else:
            _embed_items(model, todo, run, outputs, **options)
    except KeyboardInterrupt:
        run.bar.close()
        click.echo(f"interrupted: {run.summary(skipped)}; rerun the same command to finish", err=True)
        sys.exit(130)
    finally:
        signal.signal(signal.SIGTERM, previous)
    run.bar.close()
    if not quiet:
        click.echo(run.summary(skipped), err=True)
    if run.failed:
        sys.exit(1)


# ---------------------------------------------------------------------------------------------- atst-tag
def _head_command_options(command):
    """The options atst-tag and atst-detect share (after their own)."""
    options = [
        click.option("--overwrite", is_flag=True, help="Replace the -o file if it exists."),
        click.option("--device", default=None, help="cpu, cuda, cuda:1, ... [default: CUDA when available]"),
        PRECISION_OPTION,
        click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True,
                     help="10 s windows per encoder pass."),
        click.option("--num-workers", type=click.IntRange(min=0), default=2, show_default=True,
                     help="Threads decoding audio ahead of the model (0: decode in the main thread)."),
        click.option("-q", "--quiet", is_flag=True, help="No progress bar and no summary; errors are still printed."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


TAG_WINDOW = 160_000  # --per-window: 10 s at 16 kHz


def _windows(waveform: np.ndarray, per_window: bool) -> list[tuple[float, float, np.ndarray]]:
    """``(start s, end s, samples)``: the whole clip, or its 10 s windows (the last one shorter)."""
    if not per_window:
        return [(0.0, len(waveform) / SAMPLE_RATE, waveform)]
    starts = range(0, max(len(waveform), 1), TAG_WINDOW)
    return [(s / SAMPLE_RATE, min(s + TAG_WINDOW, len(waveform)) / SAMPLE_RATE, waveform[s : s + TAG_WINDOW]) for s in starts]


def _tag_rows(model, batch, top_k: int, per_window: bool, batch_size: int) -> list[dict]:
    pieces = [(item, start, end, piece) for item, waveform in batch for start, end, piece in _windows(waveform, per_window)]
    probabilities = model.get_tag_probabilities([torch.from_numpy(np.ascontiguousarray(p)) for *_, p in pieces],
                                                batch_size=batch_size).cpu()
    top = probabilities.topk(min(top_k, probabilities.shape[1]), dim=1)
    rows = []
    for (item, start, end, _), values, indices in zip(pieces, top.values.tolist(), top.indices.tolist()):
        for rank, (value, index) in enumerate(zip(values, indices), start=1):
            rows.append({"file": str(item.path), "start": round(start, 3), "end": round(end, 3), "rank": rank,
                         "label": model.labels[index], "probability": round(value, 6)})
    return rows


def _print_table(rows: list[dict], per_window: bool) -> None:
    heading = None
    for row in rows:
        current = (row["file"], row["start"]) if per_window else row["file"]
        if current != heading:
            heading = current
            click.echo(f"{row['file']}" + (f"  [{row['start']:.1f} s - {row['end']:.1f} s]" if per_window else ""))
        click.echo(f"  {row['probability']:6.3f}  {row['label']}")


def _write_rows(rows: list[dict], fmt: str, stream) -> None:
    if fmt == "json":
        stream.write(json.dumps(rows, indent=2, ensure_ascii=False) + "\n")
        return
    import csv

    writer = csv.DictWriter(stream, fieldnames=["file", "start", "end", "rank", "label", "probability"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("inputs", nargs=-1)
@click.option("--manifest", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A file with one audio path per line, or a CSV/TSV with a 'path' column.")
@click.option("--model", "model_name", required=True,
              help="A model with a tagging head: a folder from atst-convert of a fine-tuned checkpoint, a C2F checkpoint, ...")
@click.option("-k", "--top-k", type=click.IntRange(min=1), default=5, show_default=True, help="Labels per clip (or window).")
@click.option("--per-window", is_flag=True, help="Tag each 10 s window instead of the whole clip.")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default=None,
              help="Output format [default: table on the terminal; from the suffix of -o].")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="Write the results to this .csv or .json file.")
@_head_command_options
@one_line_errors
def tag(inputs, manifest, model_name, top_k, per_window, fmt, output, overwrite, device, precision, batch_size, num_workers, quiet) -> None:
    """Tag audio files: the top labels of a model's tagging head, with probabilities.

    INPUTS are audio files, folders or glob patterns, as for atst-embed. Any length: the clip's
    logits are the token-weighted mean of its 10 s windows' (ATST-Frame / C2F), or --per-window
    lists each window. Probabilities: sigmoid for multi-label heads, softmax for single-label ones.
    Exit status: 0 when every file was tagged, 1 when some failed, 2 for usage errors.
    """
    fmt = _result_format(output, fmt, overwrite, ("csv", "json"))
    items, special = _find_items(inputs, manifest)
    model = _model_with_head(model_name, device, precision, "clip")
    run = _Run(len(items), quiet or (fmt != "table" and output is None), verb="tagged", special=special)
    rows: list[dict] = []
    batch, windows = [], 0

    def flush() -> None:
        try:
            new = _tag_rows(model, batch, top_k, per_window, batch_size)
        except Exception as error:
            for item, _ in batch:
                run.error(item, error)
            return
        for _, waveform in batch:
            run.succeeded(len(waveform) / SAMPLE_RATE)
        if fmt == "table" and output is None:
            with tqdm.external_write_mode(file=sys.stderr):
                _print_table(new, per_window)
        rows.extend(new)

    for item, result in run.decoded(items, num_workers):
        batch.append((item, result))
        windows += 1 + len(result) // TAG_WINDOW
        if windows >= batch_size:
            flush()
            batch, windows = [], 0
    if batch:
        flush()
    run.bar.close()
    if output is not None:
        with open(output, "w", encoding="utf-8", newline="") as stream:
            _write_rows(rows, fmt, stream)
    elif fmt != "table":
        _write_rows(rows, fmt, sys.stdout)
    if not quiet:
        click.echo(run.summary(None) + (f"; wrote {output}" if output else ""), err=True)
    if run.failed:
        sys.exit(1)


# ---------------------------------------------------------------------------------------------- atst-detect
def _per_label_option(text: str, cast, name: str):
    """``"0.5"`` -> 0.5; ``"dog=0.3,*=0.5"`` -> ``{"dog": 0.3, "*": 0.5}``."""
    if "=" not in text:
        try:
            return cast(text)
        except ValueError:
            raise click.BadParameter(f"{text!r} is not a number", param_hint=name) from None
    values = {}
    for part in text.split(","):
        label, _, value = part.partition("=")
        try:
            values[label.strip()] = cast(value)
        except ValueError:
            raise click.BadParameter(f"{part!r}: expected LABEL=NUMBER", param_hint=name) from None
    return values


def _plot_events(model, waveform: np.ndarray, probabilities: torch.Tensor, events, path: Path, title: str) -> None:
    """Spectrogram, per-class probabilities and detected events of one file, as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("--plot needs matplotlib: pip install matplotlib") from None
    mel, _ = model.frontend(torch.from_numpy(waveform)[None].to(model.device))
    seconds = len(waveform) / SAMPLE_RATE
    labels = list(model.labels)
    figure, axes = plt.subplots(3, 1, figsize=(10, 6.5), sharex=True, gridspec_kw={"height_ratios": [2, 2, 1.2]})
    axes[0].imshow(mel[0].cpu().numpy(), origin="lower", aspect="auto", extent=(0, seconds, 0, mel.shape[1]), cmap="magma")
    axes[0].set(ylabel="mel bin", title=title)
    times = (np.arange(len(probabilities)) + 0.5) * model.frame_hop_ms / 1000
    for c, label in enumerate(labels):
        axes[1].plot(times, probabilities[:, c].cpu().numpy(), label=label, linewidth=1.2)
    axes[1].set(ylabel="probability", ylim=(0, 1))
    axes[1].legend(loc="upper right", fontsize=7, ncol=min(len(labels), 4))
    colours = {label: f"C{i % 10}" for i, label in enumerate(labels)}
    for event in events:
        row = labels.index(event.label)
        axes[2].barh(row, event.offset - event.onset, left=event.onset, color=colours[event.label], height=0.7)
    axes[2].set(yticks=range(len(labels)), yticklabels=labels, xlabel="time (s)", xlim=(0, seconds), ylim=(-0.6, len(labels) - 0.4))
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("inputs", nargs=-1)
@click.option("--manifest", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A file with one audio path per line, or a CSV/TSV with a 'path' column.")
@click.option("--model", "model_name", required=True, help="A model with an event head (atst-train sed, then atst-convert).")
@click.option("--threshold", default="0.5", show_default=True, help="Probability threshold: one value, or LABEL=VALUE,...,*=DEFAULT.")
@click.option("--median", default="7", show_default=True, help="Median filter length in 40 ms frames: one value, or LABEL=N,...")
@click.option("--min-gap", type=click.FloatRange(min=0), default=0.0, show_default=True, help="Merge events of a class closer than this (s).")
@click.option("--min-length", type=click.FloatRange(min=0), default=0.0, show_default=True, help="Drop events shorter than this (s).")
@click.option("--hop", type=click.FloatRange(min=0.04, max=10.0), default=5.0, show_default=True,
              help="Seconds between the starts of overlapping 10 s windows for long audio.")
@click.option("--format", "fmt", type=click.Choice(["table", "tsv", "json"]), default=None,
              help="Output format [default: table on the terminal; from the suffix of -o].")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="Write the events to this .tsv or .json file.")
@click.option("--plot", "plot_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Also save a PNG per file here: spectrogram, probabilities and events.")
@_head_command_options
@one_line_errors
def detect(inputs, manifest, model_name, threshold, median, min_gap, min_length, hop, fmt, output, plot_dir, overwrite,
           device, precision, batch_size, num_workers, quiet) -> None:
    """Detect sound events in audio files with a model that has an event head.

    Prints, or writes as a DESED-style TSV (filename, onset, offset, event_label, score), the events
    whose median-filtered frame probability reaches the threshold. Audio of any length: 10 s
    windows every --hop seconds, overlapping probabilities averaged.
    Exit status: 0 when every file was processed, 1 when some failed, 2 for usage errors.
    """
    from .events import decode_events, write_events

    threshold = _per_label_option(threshold, float, "--threshold")
    median = _per_label_option(median, int, "--median")
    fmt = _result_format(output, fmt, overwrite, ("tsv", "json"))
    items, special = _find_items(inputs, manifest)
    model = _model_with_head(model_name, device, precision, "frame")
    decode = functools.partial(decode_events, labels=model.labels, hop=model.frame_hop_ms / 1000,
                               threshold=threshold, median=median, min_gap=min_gap, min_length=min_length)
    try:
        decode(np.zeros((1, len(model.labels))))  # checks per-label values against the model's labels
    except ValueError as error:
        raise click.ClickException(str(error)) from None
    if plot_dir is not None:
        plot_dir.mkdir(parents=True, exist_ok=True)
    run = _Run(len(items), quiet or (fmt != "table" and output is None), verb="processed", special=special)
    events = []
    for item, result in run.decoded(items, num_workers):
        try:
            strong, _, _ = model.get_event_probabilities(result, hop_seconds=hop, batch_size=batch_size)
            found = decode(strong[0].cpu().numpy(), filename=str(item.relative))
            if plot_dir is not None:
                _plot_events(model, result, strong[0], found, plot_dir / f"{item.relative.stem}.png", str(item.relative))
        except Exception as error:
            run.error(item, error)
            continue
        run.succeeded(len(result) / SAMPLE_RATE)
        if fmt == "table" and output is None:
            with tqdm.external_write_mode(file=sys.stderr):
                click.echo(f"{item.relative}: {len(found)} event{'s' if len(found) != 1 else ''}")
                for e in found:
                    click.echo(f"  {e.onset:8.2f} {e.offset:8.2f}  {e.label:<20} {e.score:.2f}")
        events.extend(found)
    run.bar.close()
    if fmt == "json":
        text = json.dumps([e.__dict__ for e in events], indent=2, ensure_ascii=False) + "\n"
        output.write_text(text, encoding="utf-8") if output is not None else sys.stdout.write(text)
    elif fmt == "tsv":
        write_events(events, output if output is not None else sys.stdout)
    if not quiet:
        click.echo(run.summary(None) + (f"; wrote {output}" if output else ""), err=True)
    if run.failed:
        sys.exit(1)


# ---------------------------------------------------------------------------------------------- atst-score
@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("reference", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("detected", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--collar", type=click.FloatRange(min=0), default=0.2, show_default=True, help="Onset collar (s) of the event-based F1.")
@click.option("--offset-share", type=click.FloatRange(min=0), default=0.2, show_default=True,
              help="Offset collar: max(collar, this share of the reference event's length).")
@click.option("--segment", type=click.FloatRange(min=0.01), default=1.0, show_default=True, help="Segment length (s) of the segment-based F1.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Also write the scores here.")
@one_line_errors
def score(reference: Path, detected: Path, collar: float, offset_share: float, segment: float, json_path) -> None:
    """Score DETECTED events against REFERENCE events (DESED-style TSV files: filename, onset,
    offset, event_label): event-based and segment-based F1, micro and macro, per class, with the
    definitions of sed_eval (which it equals)."""
    from .events import read_events
    from .scoring import event_based, segment_based

    try:
        truth, found = read_events(reference), read_events(detected)
    except InputError as error:
        raise click.ClickException(str(error)) from None
    if not truth:
        raise click.ClickException(f"{str(reference)!r} holds no events")
    results = {"event_based": event_based(truth, found, collar=collar, offset_share=offset_share),
               "segment_based": segment_based(truth, found, segment=segment)}
    click.echo(f"{len(truth)} reference events in {len({e.filename for e in truth})} files, {len(found)} detected")
    click.echo(f"event-based (onset collar {collar:g} s, offset max({collar:g} s, {offset_share:.0%})): "
               f"F1 micro {results['event_based'].micro_f1:.3f}, macro {results['event_based'].macro_f1:.3f}")
    click.echo(f"segment-based ({segment:g} s segments): "
               f"F1 micro {results['segment_based'].micro_f1:.3f}, macro {results['segment_based'].macro_f1:.3f}")
    click.echo(f"\n{'class':<20} {'event F1':>8} {'P':>6} {'R':>6} {'segment F1':>10}")
    for label, counts in results["event_based"].per_class.items():
        seg = results["segment_based"].per_class[label]
        click.echo(f"{label:<20} {counts.f1:>8.3f} {counts.precision:>6.3f} {counts.recall:>6.3f} {seg.f1:>10.3f}")
    if json_path is not None:
        payload = {name: scores.to_dict() for name, scores in results.items()}
        payload["settings"] = {"collar": collar, "offset_share": offset_share, "segment": segment}
        json_path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
