"""Linear probe: how well frozen clip embeddings separate the classes of a labelled set.

``atst-probe MANIFEST --model SOURCE [--model SOURCE ...]`` embeds every file once per model
(clip embedding, all blocks by default) and reports test accuracy (single-label) or mAP
(multi-label) of a linear classifier, by one of two protocols:

- ``logreg`` (default, quick and stable on small sets): features standardised with the train
  split's statistics, a multinomial logistic regression (one sigmoid per class for multi-label)
  with its L2 strength chosen by grouped 4-fold cross-validation on train + valid, refitted on
  all of it;
- ``reference``: the paper's linear evaluation (:mod:`.linear_eval`): 12 s centre crops embedded
  in bf16, a LinearHead trained by SGD for 100 epochs per learning rate of a sweep, the epoch and
  learning rate chosen on the valid split.

Embeddings are cached on disk (``--cache``), keyed by the model, the files and the settings.
``--resplits N`` (logreg) also scores N seeded re-draws of the train/test split over all rows:
whole groups, the manifest's share of them per class on the test side; their mean and standard
deviation say how much the one split's figure owes to its draw.

Besides model sources (anything ``load_model`` takes, training checkpoints included), two
baselines: ``logmel`` (mean and standard deviation over time of the 64-bin log-mel front end)
and ``random:SOURCE`` (the architecture of SOURCE with fresh random weights, seeded): the one
spelling of random weights, which ``atst-train --model.init`` takes too
(:func:`atst_features.loading.read_model_source`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import click
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from ..audio import SAMPLE_RATE, centre_crop, load_audio
from ..errors import ATSTError, InputError
from ..frontend import FrontendConfig, LogMelFrontend
from ..loading import RANDOM_PREFIX, read_model_source, resolve_device
from ..precision import slow_precision_message
from .linear_eval import REFERENCE_LEARNING_RATES, linear_evaluation
from .manifests import (SPLITS, LabelledItem, group_of, grouped_folds, grouped_holdout, groups_note, read_labelled,
                        split_items)
from .metrics import score

__all__ = [
    "L2_GRID",
    "ProbeResult",
    "cached_features",
    "clip_features",
    "fit_linear",
    "linear_probe",
    "main",
    "resplit_scores",
]

L2_GRID = (1e-5, 1e-4, 1e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0)
LOGMEL = "logmel"
# Fits on fewer feature values than this run on one thread: L-BFGS on a few hundred clips is a chain of
# small matrix products, which a second thread slows down (37 fits of 440 x 1536 features, 11 classes:
# 6.5 s on one thread, 32-43 s on two of a busy 2-core machine) instead of speeding up.
ONE_THREAD_BELOW = 1 << 22


@dataclass
class ProbeResult:
    """One model's probe: the protocol, feature size, the chosen setting (``l2`` strength or
    ``learning_rate``), the selection score (cross-validated, or valid), the test score and the
    test scores of the re-drawn splits (``--resplits``; empty without)."""

    model: str
    protocol: str
    dims: int
    metric: str
    setting: str
    selection: float
    test: float
    n_train: int
    n_test: int
    seconds: float
    resplits: list[float] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- features
def _waveforms(items: list[LabelledItem], crop_seconds: float | None) -> list[np.ndarray]:
    waves = []
    for item in tqdm(items, desc="decode", unit="file", file=sys.stderr, leave=False):
        waveform, _ = load_audio(item.path)
        waves.append(centre_crop(waveform, int(crop_seconds * SAMPLE_RATE)) if crop_seconds else waveform)
    return waves


def _logmel_statistics(waves: list[np.ndarray]) -> Tensor:
    frontend = LogMelFrontend(FrontendConfig())
    rows = []
    for waveform in waves:
        waveform = torch.from_numpy(waveform)
        if waveform.numel() < frontend.min_samples:
            waveform = F.pad(waveform, (0, frontend.min_samples - waveform.numel()))
        mel, _ = frontend(waveform[None])
        rows.append(torch.cat([mel[0].mean(dim=-1), mel[0].std(dim=-1, unbiased=False)]))
    return torch.stack(rows)


def _load(source: str, device: str | None, seed: int):
    from ..loading import load_model
    from ..model import ATSTModel

    if not source.startswith(RANDOM_PREFIX):
        return load_model(source, device=device)
    contents, _ = read_model_source(source)
    torch.manual_seed(seed)
    model = ATSTModel(contents.config).eval()
    model.provenance = {"source_layout": f"random weights (seed {seed}) in the architecture of {contents.layout}"}
    return model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def clip_features(
    source: str,
    waves: list[np.ndarray],
    *,
    n_blocks: int | None = None,
    device: str | None = None,
    batch_size: int = 32,
    seed: int = 0,
    bf16: bool = False,
) -> Tensor:
    """``[N, E]`` float32 features of 16 kHz waveforms: a model's clip embeddings (``n_blocks``
    last blocks; None: all), or the ``logmel`` / ``random:SOURCE`` baselines. ``bf16``: the encoder
    under bf16 autocast (the reference's bf16-mixed extraction; the front end stays float32)."""
    if source == LOGMEL:
        return _logmel_statistics(waves)
    model = _load(source, device, seed)
    out = []
    for first in tqdm(range(0, len(waves), batch_size), desc=f"embed {source}", unit="batch", file=sys.stderr, leave=False):
        batch = [torch.from_numpy(w) for w in waves[first : first + batch_size]]
        with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=bf16):
            out.append(model.get_clip_embedding(batch, n_blocks=n_blocks, batch_size=batch_size).float().cpu())
    return torch.cat(out)


