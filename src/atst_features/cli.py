"""Command-line tools: ``atst-convert`` and ``atst-models``.

Expected failures (a bad file, no network, a refused overwrite) end with one ``Error: ...`` line
and exit code 1 (2 for usage errors), never a traceback.
"""

from __future__ import annotations

import functools
import json
import shutil
import tempfile
from pathlib import Path

import click
import numpy as np
import torch

from .audio import AudioDecodeError
from .checkpoints import CheckpointError
from .hub import ChecksumError, DownloadError, list_models, push_to_hub, sha256_of

EXPECTED_ERRORS = (CheckpointError, ChecksumError, DownloadError, AudioDecodeError, FileNotFoundError, ValueError, OSError)


def one_line_errors(command):
    """Report the library's expected errors as a single ``Error:`` line (exit code 1)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except EXPECTED_ERRORS as error:
            raise click.ClickException(str(error).splitlines()[0] if str(error) else type(error).__name__) from None

    return wrapper


def _probe_audio() -> np.ndarray:
    """12 s of chirp and noise: two 10 s windows, two ATST-Clip chunks, exercises every path."""
    rate = 16_000
    t = np.arange(12 * rate) / rate
    noise = np.random.default_rng(0).standard_normal(t.size)
    return (0.3 * np.sin(2 * np.pi * (100 + 300 * t) * t) + 0.05 * noise).astype(np.float32)


def _same_outputs(a, b) -> bool:
    audio = _probe_audio()
    checks = [
        (a.get_frame_embeddings(audio, n_blocks=a.depth)[0], b.get_frame_embeddings(audio, n_blocks=b.depth)[0]),
        (a.get_clip_embedding(audio, n_blocks=a.depth), b.get_clip_embedding(audio, n_blocks=b.depth)),
    ]
    if a.head is not None:
        checks.append((a.get_tag_logits(audio), b.get_tag_logits(audio)))
    return all(torch.equal(x, y) for x, y in checks)


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
    from .loading import load_model, model_from_contents
    from .checkpoints import read_checkpoint

    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise click.UsageError(f"{str(out_dir)!r} exists and is not empty; pass --overwrite to replace it")
    source_sha = sha256_of(source)
    source_bytes = source.stat().st_size
    contents = read_checkpoint(source)
    enc = contents.config.encoder
    click.echo(f"source  {source} ({source_bytes:,} bytes)")
    click.echo(f"  sha256 {source_sha}")
    click.echo(f"  {contents.layout}: {enc.embed_dim} wide, {enc.depth} blocks, {enc.n_prompts} prompt tokens")
    original = model_from_contents(contents)
    provenance = {
        "source_file": source.name,
        "source_sha256": source_sha,
        "source_layout": contents.layout,
        "hyper_parameters": contents.hyper_parameters,
    }
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        original.save_pretrained(staging, provenance=provenance, license=license_)
        if not _same_outputs(original, load_model(staging, device="cpu")):
            raise click.ClickException("the converted model's embeddings differ from the source's; nothing written")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    weights = out_dir / "model.safetensors"
    size = weights.stat().st_size
    click.echo(f"wrote   {out_dir}: config.json, model.safetensors ({size:,} bytes, {size / source_bytes:.0%} of the source), README.md")
    click.echo(f"  sha256 {sha256_of(weights)} (model.safetensors)")
    click.echo("verified: frame and clip embeddings of the converted model equal the source's")
    if repo_id:
        commit = push_to_hub(out_dir, repo_id, private=private)
        click.echo(f"pushed  {repo_id} (commit {commit})")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--json", "as_json", is_flag=True, help="Print the registry as JSON.")
def models(as_json: bool) -> None:
    """List the named models that load_model() and atst-embed --model accept."""
    entries = list_models()
    if as_json:
        click.echo(json.dumps([entry.__dict__ for entry in entries], indent=2))
        return
    header = f"{'name':<23} {'kind':<6} {'size':<6} {'frame':>6} {'clip':>6}  {'Hub repository':<32} licence"
    click.echo(header)
    click.echo("-" * len(header))
    for entry in entries:
        click.echo(
            f"{entry.name:<23} {entry.kind:<6} {entry.size:<6} {entry.frame_embedding_size():>6} "
            f"{entry.clip_embedding_size():>6}  {entry.repo_id:<32} {entry.license}"
        )
    click.echo("\nframe / clip: embedding sizes with all 12 blocks (n_blocks=1: divide by 12).")
