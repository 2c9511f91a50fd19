"""``atst-train {clip,frame,finetune,distill,sed} --config PRESET_OR_FILE [--section.key value ...]``.

``clip`` and ``frame`` pretrain (self-supervised); ``finetune`` trains a pretrained encoder and a
linear head on a labelled manifest (``--data.manifest``, ``--model.init``), then tests the best
checkpoint on the test split; ``distill`` does the same for an ATST-Frame student with a frozen
fine-tuned teacher (C2F, ``--model.teacher``); ``sed`` trains a frame-level event head on strong
and weak labels (``--data.audio``, ``--data.strong``, ``--data.weak``). Presets shipped with the package (``atst-train --list-presets``):
the paper's recipes and a tiny CPU one per method. Any key of a preset can be overridden on the
command line (``--data.path``, ``--trainer.devices``, ``--trainer.num_nodes``, ``--trainer.precision
bf16-mixed``, ``--trainer.accumulate_grad_batches``, ...); ``--ckpt_path last`` resumes a run.
"""

from __future__ import annotations

import os
import sys
import traceback
import warnings
from argparse import ArgumentError
from pathlib import Path

from ..errors import BUG_REPORT, Preempted, expected_failure, one_line_message

__all__ = ["main", "PRESETS", "cpu_precision", "preset_path", "training_callbacks"]

METHODS = ("clip", "frame", "finetune", "distill", "sed")
PRESETS_DIR = Path(__file__).parent / "configs"
PRESETS = sorted(path.stem for path in PRESETS_DIR.glob("*.yaml"))
USAGE = "usage: atst-train {clip,frame,finetune,distill,sed} --config PRESET_OR_FILE [--section.key value ...] [--ckpt_path PATH|last]"


def preset_path(name_or_path: str) -> str:
    """A preset name (``frame-base``) -> its packaged YAML file; anything else is returned as is."""
    if name_or_path in PRESETS and not Path(name_or_path).exists():
        return str(PRESETS_DIR / f"{name_or_path}.yaml")
    return name_or_path


# Which arguments each method links: (source, target, when); the data module's label names and
# task type reach the model once the data module exists ("instantiate").
LINKS = {
    "pretrain": [("model.max_steps", "trainer.max_steps", "parse"), ("seed_everything", "data.seed", "parse")],
    "finetune": [("model.max_epochs", "trainer.max_epochs", "parse"), ("data.label_names", "model.labels", "instantiate"),
                 ("data.multi_label", "model.multi_label", "instantiate"), ("model.crop_seconds", "data.crop_seconds", "parse"),
                 ("seed_everything", "data.seed", "parse")],
    "sed": [("model.max_epochs", "trainer.max_epochs", "parse"), ("data.label_names", "model.labels", "instantiate"),
            ("seed_everything", "data.seed", "parse")],
}


def _classes(method: str, explicit_precision: bool):
    """(CLI class, LightningModule, LightningDataModule) of a method; Lightning is imported here,
    so that a missing ``train`` extra is one line, not a traceback. ``explicit_precision``: the
    command line sets ``--trainer.precision`` (see :func:`cpu_precision`)."""
    try:
        from lightning.pytorch.cli import LightningCLI
    except ImportError:
        print("error: atst-train needs the train extra: pip install 'atst-features[train]'", file=sys.stderr)
        sys.exit(1)
    if method in ("finetune", "distill"):
        from .distill import Distillation
        from .finetune import FineTuning
        from .labelled import LabelledData

        family, module, data = "finetune", FineTuning if method == "finetune" else Distillation, LabelledData
    elif method == "sed":
        from .sed import EventData, SoundEventDetection

        family, module, data = "sed", SoundEventDetection, EventData
    else:
        from .data import PretrainingData
        from .module import ClipPretraining, FramePretraining

        family, module, data = "pretrain", {"clip": ClipPretraining, "frame": FramePretraining}[method], PretrainingData

    class TrainCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            for source, target, when in LINKS[family]:
                parser.link_arguments(source, target, apply_on=when)
            parser.add_argument("--ckpt_path", default=None,
                                help="Resume from this checkpoint ('last': the newest complete one in the run's checkpoint folder).")
            from jsonargparse import ActionYesNo

            parser.add_argument("--requeue", action=ActionYesNo, default=False,
                                help="On SIGTERM or SIGUSR1: save, requeue the SLURM job and stop; the requeued job "
                                     "resumes from the newest checkpoint of the run by itself.")

        def before_instantiate_classes(self) -> None:
            trainer = self.config.trainer
            trainer.precision = cpu_precision(trainer.precision, trainer.accelerator, explicit=explicit_precision)

    return TrainCLI, module, data