def _fingerprint(path: Path) -> list:
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


def cached_features(cache: Path | None, source: str, items: list[LabelledItem], settings: dict, compute) -> Tensor:
    """``compute()`` once per (model source, files, settings): stored as ``cache/<key>.pt``.
    The key covers each file's path, size and modification time, and a local model's too."""
    if cache is None:
        return compute()
    model_path = Path(source.removeprefix(RANDOM_PREFIX))
    key = json.dumps({"source": source, "model": _fingerprint(model_path) if model_path.exists() else None,
                      "files": [_fingerprint(item.path) for item in items], **settings}, sort_keys=True)
    path = cache / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.pt"
    if path.is_file():
        try:
            return torch.load(path, weights_only=True)
        except Exception:  # noqa: BLE001 - a damaged entry is removed, recomputed and written again
            path.unlink(missing_ok=True)
    features = compute()
    cache.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save(features, temporary)
    temporary.replace(path)
    return features


# ---------------------------------------------------------------------------------------------- classifier
@contextmanager
def _threads_for(x: Tensor):
    """Inside: torch on one thread when ``x`` is small (see :data:`ONE_THREAD_BELOW`); the setting is restored after."""
    before = torch.get_num_threads()
    if x.numel() < ONE_THREAD_BELOW:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def fit_linear(x: Tensor, y: Tensor, l2: float, multi_label: bool, max_iter: int = 300) -> tuple[Tensor, Tensor]:
    """Logistic regression by L-BFGS on standardised features ``x [N, D]``: ``y`` class indices
    ``[N]`` (softmax) or a multi-hot ``[N, C]`` (one sigmoid per class); loss + ``l2/2 * |W|^2``.
    Returns ``(W [D, C], b [C])``. Small problems are solved on one thread (:data:`ONE_THREAD_BELOW`)."""
    classes = y.shape[1] if multi_label else int(y.max()) + 1
    weight = torch.zeros(x.shape[1], classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    x = x.double()
    target = y.double() if multi_label else y.long()
    optimiser = torch.optim.LBFGS([weight, bias], max_iter=max_iter, tolerance_grad=1e-7, line_search_fn="strong_wolfe")

    def closure():
        optimiser.zero_grad()
        logits = x @ weight + bias
        loss = F.binary_cross_entropy_with_logits(logits, target) if multi_label else F.cross_entropy(logits, target)
        loss = loss + 0.5 * l2 * weight.square().sum()
        loss.backward()
        return loss

    with _threads_for(x):
        optimiser.step(closure)
    return weight.detach(), bias.detach()


def _standardise(fit: Tensor, *others: Tensor) -> list[Tensor]:
    mean, std = fit.mean(0), fit.std(0, unbiased=False).clamp(min=1e-6)
    return [(t - mean) / std for t in (fit, *others)]


def linear_probe(
    train: Tensor, y_train: Tensor, groups: list[str], test: Tensor, y_test: Tensor, *, multi_label: bool,
    seed: int = 0, l2_grid: tuple[float, ...] = L2_GRID, folds: int = 4, report: Callable[[str], None] | None = None,
) -> tuple[float, float, float]:
    """Choose L2 by grouped ``folds``-fold cross-validation on the train split (no group in two folds;
    ties go to the stronger L2), refit on all of train, score test. Returns ``(l2, cross-validated
    score, test score)``; scores are accuracy, or mAP for multi-label. ``report``: called with a line
    per fit (which of how many, its score, its time)."""
    fold = torch.tensor(grouped_folds(groups, folds, seed))
    if len(set(groups)) < folds:
        raise InputError(f"the train split needs at least {folds} groups (recordings) to choose the L2 strength")
    splits = [(*_standardise(train[fold != held], train[fold == held]), fold != held) for held in range(folds)]
    metric, total = "mAP" if multi_label else "accuracy", len(l2_grid) * folds + 1

    def fitted_score(number: int, what: str, fit_x, fit_y, l2: float, score_x, score_y) -> float:
        started = time.perf_counter()
        weight, bias = fit_linear(fit_x, fit_y, l2, multi_label)
        value = score(score_x.double() @ weight + bias, score_y, multi_label)
        if report is not None:
            report(f"fit {number}/{total}: L2 {l2:.0e}, {what} {metric} {value:.3f} ({time.perf_counter() - started:.1f} s)")
        return value

    best = None
    for index, l2 in enumerate(sorted(l2_grid, reverse=True)):
        scores = [fitted_score(index * folds + held + 1, f"fold {held + 1}/{folds}:", fit_x, y_train[fitted], l2, held_x,
                               y_train[~fitted]) for held, (fit_x, held_x, fitted) in enumerate(splits)]
        mean = float(np.nanmean(scores))
        if best is None or mean > best[1] + 1e-12:
            best = (l2, mean)
    train_x, test_x = _standardise(train, test)
    return best[0], best[1], fitted_score(total, "all of train: test", train_x, y_train, best[0], test_x, y_test)


def resplit_scores(
    features: Tensor, targets: Tensor, groups: list[str], strata: list[str] | None, *, test_share: float,
    count: int, multi_label: bool, seed: int = 0, desc: str = "re-split",
) -> list[float]:
    """Test scores of :func:`linear_probe` on ``count`` re-drawn splits of all rows: re-split ``r``
    holds out about ``test_share`` of the groups of each stratum (seed ``seed + 1 + r``)."""
    scores = []
    for draw in tqdm(range(count), desc=desc, unit="split", file=sys.stderr, leave=False):
        held = torch.tensor(grouped_holdout(groups, test_share, seed + 1 + draw, strata))
        kept = [group for group, out in zip(groups, held.tolist()) if not out]
        scores.append(linear_probe(features[~held], targets[~held], kept, features[held], targets[held],
                                   multi_label=multi_label, seed=seed)[2])
    return scores


# ---------------------------------------------------------------------------------------------- command
def _default_cache() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "atst-features" / "embeddings"


def _probe(source: str, protocol: str, data, splits: dict, waves, options: dict) -> ProbeResult:
    """One model's probe; ``waves()`` decodes the clips of every split (once, and only on a cache miss)."""
    started, resplits = time.perf_counter(), []
    items = [item for name in SPLITS for item in splits[name]]
    settings = {key: options[key] for key in ("n_blocks", "seed", "bf16", "crop_seconds")}
    features = cached_features(options["cache"], source, items, settings, lambda: clip_features(
        source, [w for name in SPLITS for w in waves()[name]], n_blocks=options["n_blocks"], device=options["device"],
        batch_size=options["batch_size"], seed=options["seed"], bf16=options["bf16"]))
    parts, first = {}, 0
    for name in SPLITS:
        parts[name], first = features[first : first + len(splits[name])], first + len(splits[name])
    targets = {name: data.targets(splits[name]) for name in SPLITS}
    metric = "mAP" if data.multi_label else "accuracy"
    if protocol == "reference":
        result = linear_evaluation(parts, targets, multi_label=data.multi_label, num_classes=len(data.label_names),
                                   learning_rates=options["learning_rates"], epochs=options["epochs"], seed=options["seed"])
        setting, selection = f"lr {result.learning_rate:g} ep {result.epoch}", result.valid
        test = result.test
    else:
        groups = [group_of(item) for item in splits["train"] + splits["valid"]]
        train_x = torch.cat([parts["train"], parts["valid"]])
        train_y = torch.cat([targets["train"], targets["valid"]])
        l2, selection, test = linear_probe(train_x, train_y, groups, parts["test"], targets["test"],
                                           multi_label=data.multi_label, seed=options["seed"],
                                           report=lambda line: click.echo(f"{source}: {line}", err=True))
        setting = f"L2 {l2:.0e}"
        if options["resplits"]:
            strata = None if data.multi_label else [item.labels[0] for item in items]
            resplits = resplit_scores(features, torch.cat([targets[name] for name in SPLITS]),
                                      [group_of(item) for item in items], strata, test_share=options["test_share"],
                                      count=options["resplits"], multi_label=data.multi_label, seed=options["seed"],
                                      desc=f"re-split {source}")
    n_train = len(splits["train"]) + (0 if protocol == "reference" else len(splits["valid"]))
    return ProbeResult(source, protocol, features.shape[1], metric, setting, selection, test, n_train,
                       len(splits["test"]), time.perf_counter() - started, resplits)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("manifest", type=click.Path(exists=True, path_type=Path))
@click.option("--model", "models", multiple=True, default=("atst-frame-mini",), show_default=True,
              help="A model source (registry name, folder, checkpoint), 'logmel' or 'random:SOURCE'; repeat to compare.")
@click.option("--protocol", type=click.Choice(["logreg", "reference"]), default="logreg", show_default=True,
              help="logreg: cross-validated logistic regression; reference: the paper's linear evaluation.")
@click.option("--n-blocks", type=click.IntRange(min=1), default=None, help="Last blocks concatenated [default: all].")
@click.option("--learning-rate", "learning_rates", type=float, multiple=True,
              help="reference protocol: learning rates to sweep, per 256 clips [default: every rate of the reference's scripts].")
@click.option("--epochs", type=click.IntRange(min=1), default=100, show_default=True, help="reference protocol: epochs per head.")
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default=None,
              help="Encoder precision for embedding [default: bf16 for reference, as the paper, unless on a CPU "
                   "without fast bf16 kernels (no AVX512); fp32 for logreg].")
