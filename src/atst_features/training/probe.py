"""Linear probe: how well frozen clip embeddings separate the classes of a labelled set.

``atst-probe MANIFEST --model SOURCE [--model SOURCE ...]`` embeds every file once per model
(clip embedding, all blocks by default), standardises the features with the train split's
statistics, fits a multinomial logistic regression (single-label; one sigmoid per class for
multi-label) with its L2 strength chosen by grouped 4-fold cross-validation on the train split,
refits on the whole train split and reports test accuracy (single-label) or mAP (multi-label).

Besides model sources (anything ``load_model`` takes, training checkpoints included), two
baselines: ``logmel`` (mean and standard deviation over time of the 64-bin log-mel front end)
and ``random:SOURCE`` (the architecture of SOURCE with fresh random weights, seeded).
"""

from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import click
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from ..audio import AudioDecodeError, EmptyAudioError, load_audio
from ..checkpoints import CheckpointError
from ..frontend import FrontendConfig, LogMelFrontend
from ..hub import ChecksumError, DownloadError
from ..inputs import InputError
from .manifests import LabelledItem, LabelledSet, read_labelled

__all__ = [
    "L2_GRID",
    "ProbeResult",
    "average_precision",
    "clip_features",
    "fit_linear",
    "grouped_folds",
    "grouped_holdout",
    "linear_probe",
    "main",
    "mean_average_precision",
]

L2_GRID = (1e-5, 1e-4, 1e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0)
LOGMEL = "logmel"
RANDOM_PREFIX = "random:"


@dataclass
class ProbeResult:
    """One model's probe: feature size, the chosen L2 strength, the cross-validated and test scores."""

    model: str
    dims: int
    metric: str
    l2: float
    cross_val: float
    test: float
    n_train: int
    n_test: int
    seconds: float


# ---------------------------------------------------------------------------------------------- features
def _waveforms(items: list[LabelledItem]) -> list[np.ndarray]:
    waves = []
    for item in tqdm(items, desc="decode", unit="file", file=sys.stderr, leave=False):
        waveform, _ = load_audio(item.path, 16000)
        if not np.isfinite(waveform).all():
            raise AudioDecodeError(f"{str(item.path)!r}: contains NaN or Inf samples")
        waves.append(waveform)
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
    from ..loading import load_model, read_source
    from ..model import ATSTModel

    if not source.startswith(RANDOM_PREFIX):
        return load_model(source, device=device)
    contents, _ = read_source(source[len(RANDOM_PREFIX) :])
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
) -> Tensor:
    """``[N, E]`` float32 features of 16 kHz waveforms: a model's clip embeddings (``n_blocks``
    last blocks; None: all), or the ``logmel`` / ``random:SOURCE`` baselines."""
    if source == LOGMEL:
        return _logmel_statistics(waves)
    model = _load(source, device, seed)
    out = []
    for first in tqdm(range(0, len(waves), batch_size), desc=f"embed {source}", unit="batch", file=sys.stderr, leave=False):
        batch = [torch.from_numpy(w) for w in waves[first : first + batch_size]]
        out.append(model.get_clip_embedding(batch, n_blocks=n_blocks, batch_size=batch_size).float().cpu())
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------- classifier
def fit_linear(x: Tensor, y: Tensor, l2: float, multi_label: bool, max_iter: int = 300) -> tuple[Tensor, Tensor]:
    """Logistic regression by L-BFGS on standardised features ``x [N, D]``: ``y`` class indices
    ``[N]`` (softmax) or a multi-hot ``[N, C]`` (one sigmoid per class); loss + ``l2/2 * |W|^2``.
    Returns ``(W [D, C], b [C])``."""
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

    optimiser.step(closure)
    return weight.detach(), bias.detach()


