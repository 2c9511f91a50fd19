"""``atst-detect``: sound events of a model's event head in each file, as a table, a DESED-style TSV or
JSON, with a plot per file if asked (spectrogram, probabilities, events; reference events beside them)."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click
from tqdm import tqdm

from ..audio import SAMPLE_RATE
from ..detection import frame_seconds
from .common import CONTEXT, MANIFEST_OPTION, find_items, head_command_options, model_with_head, one_line_errors, result_format
from .runs import Run

__all__ = ["detect"]


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


@click.command(context_settings=CONTEXT)
@click.argument("inputs", nargs=-1)
@MANIFEST_OPTION
@click.option("--model", "model_name", required=True, help="A model with an event head (atst-train sed, then atst-convert).")
@click.option("--threshold", default=None, help="Probability threshold: one value, or LABEL=VALUE,...,*=DEFAULT "
              "[default: the model's own, else 0.5].")
@click.option("--median", default=None, help="Median filter length in the model's frames (40 ms; ATST-SED: 64 ms): "
              "one value, or LABEL=N,... [default: the model's own, else 7].")
@click.option("--combine", type=click.Choice(["average", "union"]), default=None,
              help="Overlapping windows: events from their averaged probabilities, or the union of each window's "
              "events (ATST-SED's inference) [default: the model's own, else average].")
@click.option("--min-gap", type=click.FloatRange(min=0), default=0.0, show_default=True, help="Merge events of a class closer than this (s).")
@click.option("--min-length", type=click.FloatRange(min=0), default=0.0, show_default=True, help="Drop events shorter than this (s).")
@click.option("--hop", type=click.FloatRange(min=0.04, max=10.0), default=None,
              help="Seconds between the starts of overlapping 10 s windows for long audio [default: the model's own, else 5].")
@click.option("--format", "fmt", type=click.Choice(["table", "tsv", "json"]), default=None,
              help="Output format [default: table on the terminal; from the suffix of -o].")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="Write the events to this .tsv or .json file.")
@click.option("--plot", "plot_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Also save a PNG per file here: spectrogram, probabilities (of the classes with events, then the "
              "most probable, 10 in all for a model of more classes) and events.")
@click.option("--reference", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="With --plot: reference events (a DESED-style TSV: filename, onset, offset, event_label, as atst-score "
              "reads) drawn hatched under the detected ones, for the files it lists.")
@click.option("--scores", "scores_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Also write each file's frame scores (the median-filtered probabilities) here, one TSV per file as "
              "sed_scores_eval reads them: atst-score --scores computes PSDS from them.")
@head_command_options
@one_line_errors
def detect(inputs, manifest, model_name, threshold, median, combine, min_gap, min_length, hop, fmt, output, plot_dir,
           reference, scores_dir, overwrite, device, precision, batch_size, num_workers, quiet) -> None:
    """Detect sound events in audio files with a model that has an event head.

    Prints, or writes as a DESED-style TSV (filename, onset, offset, event_label, score), the events
    whose median-filtered frame probability reaches the threshold. Audio of any length: 10 s
    windows every --hop seconds, overlapping probabilities averaged.
    Exit status: 0 when every file was processed, 1 when some failed, 2 for usage errors.
    """
    from ..detection import detect_events, settings
    from ..events import per_class, read_strong_labels, write_events
    from ..plots import check_reference, plot_events
    from ..scoring import write_score_table

    threshold = _per_label_option(threshold, float, "--threshold") if threshold is not None else None
    median = _per_label_option(median, int, "--median") if median is not None else None
    fmt = result_format(output, fmt, overwrite, ("tsv", "json"))
    if reference is not None and plot_dir is None:
        raise click.UsageError("--reference draws reference events in the --plot images: give --plot DIR too")
    items, special = find_items(inputs, manifest)
    truth = read_strong_labels(reference) if reference is not None else {}
    if reference is not None and not any(str(item.relative) in truth for item in items):
        raise click.UsageError(f"{str(reference)!r} lists none of the input files (named as in the events TSV, e.g. "
                               f"{str(items[0].relative)!r})")
    model = model_with_head(model_name, device, precision, "frame")
    defaults = settings(model)
    for value, name in ((threshold, "threshold"), (median, "median")):  # the labels named, against the model's
        per_class(defaults[name] if value is None else value, model.labels, name)
    check_reference([event for found in truth.values() for event in found], model.labels)
    seconds = frame_seconds(model)
    detect_file = functools.partial(detect_events, model, hop_seconds=hop, threshold=threshold, median=median,
                                    combine=combine, min_gap=min_gap, min_length=min_length, batch_size=batch_size)
    if plot_dir is not None:
        plot_dir.mkdir(parents=True, exist_ok=True)
    tables = {item: scores_dir / item.relative.with_suffix(".tsv") for item in items} if scores_dir is not None else {}
    existing = [path for path in tables.values() if path.exists()]
    if existing and not overwrite:
        raise click.UsageError(f"{str(existing[0])!r} exists ({len(existing)} score tables would be replaced); pass --overwrite")
    run = Run(len(items), quiet or (fmt != "table" and output is None), verb="processed", special=special)
    events = []
    for item, result in run.decoded(items, num_workers):
        try:
            (found,), (filtered,) = detect_file(result, [str(item.relative)])
            if item in tables:
                write_score_table(tables[item], filtered, model.labels, seconds, len(result) / SAMPLE_RATE)
            if plot_dir is not None:
                plot_events(model, result, plot_dir / f"{item.relative.stem}.png", sample_rate=SAMPLE_RATE,
                            title=str(item.relative), events=found, probabilities=filtered,
                            reference=truth.get(str(item.relative)))
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