def cpu_precision(precision, accelerator, explicit: bool):
    """The trainer precision to use: a 16-bit one on a CPU without fast kernels for it (see
    :func:`~atst_features.precision.cpu_multiplies_fast`) runs a step several times slower than
    ``32-true`` (38x for frame-mini on an AVX2-only EPYC): a preset's becomes ``32-true``, with a
    note; one given on the command line (``explicit``) stays, with a warning."""
    import torch

    from ..precision import slow_precision_message

    name = str(precision)
    half = torch.bfloat16 if "bf16" in name else torch.float16 if name.startswith("16") else None
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    message = slow_precision_message(f"--trainer.precision {name}", half) if on_cpu else None
    if message is None:
        return precision
    if explicit:
        print(f"warning: {message}; use fp32", file=sys.stderr)
        return precision
    print(f"note: {message}; training in 32-true instead (the preset's {name} "
          f"stays in force with --trainer.precision {name})", file=sys.stderr)
    return "32-true"


def _not_a_tip(record) -> bool:
    return not str(record.msg).startswith("💡 Tip:")


def _quiet_lightning() -> None:
    """Silence what Lightning prints on every run that is noise for our users: its "💡 Tip:" promotions
    of its cloud services (litlogger, litmodels), the deprecation warning its own code raises under
    newer PyTorch (``LeafSpec``) and those jsonargparse raises about Lightning's CLI code (shown
    with ``-W default``). Its other messages and warnings stay."""
    import lightning_utilities.core.rank_zero as rank_zero  # where rank_zero_info logs

    rank_zero.log.addFilter(_not_a_tip)
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning,
                            module=r"lightning\.")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"lightning\.pytorch\.cli$")


def main(argv: list[str] | None = None) -> None:
    """``atst-train``: an expected failure (a bad manifest or model source, an unreadable clip, a full
    disk, out of memory) ends the run with one ``error:`` line naming it; a bug prints its traceback
    and asks to be reported. Both exit with code 1. A missing or invalid option is one ``error:`` line and
    where to read the options (exit code 2). SIGTERM or SIGUSR1 saves a checkpoint and stops with one line
    (exit code 128 + the signal: 143, 138; see :mod:`.preemption`). A process of a distributed run that
    dies or stops answering stops the others with one ``error:`` line within seconds (see :mod:`.distributed`)."""
    from .distributed import PeerWatch

    args = sys.argv[1:] if argv is None else argv
    watch = PeerWatch(training=bool(args) and args[0] in METHODS)
    try:
        with watch:
            _train(argv)
    except ArgumentError as error:  # a missing or invalid option: one line, not jsonargparse's 60 lines of usage first
        print(f"error: {' '.join(str(error).split())}\nsee: atst-train {args[0]} --help", file=sys.stderr)
        sys.exit(2)
    except Preempted as stop:  # SIGTERM / SIGUSR1: saved, not a failure; said by the first process
        if str(stop):
            print(stop, file=sys.stderr)
        sys.exit(stop.exit_code)
    except Exception as error:  # noqa: BLE001 - sorted into expected failures and bugs
        error = watch.explain(error)  # another process of a distributed run is gone: PeerLostError
        if expected_failure(error):
            print(f"error: {one_line_message(error)}", file=sys.stderr)
        else:
            traceback.print_exc()
            print(BUG_REPORT, file=sys.stderr)
        sys.exit(1)