@click.option("--device", default=None, help="cpu, cuda, ... [default: CUDA when available]")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Split, random-weight and training seed.")
@click.option("--resplits", type=click.IntRange(min=0), default=0, show_default=True,
              help="logreg: also score this many seeded re-draws of the train/test split (grouped, per class) "
                   "and print their mean and standard deviation.")
@click.option("--cache", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Embedding cache folder [default: ~/.cache/atst-features/embeddings].")
@click.option("--no-cache", is_flag=True, help="Neither read nor write cached embeddings.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Also write the results here.")
def main(manifest: Path, models: tuple[str, ...], protocol: str, n_blocks, learning_rates, epochs: int, precision,
         device, batch_size: int, seed: int, resplits: int, cache, no_cache: bool, json_path) -> None:
    """Linear probe of frozen clip embeddings on a labelled MANIFEST (CSV/TSV with path, label or
    labels, optional split and group columns; or a folder of label folders)."""
    reference = protocol == "reference"
    options = {"n_blocks": n_blocks, "seed": seed, "device": device, "batch_size": batch_size, "epochs": epochs,
               "crop_seconds": 12.0 if reference else None,
               "learning_rates": tuple(learning_rates) or REFERENCE_LEARNING_RATES,
               "cache": None if no_cache else (cache or _default_cache()), "resplits": resplits}
    try:
        if resplits and reference:
            raise InputError("--resplits works with --protocol logreg (the reference protocol trains 100-epoch heads per split)")
        slow_bf16 = slow_precision_message("--precision bf16", torch.bfloat16, resolve_device(device).type)
        if precision == "bf16" and slow_bf16:
            click.echo(f"warning: {slow_bf16}; use fp32", err=True)
        options["bf16"] = (precision or ("bf16" if reference and not slow_bf16 else "fp32")) == "bf16"
        data = read_labelled(manifest)
        splits, how = split_items(data, seed=seed, valid_share=0.15 if reference else 0.0)
        if not splits["test"]:
            raise InputError("the manifest's split column needs test rows to score the probe")
        counts = ", ".join(f"{name} {len(splits[name])}" for name in SPLITS if splits[name])
        if resplits:  # the manifest split's share of groups on the test side, kept by every re-draw
            every_group = {group_of(item) for name in SPLITS for item in splits[name]}
            options["test_share"] = len({group_of(item) for item in splits["test"]}) / len(every_group)
        click.echo(f"{manifest}: {len(data.items)} clips, {len(data.label_names)} classes "
                   f"({'multi' if data.multi_label else 'single'}-label); {counts} by {how}; {groups_note(data)}", err=True)
        waves = functools.cache(lambda: {name: _waveforms(splits[name], options["crop_seconds"]) for name in SPLITS})
        results = [_probe(source, protocol, data, splits, waves, options) for source in models]
    except ATSTError as error:
        raise click.ClickException(str(error).splitlines()[0]) from None
    width = max(len(r.model) for r in results)
    selection = "valid" if reference else "cross-val"
    metric = results[0].metric
    spread = f"  {f'{resplits} re-splits':>15}" if resplits else ""
    click.echo(f"{'model':<{width}}  {'dims':>6}  {'setting':<16}  {selection:>9}  {'test ' + metric:>13}{spread}")
    for r in results:
        spread = f"  {np.mean(r.resplits):>7.3f} ± {np.std(r.resplits):.3f}" if resplits else ""
        click.echo(f"{r.model:<{width}}  {r.dims:>6}  {r.setting:<16}  {r.selection:>9.3f}  {r.test:>13.3f}{spread}")
    if json_path is not None:
        payload = {"manifest": str(manifest), "protocol": protocol, "split": how, "n_blocks": n_blocks, "seed": seed,
                   "resplits": {"count": resplits, "test_share": options.get("test_share")},
                   "results": [asdict(r) for r in results]}
        json_path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
