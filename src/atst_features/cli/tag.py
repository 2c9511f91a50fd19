"""``atst-tag``: the top labels of a model's tagging head for each file (or each encoder window, 10 s
for the official models), as a table, CSV or JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import numpy as np
import torch
from tqdm import tqdm

from ..audio import SAMPLE_RATE
from ..errors import NonFiniteError
from ..tagging import SPANS
from .common import CONTEXT, MANIFEST_OPTION, find_items, head_command_options, model_with_head, one_line_errors, result_format
from .runs import Run

__all__ = ["tag"]


def _windows(waveform: np.ndarray, window: int | None) -> list[tuple[float, float, np.ndarray]]:
    """``(start s, end s, samples)``: the whole clip (``window`` None), or its windows of ``window``
    samples (the last one shorter)."""
    if window is None:
        return [(0.0, len(waveform) / SAMPLE_RATE, waveform)]
    starts = range(0, max(len(waveform), 1), window)
    return [(s / SAMPLE_RATE, min(s + window, len(waveform)) / SAMPLE_RATE, waveform[s : s + window]) for s in starts]


def _pieces(model, batch, per_window: bool) -> list[tuple[int, object, float, float, np.ndarray]]:
    """``(file's index in batch, item, start s, end s, samples)`` of what is tagged: whole files, or
    each encoder window (10 s for the official models)."""
    window = model.window_samples if per_window else None
    return [(index, item, start, end, piece) for index, (item, waveform) in enumerate(batch)
            for start, end, piece in _windows(waveform, window)]


def _tag_rows(model, pieces, top_k: int, batch_size: int, span: str) -> list[dict]:
    probabilities = model.get_tag_probabilities([torch.from_numpy(np.ascontiguousarray(p)) for *_, p in pieces],
                                                batch_size=batch_size, span=span).cpu()
    top = probabilities.topk(min(top_k, probabilities.shape[1]), dim=1)
    rows = []
    for (_, item, start, end, _), values, indices in zip(pieces, top.values.tolist(), top.indices.tolist()):
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


@click.command(context_settings=CONTEXT)
@click.argument("inputs", nargs=-1)
@MANIFEST_OPTION
@click.option("--model", "model_name", required=True,
              help="A model with a tagging head: a folder from atst-convert of a fine-tuned checkpoint, a C2F checkpoint, ...")
@click.option("-k", "--top-k", type=click.IntRange(min=1), default=5, show_default=True, help="Labels per clip (or window).")
@click.option("--per-window", is_flag=True, help="Tag each 10 s window instead of the whole clip.")
@click.option("--span", type=click.Choice(SPANS), default="all", show_default=True,
              help="What of each clip is pooled: all of it, or what the ATST authors' fine-tuning code scores "
                   "(the central 12 s; to reproduce their outputs on long audio).")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default=None,
              help="Output format [default: table on the terminal; from the suffix of -o].")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="Write the results to this .csv or .json file.")
@head_command_options
@one_line_errors
def tag(inputs, manifest, model_name, top_k, per_window, span, fmt, output, overwrite, device, precision, batch_size, num_workers,
        quiet) -> None:
    """Tag audio files: the top labels of a model's tagging head, with probabilities.

    INPUTS are audio files, folders or glob patterns, as for atst-embed. Any length: the clip's
    logits are the token-weighted mean of its 10 s windows' (ATST-Frame / C2F), or --per-window
    lists each window, or --span reference scores what the authors' code scores. Probabilities: sigmoid for multi-label heads, softmax for single-label ones.
    Exit status: 0 when every file was tagged, 1 when some failed, 2 for usage errors.
    """
    fmt = result_format(output, fmt, overwrite, ("csv", "json"))
    items, special = find_items(inputs, manifest)
    model = model_with_head(model_name, device, precision, "clip")
    run = Run(len(items), quiet or (fmt != "table" and output is None), verb="tagged", special=special)
    rows: list[dict] = []
    batch, windows = [], 0

    def flush(chunk) -> None:
        pieces = _pieces(model, chunk, per_window)
        try:
            new = _tag_rows(model, pieces, top_k, batch_size, span)
        except NonFiniteError as error:  # only the files whose clips gave NaN or Inf fail; the others run again
            rest = run.failed_non_finite(chunk, {pieces[index][0] for index in error.items}, error)
            if rest:
                flush(rest)
            return
        except Exception as error:
            for item, _ in chunk:
                run.error(item, error)
            return
        for _, waveform in chunk:
            run.succeeded(len(waveform) / SAMPLE_RATE)
        if fmt == "table" and output is None:
            with tqdm.external_write_mode(file=sys.stderr):
                _print_table(new, per_window)
        rows.extend(new)

    for item, result in run.decoded(items, num_workers):
        batch.append((item, result))
        windows += model.num_windows(len(result))
        if windows >= batch_size:
            flush(batch)
            batch, windows = [], 0
    if batch:
        flush(batch)
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
