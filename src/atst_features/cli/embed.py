"""``atst-embed``: clip and frame embeddings of audio files, written beside them or into a folder;
one process (:mod:`.pipeline`) or ``--jobs`` processes (:mod:`.jobs`), a part of the inputs with
``--shard K/N`` or under torchrun, resumable (outputs that exist are skipped)."""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import replace
from pathlib import Path

import click
import torch

from ..inputs import AudioInput
from ..outputs import FORMATS
from ..registry import DEFAULT_MODEL
from .destinations import FileOutputs, ShardOutputs
from .common import (
    BATCH_SIZE_OPTION,
    CONTEXT,
    DEVICE_OPTION,
    MANIFEST_OPTION,
    NUM_WORKERS_OPTION,
    PRECISION_OPTION,
    QUIET_OPTION,
    find_items,
    one_line_errors,
)
from .jobs import run_jobs
from .pipeline import embed_items
from .runs import Run, raise_keyboard_interrupt

__all__ = ["embed"]

LEVEL_KEYS = {"clip": ["clip"], "frame": ["frame", "timestamps"], "both": ["clip", "frame", "timestamps"]}
PACKAGE = Path(__file__).resolve().parent.parent  # the installed atst_features, example audio included


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


def _check_beside_inputs(items: list[AudioInput]) -> None:
    """Outputs beside the inputs (no -o or -d): a usage error naming -o and -d when an input's folder is inside
    the installed package (its example audio) or cannot be written."""
    for folder in sorted({Path(os.path.dirname(item.path_str)) for item in items}):
        real = folder.resolve()
        if real == PACKAGE or PACKAGE in real.parents:
            reason = "is inside the installed atst-features package"
        elif not os.access(folder, os.W_OK):
            reason = "cannot be written"
        else:
            continue
        raise click.UsageError(f"outputs go beside the inputs by default, but {str(folder)!r} {reason}: write them "
                               "elsewhere with -o FILE.npz (one input) or -d DIR")


@click.command(context_settings=CONTEXT)
@click.argument("inputs", nargs=-1)
@MANIFEST_OPTION
@click.option("--level", type=click.Choice(["clip", "frame", "both"]), default="clip", show_default=True,
              help="Clip embeddings, frame embeddings (one per 40 ms, with timestamps) or both.")
@click.option("--model", "model_name", default=DEFAULT_MODEL, show_default=True,
              help="Registry name (atst-models), Hub id, model folder or checkpoint file.")
@DEVICE_OPTION
@PRECISION_OPTION
@click.option("--n-blocks", type=click.IntRange(min=1), default=None,
              help="Concatenate the outputs of the last N transformer blocks [default: all of the model's].")
@BATCH_SIZE_OPTION
@NUM_WORKERS_OPTION
@click.option("-d", "--output-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Write outputs here, mirroring the input folders [default: beside each input].")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Output file for a single input (.npz or .pt).")
@click.option("--format", "fmt", type=click.Choice([*FORMATS, "tar"]), default=None,
              help="Output format [default: npz]; tar: WebDataset tar shards in -d DIR, with an index each.")
@click.option("--files-per-tar", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Inputs per tar shard (--format tar).")
@click.option("--overwrite", is_flag=True, help="Recompute outputs that exist (default: skip them, so a rerun resumes).")
@click.option("--shard", default=None, metavar="K/N",
              help="Embed only the K-th of N parts of the sorted inputs (array jobs: K = 1..N). Under torchrun, "
              "each process takes its part from RANK and WORLD_SIZE by itself.")
@click.option("--jobs", type=click.IntRange(min=1), default=1, show_default=True,
              help="Processes, each with its own model, sharing the files and the CPU threads (without --device, the "
              "GPUs round-robin). Several pay off when decoding and writing, not the model, set the pace: many short "
              "files with a small model.")
@QUIET_OPTION
@one_line_errors
def embed(inputs, manifest, level, model_name, device, precision, n_blocks, batch_size, num_workers, output_dir, output,
          fmt, files_per_tar, overwrite, shard, jobs, quiet) -> None:
    """Embed audio files with an ATST model.

    INPUTS are audio files, folders (searched recursively for audio files) or glob patterns
    (quote them: 'data/**/*.flac'). Outputs hold float32 arrays: clip [E], frame [T, D] and
    timestamps [T] (ms, token centres); see docs/command-line.md, "Output files", for the layout of each format.
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
    items, special = find_items(inputs, manifest)
    if output is not None and len(items) != 1:
        raise click.UsageError(f"-o/--output takes exactly one input, got {len(items)}; use --output-dir")

    part, parts, device = _shard(shard, device)
    metadata = {"model": str(model_name)}
    if fmt == "tar":
        if output_dir is None or overwrite:
            raise click.UsageError("--format tar writes shards into a folder (-d DIR) and never overwrites them: "
                                   + ("give -d DIR" if output_dir is None else "use a new folder instead of --overwrite"))
        outputs = ShardOutputs(output_dir, metadata, files_per_tar, "shard" if parts == 1 else f"shard-{part}of{parts}")
    else:
        outputs = FileOutputs(fmt, metadata, tuple(LEVEL_KEYS[level]), output_dir, output)
    outputs.check_distinct(items)
    items.sort(key=lambda item: os.fsencode(item.path_str))
    items = items[part - 1 :: parts]
    todo = items if overwrite else outputs.todo(items)
    skipped = len(items) - len(todo)
    if output is None and output_dir is None:
        _check_beside_inputs(todo)
    if todo:  # before the progress bar, which a first download's own bar would interleave with
        from ..loading import load_model

        model = load_model(model_name, device=device, precision=precision)
        n_blocks = n_blocks or model.depth
        if n_blocks > model.depth:
            raise click.UsageError(f"--n-blocks {n_blocks} exceeds the model's {model.depth} blocks")
    run = Run(len(todo), quiet, special=special, shard=(part, parts) if parts > 1 else None)
    if not todo:
        run.bar.close()
        if not quiet:
            click.echo(run.summary(skipped), err=True)
        return
    outputs = replace(outputs, metadata={**outputs.metadata, "n_blocks": n_blocks})
    options = dict(level=level, n_blocks=n_blocks, batch_size=batch_size, num_workers=num_workers)
    jobs = min(jobs, len(todo))
    previous = signal.signal(signal.SIGTERM, raise_keyboard_interrupt)
    try:
        if jobs > 1:
            del model  # each job loads its own
            if torch.cuda.is_initialized():
                torch.cuda.empty_cache()  # give the jobs the parent's cached copy of the weights
            run_jobs(jobs, todo, run, outputs, model_name, device, precision, options)
        else:
            embed_items(model, todo, run, outputs, **options)
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