def average_precision(scores: Tensor, targets: Tensor) -> float:
    """Area under the precision-recall curve of one class, as scikit-learn's
    ``average_precision_score``: ``sum_k (R_k - R_{k-1}) P_k`` over distinct score thresholds."""
    order = torch.argsort(scores.double(), descending=True, stable=True)
    scores, targets = scores.double()[order], targets.double()[order]
    last_of_tie = torch.ones_like(scores, dtype=torch.bool)
    last_of_tie[:-1] = scores[1:] != scores[:-1]
    true_positives = targets.cumsum(0)[last_of_tie]
    predicted = torch.arange(1, len(scores) + 1, dtype=torch.float64)[last_of_tie]
    positives = targets.sum()
    if positives == 0:
        return float("nan")
    precision = true_positives / predicted
    recall = true_positives / positives
    previous = torch.cat([torch.zeros(1, dtype=torch.float64), recall[:-1]])
    return float(((recall - previous) * precision).sum())


def mean_average_precision(scores: Tensor, targets: Tensor) -> float:
    """Mean over classes of :func:`average_precision`; classes without positives are left out."""
    values = [average_precision(scores[:, c], targets[:, c]) for c in range(targets.shape[1])]
    values = [v for v in values if not np.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def _score(x: Tensor, y: Tensor, weight: Tensor, bias: Tensor, multi_label: bool) -> float:
    logits = x.double() @ weight + bias
    if multi_label:
        return mean_average_precision(logits, y)
    return float((logits.argmax(dim=1) == y).double().mean())


def grouped_holdout(groups: list[str], share: float, seed: int) -> list[bool]:
    """A seeded hold-out of about ``share`` of the groups; True marks the held-out items."""
    unique = sorted(set(groups))
    random.Random(seed).shuffle(unique)
    held = set(unique[: max(1, round(len(unique) * share))])
    return [group in held for group in groups]


def grouped_folds(groups: list[str], folds: int, seed: int) -> list[int]:
    """The fold (0 .. folds-1) of each item: whole groups, shuffled with ``seed``, dealt round-robin."""
    unique = sorted(set(groups))
    random.Random(seed).shuffle(unique)
    fold_of = {group: index % folds for index, group in enumerate(unique)}
    return [fold_of[group] for group in groups]


def _standardise(fit: Tensor, *others: Tensor) -> list[Tensor]:
    mean, std = fit.mean(0), fit.std(0, unbiased=False).clamp(min=1e-6)
    return [(t - mean) / std for t in (fit, *others)]


def linear_probe(
    train: Tensor, y_train: Tensor, groups: list[str], test: Tensor, y_test: Tensor, *, multi_label: bool,
    seed: int = 0, l2_grid: tuple[float, ...] = L2_GRID, folds: int = 4,
) -> tuple[float, float, float]:
    """Choose L2 by grouped ``folds``-fold cross-validation on the train split (no group in two folds;
    ties go to the stronger L2), refit on all of train, score test. Returns ``(l2, cross-validated
    score, test score)``; scores are accuracy, or mAP for multi-label."""
    fold = torch.tensor(grouped_folds(groups, folds, seed))
    if len(set(groups)) < folds:
        raise InputError(f"the train split needs at least {folds} groups (recordings) to choose the L2 strength")
    splits = [(*_standardise(train[fold != held], train[fold == held]), fold != held) for held in range(folds)]
    best = None
    for l2 in sorted(l2_grid, reverse=True):
        scores = []
        for fit_x, held_x, fitted in splits:
            weight, bias = fit_linear(fit_x, y_train[fitted], l2, multi_label)
            scores.append(_score(held_x, y_train[~fitted], weight, bias, multi_label))
        score = float(np.nanmean(scores))
        if best is None or score > best[1] + 1e-12:
            best = (l2, score)
    train_x, test_x = _standardise(train, test)
    weight, bias = fit_linear(train_x, y_train, best[0], multi_label)
    return best[0], best[1], _score(test_x, y_test, weight, bias, multi_label)


# ---------------------------------------------------------------------------------------------- command
def _targets(items: list[LabelledItem], data: LabelledSet) -> Tensor:
    index = {name: i for i, name in enumerate(data.label_names)}
    if data.multi_label:
        y = torch.zeros(len(items), len(index))
        for row, item in enumerate(items):
            y[row, [index[label] for label in item.labels]] = 1
        return y
    return torch.tensor([index[item.labels[0]] for item in items])


def _splits(data: LabelledSet, seed: int) -> tuple[list[LabelledItem], list[LabelledItem], str]:
    if data.has_splits:
        train = [item for item in data.items if item.split in ("train", "valid")]
        test = data.split("test")
        if not train or not test:
            raise InputError("the manifest's split column needs both train (or valid) and test rows")
        return train, test, "the manifest's split column"
    groups = [item.group or str(item.path) for item in data.items]
    held = grouped_holdout(groups, 0.3, seed + 1)
    train = [item for item, h in zip(data.items, held) if not h]
    test = [item for item, h in zip(data.items, held) if h]
    return train, test, f"a seeded grouped 70/30 split (seed {seed + 1}; no split column)"


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("manifest", type=click.Path(exists=True, path_type=Path))
@click.option("--model", "models", multiple=True, default=("atst-frame-mini",), show_default=True,
              help="A model source (registry name, folder, checkpoint), 'logmel' or 'random:SOURCE'; repeat to compare.")
@click.option("--n-blocks", type=click.IntRange(min=1), default=None, help="Last blocks concatenated [default: all].")
@click.option("--device", default=None, help="cpu, cuda, ... [default: CUDA when available]")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Hold-out split and random-weight seed.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Also write the results here.")
def main(manifest: Path, models: tuple[str, ...], n_blocks, device, batch_size: int, seed: int, json_path) -> None:
    """Linear probe of frozen clip embeddings on a labelled MANIFEST (CSV/TSV with path, label or
    labels, optional split and group columns; or a folder of label folders)."""
    try:
        data = read_labelled(manifest)
        train, test, how = _splits(data, seed)
        metric = "mAP" if data.multi_label else "accuracy"
        click.echo(f"{manifest}: {len(data.items)} clips, {len(data.label_names)} classes "
                   f"({'multi' if data.multi_label else 'single'}-label); train {len(train)}, test {len(test)} by {how}",
                   err=True)
        train_waves, test_waves = _waveforms(train), _waveforms(test)
        y_train, y_test = _targets(train, data), _targets(test, data)
        groups = [item.group or str(item.path) for item in train]
        results = []
        for source in models:
            started = time.perf_counter()
            features = clip_features(source, train_waves + test_waves, n_blocks=n_blocks, device=device,
                                     batch_size=batch_size, seed=seed)
            l2, cross_val, score = linear_probe(features[: len(train)], y_train, groups, features[len(train) :], y_test,
                                              multi_label=data.multi_label, seed=seed)
            results.append(ProbeResult(source, features.shape[1], metric, l2, cross_val, score, len(train), len(test),
                                       time.perf_counter() - started))
    except (InputError, AudioDecodeError, EmptyAudioError, CheckpointError, ChecksumError, DownloadError,
            FileNotFoundError) as error:
        raise click.ClickException(str(error).splitlines()[0]) from None
    width = max(len(r.model) for r in results)
    click.echo(f"{'model':<{width}}  {'dims':>6}  {'L2':>7}  {'cross-val':>9}  {'test ' + metric:>13}")
    for r in results:
        click.echo(f"{r.model:<{width}}  {r.dims:>6}  {r.l2:>7.0e}  {r.cross_val:>9.3f}  {r.test:>13.3f}")
    if json_path is not None:
        payload = {"manifest": str(manifest), "split": how, "n_blocks": n_blocks, "seed": seed,
                   "results": [asdict(r) for r in results]}
        json_path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
