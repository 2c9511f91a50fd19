"""What the commands share: one-line errors and warnings, finding the input files, the result
format of atst-tag / atst-detect, and the options several commands take."""

from __future__ import annotations

import functools
import re
import sys
import traceback
import warnings
from contextlib import contextmanager
from pathlib import Path

import click
from tqdm import tqdm

from ..errors import BUG_REPORT, InputError, ModelNotFoundError, SlowPrecisionWarning, expected_failure, one_line_message
from ..inputs import AudioInput, find_inputs
from ..precision import PRECISIONS
from .runs import python_stderr_kept

__all__ = ["BATCH_SIZE_OPTION", "CONTEXT", "DEVICE_OPTION", "MANIFEST_OPTION", "NUM_WORKERS_OPTION", "PRECISION_OPTION",
           "QUIET_OPTION", "find_items", "head_command_options", "model_with_head", "one_line_errors", "result_format"]

CONTEXT = {"help_option_names": ["-h", "--help"]}  # every command's context settings


@contextmanager
def one_line_warnings():
    """Inside: the library's warnings (:class:`SlowPrecisionWarning`) print as one ``warning:`` line,
    without the source line Python shows; other warnings as usual. Both above a progress bar, not into it."""
    with warnings.catch_warnings():
        python_way = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            with tqdm.external_write_mode(file=sys.stderr):
                if issubclass(category, SlowPrecisionWarning):
                    click.echo(f"warning: {message}", err=True)
                else:
                    python_way(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield


_LIBRARY_CALL = re.compile(r"load_model\('([^']*)'\)")


def _in_command_terms(message: str) -> str:
    """``message`` with the library's advice ``load_model('X')`` as ``--model X``, in a command that has --model."""
    context = click.get_current_context(silent=True)
    if context is None or not any("--model" in param.opts for param in context.command.params):
        return message
    return _LIBRARY_CALL.sub(r"--model \1", message)


def _close_progress_bars() -> None:
    """Close the progress bars a failure cut short (they stay at their last state), so that what is printed
    next starts on a line of its own instead of inside the bar's."""
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def one_line_errors(command):
    """Expected failures become one ``Error:`` line in the command's terms (exit code 1; a model source that
    names nothing is a usage error, exit code 2); a bug prints its traceback and asks to be reported (exit code
    1). Any of them first closes the progress bar it cut short. Warnings of the library are one line each."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        with python_stderr_kept():
            try:
                with one_line_warnings():
                    return command(*args, **kwargs)
            except BaseException as error:
                _close_progress_bars()
                if isinstance(error, ModelNotFoundError):
                    raise click.UsageError(_in_command_terms(one_line_message(error))) from None
                if not isinstance(error, Exception) or isinstance(error, (click.ClickException, click.exceptions.Exit,
                                                                          click.Abort)):
                    raise
                if expected_failure(error):
                    raise click.ClickException(_in_command_terms(one_line_message(error))) from None
                traceback.print_exc()
                click.echo(BUG_REPORT, err=True)
                sys.exit(1)

    return wrapper


def find_items(inputs: tuple[str, ...], manifest: Path | None) -> tuple[list[AudioInput], list[Path]]:
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


def result_format(output: Path | None, fmt: str | None, overwrite: bool, suffixes: tuple[str, ...]) -> str:
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


def model_with_head(model_name: str, device: str | None, precision: str, level: str):
    """Load a model with a head of ``level`` (``"clip"``: tagging, ``"frame"``: events); one ``Error:`` line otherwise."""
    from ..loading import load_model

    model = load_model(model_name, device=device, precision=precision)
    model.require_head(level, repr(model_name))
    return model


PRECISION_OPTION = click.option(
    "--precision", type=click.Choice(list(PRECISIONS)), default="fp32", show_default=True,
    help="Encoder compute precision (outputs stay float32): bf16 is several times faster on CPUs with AMX or "
    "AVX512-BF16 and on GPUs, several times slower on CPUs without AVX512; *-mixed keep the residual sum in float32.")
MANIFEST_OPTION = click.option("--manifest", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                               help="A file with one audio path per line, or a CSV/TSV with a 'path' column.")
DEVICE_OPTION = click.option("--device", default=None, help="cpu, cuda, cuda:1, ... [default: CUDA when available]")
BATCH_SIZE_OPTION = click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True,
                                 help="10 s windows per encoder pass.")
NUM_WORKERS_OPTION = click.option("--num-workers", type=click.IntRange(min=0), default=2, show_default=True,
                                  help="Processes decoding and resampling audio ahead of the model (0: decode in the "
                                  "main process).")
QUIET_OPTION = click.option("-q", "--quiet", is_flag=True, help="No progress bar and no summary; errors are still printed.")


def _with_options(command, options):
    for option in reversed(options):
        command = option(command)
    return command


def head_command_options(command):
    """The options atst-tag and atst-detect share (after their own)."""
    overwrite = click.option("--overwrite", is_flag=True, help="Replace the -o file if it exists.")
    return _with_options(command, [overwrite, DEVICE_OPTION, PRECISION_OPTION, BATCH_SIZE_OPTION, NUM_WORKERS_OPTION,
                                   QUIET_OPTION])
