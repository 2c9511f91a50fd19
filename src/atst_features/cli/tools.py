"""The model tools: ``atst-convert`` (checkpoint to a verified model folder, optionally pushed to the
Hub), ``atst-export`` (ONNX), ``atst-models`` (the registry) and ``atst-score`` (event-based and
segment-based F1 of detected events)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from urllib.parse import urlsplit

import click

from ..hub import push_to_hub
from ..outputs import temporary_beside
from ..registry import DEFAULT_MODEL, list_models
from .common import CONTEXT, one_line_errors

__all__ = ["convert", "export", "models", "score"]


@click.command(context_settings=CONTEXT)
@click.argument("source", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path), required=False)
@click.option("--as", "registry_name", metavar="NAME",
              help="SOURCE is registry model NAME's official file (downloaded by hand): convert it with NAME's settings; "
                   "without OUT_DIR, install it where load_model(NAME) and --model NAME look.")
@click.option("--push-to-hub", "repo_id", metavar="REPO_ID", help="Upload the folder to this Hub repository (org/name).")
@click.option("--private", is_flag=True, help="Create the Hub repository as private.")
@click.option("--license", "license_", default=None, help="Licence written in the model card [default: cc-by-4.0, or NAME's].")
@click.option("--overwrite", is_flag=True, help="Replace OUT_DIR if it exists.")
@one_line_errors
def convert(source: Path, out_dir: Path | None, registry_name: str | None, repo_id: str | None, private: bool,
            license_: str | None, overwrite: bool) -> None:
    """Convert an ATST checkpoint SOURCE into an atst-features folder OUT_DIR.

    SOURCE: an official ATST-Frame / ATST-Clip Lightning checkpoint, the C2F distillation
    checkpoint, a fine-tuned, ATST-SED or bare encoder state dict. OUT_DIR gets config.json,
    model.safetensors (inference weights only) and a model card. The converted model's
    embeddings are checked to equal the source's before success is reported.

    With --as NAME and no OUT_DIR, SOURCE becomes registry model NAME, as if downloaded: e.g. when
    Google Drive refuses, `atst-convert Stage2_wo_ext.ckpt --as atst-sed-desed`, then `--model atst-sed-desed`.
    """
    from ..convert import convert_checkpoint
    from ..loading import install_checkpoint
    from ..official import holds_model_of
    from ..registry import official_entry

    entry = official_entry(registry_name) if registry_name is not None else None
    if entry is None and out_dir is None:
        raise click.UsageError("give OUT_DIR, or --as NAME to install SOURCE as registry model NAME")
    click.echo(f"source  {source} ({source.stat().st_size:,} bytes)")
    if out_dir is None:
        if repo_id:
            raise click.UsageError("--push-to-hub needs OUT_DIR")
        folder = install_checkpoint(registry_name, source)
        click.echo(f"installed {registry_name}: {folder}; load it with load_model({registry_name!r}) or --model {registry_name}")
        return
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise click.UsageError(f"{str(out_dir)!r} exists and is not empty; pass --overwrite to replace it")
    done = convert_checkpoint(source, out_dir, license=license_ or (entry.license if entry else "cc-by-4.0"),
                              overwrite=overwrite, config_overrides=entry.config_overrides() if entry else None,
                              check=holds_model_of(entry, str(source), "is it the right file?") if entry else None)
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


@click.command(context_settings=CONTEXT)
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
    from ..export import check_onnx, export_onnx
    from ..loading import load_model

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


@click.command(context_settings=CONTEXT)
@click.option("--json", "as_json", is_flag=True, help="Print the registry as JSON.")
def models(as_json: bool) -> None:
    """List the named models that load_model() and atst-embed --model accept; the default is marked."""
    entries = list_models()
    if as_json:
        click.echo(json.dumps([{**entry.to_dict(), "default": entry.name == DEFAULT_MODEL} for entry in entries], indent=2))
        return
    names = {entry.name: entry.name + (" (default)" if entry.name == DEFAULT_MODEL else "") for entry in entries}
    width = max(len(name) for name in names.values())
    header = (f"{'name':<{width}} {'kind':<6} {'size':<5} {'outputs':<13} {'frame':>6} {'clip':>6}  {'comes from':<30} "
              "licence")
    click.echo(header)
    click.echo("-" * len(header))
    for entry in entries:
        if entry.packaged:
            where = "(ships in the package)"
        elif entry.download_url and not entry.published:
            host = urlsplit(entry.download_url).hostname or ""
            where = ("authors' Google Drive" if host.endswith("google.com") else "authors' Aliyun link" if "aliyun" in host
                     else "GitHub release" if host == "github.com" else host)
        elif entry.in_our_format and not entry.published:
            where = "none yet: load its checkpoint"
        else:
            where = entry.repo_id
        click.echo(
            f"{names[entry.name]:<{width}} {entry.kind:<6} {entry.size:<5} {entry.outputs:<13} {entry.frame_embedding_size():>6} "
            f"{entry.clip_embedding_size():>6}  {where:<30} {entry.license}"
        )
    click.echo("\nframe / clip: embedding sizes with all blocks (12; atst-frame-mini: 6); n_blocks=1: divide by that.")
    click.echo("outputs: embeddings; events: probabilities of N classes every 40 ms (atst-sed-desed: 64 ms) for "
               "atst-detect; tags: N clip-level probabilities for atst-tag.")
    click.echo("authors' ... / GitHub release: downloaded and converted once, on first use; then cached.")
    click.echo(f"default: {DEFAULT_MODEL}, what --model and load_model() use when not given one.")


@click.command(context_settings=CONTEXT)
@click.argument("reference", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("detected", required=False, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--scores", "scores_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Frame score tables (atst-detect --scores DIR): also compute PSDS1 and PSDS2 with the DCASE "
              "2021-2024 settings, with sed_scores_eval (the psds extra).")
@click.option("--collar", type=click.FloatRange(min=0), default=0.2, show_default=True, help="Onset collar (s) of the event-based F1.")
@click.option("--offset-share", type=click.FloatRange(min=0), default=0.2, show_default=True,
              help="Offset collar: max(collar, this share of the reference event's length).")
@click.option("--segment", type=click.FloatRange(min=0.01), default=1.0, show_default=True, help="Segment length (s) of the segment-based F1.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Also write the scores here.")
@one_line_errors
def score(reference: Path, detected: Path | None, scores_dir: Path | None, collar: float, offset_share: float, segment: float,
          json_path) -> None:
    """Score DETECTED events, and the frame scores in --scores DIR, against REFERENCE events
    (DESED-style TSV files: filename, onset, offset, event_label): event-based and segment-based
    F1, micro and macro, per class, with the definitions of sed_eval (which it equals); PSDS1 and
    PSDS2 with sed_scores_eval."""
    from ..events import read_events, read_strong_labels
    from ..scoring import PSDS_SCENARIOS, psds_of_scenarios, read_score_tables

    if detected is None and scores_dir is None:
        raise click.UsageError("give DETECTED events (a TSV) and/or --scores DIR")
    truth = read_events(reference)
    if not truth:
        raise click.ClickException(f"{str(reference)!r} holds no events")
    payload: dict = {}
    if detected is not None:
        payload.update(_f1_scores(truth, read_events(detected), collar, offset_share, segment))
    if scores_dir is not None:
        tables, by_file = read_score_tables(scores_dir), read_strong_labels(reference)
        payload["psds"] = {}
        for scenario, (value, per_class) in psds_of_scenarios(by_file, tables).items():
            settings = PSDS_SCENARIOS[scenario]
            payload["psds"][scenario] = {"value": value, "per_class": per_class, **settings}
            click.echo(f"{scenario} {value:.3f} (dtc {settings['dtc_threshold']:g}, gtc {settings['gtc_threshold']:g}"
                       + (f", cttc {settings['cttc_threshold']:g}" if settings["cttc_threshold"] else "")
                       + f", alpha_ct {settings['alpha_ct']:g}, alpha_st {settings['alpha_st']:g}; sed_scores_eval, "
                       f"{len([f for f, events in by_file.items() if events])} files with events)")
    if json_path is not None:
        payload["settings"] = {"collar": collar, "offset_share": offset_share, "segment": segment}
        json_path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


def _f1_scores(truth, found, collar: float, offset_share: float, segment: float) -> dict:
    """Print and return the event-based and segment-based F1 of ``found`` against ``truth``."""
    from ..scoring import event_based, segment_based

    results = {"event_based": event_based(truth, found, collar=collar, offset_share=offset_share),
               "segment_based": segment_based(truth, found, segment=segment)}
    click.echo(f"{len(truth)} reference events in {len({e.filename for e in truth})} files, {len(found)} detected")
    events, segments = results["event_based"], results["segment_based"]
    click.echo(f"event-based (onset collar {collar:g} s, offset max({collar:g} s, {offset_share:.0%})): "
               f"F1 micro {_figure(events.micro_f1)}, {_macro(events)}")
    click.echo(f"segment-based ({segment:g} s segments): F1 micro {_figure(segments.micro_f1)}, {_macro(segments)}")
    if events.undetected:  # the same classes for both: those with events in one list only
        click.echo(f"reference classes without detections ({len(events.undetected)}): {', '.join(events.undetected)}")
    if events.unreferenced:
        click.echo(f"detected classes absent from the reference ({len(events.unreferenced)}): {', '.join(events.unreferenced)}")
    if events.undetected or events.unreferenced:
        click.echo("their F1 is undefined (n/a): the macro F1 leaves them out, as sed_eval does; 'over all' counts them as 0")
    click.echo(f"\n{'class':<20} {'event F1':>8} {'P':>6} {'R':>6} {'segment F1':>10}")
    for label, counts in events.per_class.items():
        click.echo(f"{label:<20} {_figure(counts.f1, 8)} {_figure(counts.precision, 6)} {_figure(counts.recall, 6)} "
                   f"{_figure(segments.per_class[label].f1, 10)}")
    return {name: scores.to_dict() for name, scores in results.items()}


def _figure(value: float, width: int = 0) -> str:
    """A score as printed: 3 decimals, or n/a where it is undefined (NaN)."""
    return f"{'n/a' if math.isnan(value) else f'{value:.3f}':>{width}}"


def _macro(scores) -> str:
    """The macro F1 of :class:`~atst_features.scoring.DetectionScores` and the classes it averages."""
    classes, left_out = len(scores.per_class), len(scores.undetected) + len(scores.unreferenced)
    if not left_out:
        return f"macro {_figure(scores.macro_f1)} ({classes} classes)"
    return (f"macro {_figure(scores.macro_f1)} over the {classes - left_out} classes with reference and detected events "
            f"({_figure(scores.macro_f1_all)} over all {classes}, the {left_out} others as 0)")