def _train(argv: list[str] | None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--list-presets"]:
        for name in PRESETS:
            first = (PRESETS_DIR / f"{name}.yaml").read_text(encoding="utf-8").splitlines()[0].lstrip("# ")
            print(f"{name:<12} {first}")
        return
    if not argv or argv[0] not in METHODS:
        print(USAGE, file=sys.stderr)
        print(f"presets: {', '.join(PRESETS)}", file=sys.stderr)
        sys.exit(0 if argv[:1] in (["-h"], ["--help"]) else 2)
    method, rest = argv[0], argv[1:]
    rest = [
        preset_path(arg) if index and rest[index - 1] == "--config" else arg
        for index, arg in enumerate(rest)
    ]
    rest = [f"--config={preset_path(arg.split('=', 1)[1])}" if arg.startswith("--config=") else arg for arg in rest]
    # Our arguments arrive through `args`; sys.argv stays as it is: Lightning's DDP launcher
    # starts the other ranks by running it again.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
    explicit_precision = any(arg.split("=", 1)[0] == "--trainer.precision" for arg in rest)
    cli_class, module, data = _classes(method, explicit_precision)
    from .checkpointing import DurableCheckpointIO
    from .preemption import Preemption

    _quiet_lightning()
    callbacks = training_callbacks()
    preemption = next(callback for callback in callbacks if isinstance(callback, Preemption))
    cli = cli_class(
        module,
        data,
        args=rest,
        run=False,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        # a progress bar only on a terminal: in a log file (a batch job) it is megabytes of redrawn lines
        trainer_defaults={"callbacks": callbacks, "enable_progress_bar": sys.stderr.isatty()},
        parser_kwargs={"prog": f"atst-train {method}", "exit_on_error": False},  # see main()
    )
    preemption.requeue = bool(cli.config.get("requeue"))
    _without_lightning_requeue(cli.trainer)
    cli.trainer.strategy.checkpoint_io = DurableCheckpointIO()
    ckpt_path = resume_from(cli.trainer, cli.config.get("ckpt_path"), automatic=preemption.requeue or _requeued_by_slurm())
    if ckpt_path is not None:  # resuming: the run's own checkpoints are expected there
        warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
    if method in ("finetune", "distill") and cli.datamodule.splits["test"]:
        best = cli.trainer.checkpoint_callback.best_model_path if cli.trainer.checkpoint_callback else ""
        cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=best or None)


def _without_lightning_requeue(trainer) -> None:
    """Inside a SLURM job, Lightning requeues on SIGUSR1 itself, saving from the signal handler in the
    middle of a step; :class:`~.preemption.Preemption` does it at a step boundary instead."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    connector = getattr(trainer, "_accelerator_connector", None)
    environment = getattr(connector, "cluster_environment", None)
    if isinstance(environment, SLURMEnvironment):
        environment.auto_requeue = False


def training_callbacks() -> list:
    """The callbacks of every ``atst-train`` run, besides those of its config: progress lines, what
    makes a resumed run exact, the final checkpoint, preemption, bad batches and collapse."""
    from .checkpointing import FinalCheckpoint
    from .guards import CollapseWatch, FiniteSteps
    from .preemption import Preemption
    from .progress import ProgressLog
    from .resume import ExactResume

    return [ProgressLog(), ExactResume(), FinalCheckpoint(), Preemption(), FiniteSteps(), CollapseWatch()]


def _requeued_by_slurm() -> bool:
    """Whether this is a SLURM job that was requeued (SLURM counts the restarts)."""
    return os.environ.get("SLURM_RESTART_COUNT", "0") not in ("", "0")


def resume_from(trainer, ckpt_path: str | None, automatic: bool) -> str | None:
    """The checkpoint to resume from: ``last`` -> the newest complete one in the run's checkpoint
    folder (None, with a note, when there is none yet); no ``--ckpt_path`` and ``automatic`` (``--requeue``
    or a requeued SLURM job) -> the same when the folder holds one. A run is its checkpoint folder."""
    from .checkpointing import checkpoint_folder, newest_checkpoint
    from .progress import say

    if ckpt_path not in ("last", None) or (ckpt_path is None and not automatic):
        return ckpt_path
    folder = checkpoint_folder(trainer)
    if folder is None:
        return ckpt_path  # Lightning's own search (its default checkpoint folder)
    newest = newest_checkpoint(folder)
    if newest is not None:
        say(f"resuming from {str(newest)!r}")
        return str(newest)
    if ckpt_path == "last":
        say(f"note: no checkpoint in {str(folder)!r} yet: starting from the beginning")
    return None


if __name__ == "__main__":
    main()
