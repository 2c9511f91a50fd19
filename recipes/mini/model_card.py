"""Write the atst-frame-mini model card and its training figure from the run's own records.

Reads the corpus summary and manifests (build_corpus.py), the Lightning CSV log of the run, the
probe results (``atst-probe --json``) and the exported folder's config; writes ``training.png``
(loss, collapse diagnostic, learning rate, probe accuracy per checkpoint) and ``README.md`` into
the exported folder.

    python recipes/mini/model_card.py MODEL_FOLDER --data DATA --run RUN_DIR --probe probe.json --seconds N
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from atst_features import training  # noqa: E402
from atst_features.card import card_metadata  # noqa: E402
from atst_features.registry import ATST_CITATION  # noqa: E402


def read_metrics(run: Path) -> dict[str, list[tuple[int, float]]]:
    """Each logged metric as (step, value) pairs, from the newest CSV log of the run."""
    logs = sorted((run / "runs/frame-mini/csv").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1]))
    series: dict[str, list[tuple[int, float]]] = {}
    for log in logs:  # a resumed run continues in a new version folder
        with open(log, encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                for key, value in row.items():
                    if key not in ("step", "epoch") and value:
                        series.setdefault(key, []).append((int(row["step"]), float(value)))
    return series


def checkpoint_step(name: str) -> int | None:
    match = re.search(r"step=(\d+)", name)
    return int(match.group(1)) if match else None


def smooth(values: list[float], width: int = 8) -> list[float]:
    return [sum(values[max(0, i - width + 1) : i + 1]) / len(values[max(0, i - width + 1) : i + 1]) for i in range(len(values))]


def plot(series, probe: dict, path: Path) -> None:
    results = probe["results"]
    curve = sorted((checkpoint_step(r["model"]), r["test"]) for r in results if checkpoint_step(r["model"]) is not None)
    baselines = {r["model"]: r["test"] for r in results if r["model"] == "logmel" or r["model"].startswith("random:")}
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.6))
    steps, loss = zip(*series["loss"])
    axes[0].plot(steps, loss, color="0.75", lw=0.8, label="logged")
    axes[0].plot(steps, smooth(list(loss)), color="C0", label="moving mean")
    axes[0].set(title="BYOL loss (masked frames)", xlabel="step", ylim=(0, None))
    axes[0].legend()
    for key, colour in (("std_student", "C1"), ("std_teacher", "C2")):
        s, v = zip(*series[key])
        axes[1].plot(s, v, color=colour, label=key.replace("_", " "))
    axes[1].axhline(256 ** -0.5, color="0.5", ls=":", label="uniform on the sphere (1/16)")
    axes[1].set(title="collapse diagnostic: output std", xlabel="step", ylim=(0, None))
    axes[1].legend(fontsize=8)
    s, v = zip(*series["lr"])
    axes[2].plot(s, v, color="C3")
    axes[2].set(title="learning rate", xlabel="step")
    if curve:
        axes[3].plot(*zip(*curve), "o-", color="C0", label="checkpoints (EMA teacher)")
    for (name, value), style in zip(sorted(baselines.items()), ("--", ":")):
        axes[3].axhline(value, color="0.3", ls=style, label="log-mel mean+std" if name == "logmel" else "random weights")
    axes[3].set(title=f"linear probe, held-out set ({results[0]['metric']})", xlabel="step")
    axes[3].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def card(folder: Path, data: Path, run: Path, probe: dict, seconds: float, series) -> str:
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    encoder = config["model"]["encoder"]
    summary = json.loads((data / "summary.json").read_text(encoding="utf-8"))
    with open(data / "train.csv", encoding="utf-8") as handle:
        licences = {row["package"]: row["licence"] for row in csv.DictReader(handle)}
    with open(data / "eval.csv", encoding="utf-8") as handle:
        eval_rows = list(csv.DictReader(handle))
    preset = yaml.safe_load((Path(training.__file__).parent / "configs" / "frame-mini.yaml").read_text(encoding="utf-8"))
    hparams = preset["model"]
    parameters = sum(t.numel() for t in load_file(str(folder / "model.safetensors")).values())
    final = {key: sum(v for _, v in series[key][-10:]) / len(series[key][-10:]) for key in ("loss", "std_student", "std_teacher")}
    results = probe["results"]
    by_name = {r["model"]: r for r in results}
    mini = next(r for r in results if not r["model"].startswith("random:") and r["model"] != "logmel" and checkpoint_step(r["model"]) is None)
    random_ = next(r for r in results if r["model"].startswith("random:"))
    logmel = by_name["logmel"]
    data_rows = "\n".join(
        f"| {package} | {minutes:.0f} | {licences.get(package, '?').split(' (/usr')[0]} |"
        for package, minutes in summary["train_minutes_by_package"].items()
    )
    eval_sources = {}
    for row in eval_rows:
        eval_sources.setdefault(row["label"], set()).add(row["package"])
    eval_table = "\n".join(
        f"| {label} | {counts['train']} | {counts['test']} | {', '.join(sorted(eval_sources[label]))} |"
        for label, counts in summary["eval_clips_by_label"].items()
    )
    verdict = (
        f"On held-out recordings its clip embeddings are linearly more separable than those of the same network "
        f"with random weights ({mini['test']:.3f} against {random_['test']:.3f})."
        if mini["test"] > random_["test"] else
        f"**It has not learned representations that beat random weights on our held-out probe** "
        f"({mini['test']:.3f} against {random_['test']:.3f}, log-mel statistics {logmel['test']:.3f}; see Evaluation): "
        "the loss falls and nothing collapses, but at this scale the objective trades away information the probe needs."
    )
    centred = [what for key, what in (("center_targets", "their clip mean"), ("center_positions", "the batch mean at each position"))
               if hparams.get(key)]
    centring = (" Not in the reference: the teacher's tokens minus " + " and ".join(centred) + " are the targets "
                "(without it the frame features became constant within each clip and the probe fell as training went on)."
                if centred else "")
    curve = sorted((checkpoint_step(r["model"]), r["test"]) for r in results if checkpoint_step(r["model"]) is not None)
    curve_text = ", ".join(f"{step}: {value:.3f}" for step, value in curve)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return f"""{card_metadata(config["license"])}
# atst-frame-mini: a small ATST-Frame trained by atst-features

**Scope: a small demo and test model.** It ships inside the `atst-features` package so that the
toolkit embeds real audio on a machine with no network, and it exercises `atst-train` on real
recordings. {verdict} It was trained for {seconds / 60:.0f} minutes on a 2-core CPU with {summary["train_hours"]:.1f} hours of
audio; the paper's models saw thousands of hours on GPUs. **For research, use the official ATST
weights** (`atst-frame-base`, `atst-clip-base`, `atst-c2f-base`, ...; see `atst-models`).

## Usage

```python
from atst_features import load_model

model = load_model("atst-frame-mini")                    # from the package: no download
clip = model.get_clip_embedding("audio.wav")              # [1, {encoder["depth"] * encoder["embed_dim"]}]: all {encoder["depth"]} blocks
frames, timestamps = model.get_frame_embeddings("audio.wav", n_blocks=1)   # [1, T, {encoder["embed_dim"]}], ms
```

```bash
atst-embed audio.wav --model atst-frame-mini --level frame
```

## Model

ATST-Frame encoder (Li, Shao, Li, TASLP 2024): 64-bin log-mel at 16 kHz, 4-frame patches (one
token per 40 ms), {encoder["depth"]} transformer blocks of width {encoder["embed_dim"]} with {encoder["num_heads"]} heads,
{parameters / 1e6:.2f} M parameters (the EMA teacher encoder of the run). Embeddings: frame
`[T, n_blocks x {encoder["embed_dim"]}]`, clip `[n_blocks x {encoder["embed_dim"]}]` (token mean per block).

## Training

- Command: `bash recipes/mini/run.sh` (corpus, `atst-train frame --config frame-mini`, `atst-convert`,
  `atst-probe`, this card); wall time of corpus and pretraining {seconds / 60:.0f} min.
- Machine: {cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}, bf16-mixed.
- Objective: the reference ATST-Frame recipe (fairseq span masks, Mixup with a memory bank on the
  student view, BYOL loss on masked frames, EMA teacher, cosine schedules of lr, weight decay and
  momentum, AdamW); the student view's random frequency crop is
  {"off (`freq_scale: [1.0, 1.0]`)" if list(hparams.get("freq_scale", [0.6, 1.5])) == [1.0, 1.0] else "on, as the reference"}.{centring} Changed for a run about 500 times shorter than
  the paper's: 4 s crops, batch {preset["data"]["batch_size"]}, {hparams["max_steps"]} steps ({hparams["warmup_steps"]} warm-up), base learning rate
  {hparams["learning_rate"]} per 256 clips (peak {hparams["learning_rate"] * preset["data"]["batch_size"] / 256:.1e}), EMA base {hparams["ema"]}, heads
  {hparams["projector_hidden_dim"]} wide; the EMA teacher {"without DropPath (`teacher_eval`)" if hparams.get("teacher_eval") else "in training mode, as the reference"}.
- Position: trained on 4 s crops (100 tokens), so positional embeddings past 4 s within a 10 s
  window were never trained; frame embeddings of longer audio are less reliable there.
- Trained for {hparams["max_steps"]} steps. At the end (mean of the last 10 logged steps): loss {final["loss"]:.3f},
  output std of the student {final["std_student"]:.4f} and of the teacher {final["std_teacher"]:.4f}
  (a collapsed model gives about 0; outputs spread evenly on the 256-dim sphere give 0.0625).

![training curves and probe accuracy per checkpoint](training.png)

### Data ({summary["train_hours"]:.1f} hours, {summary["train_pieces"]} pieces of 4-10 s, 16 kHz mono)

Openly licensed recordings from Debian packages (speech prompts in English, French and Spanish,
game and hold music, game sound effects, drum loops played from recorded drum-kit samples,
instrument samples); built by `recipes/mini/build_corpus.py` (seed {summary["seed"]}).

| Debian package | minutes | licences in the package's copyright file |
|---|---:|---|
{data_rows}

## Evaluation: linear probe on held-out recordings

`atst-probe eval.csv --model atst-frame-mini --model random:atst-frame-mini --model logmel`: clip
embeddings (all blocks), standardised, multinomial logistic regression with its L2 strength chosen by
grouped 4-fold cross-validation on the probe's train split; test {mini["metric"]} on {mini["n_test"]} clips of recordings
the probe did not train on. The evaluation set ({summary["eval_clips"]} clips of at most 4 s, 7 classes) comes from
recordings the model never heard: other packages, languages and speakers (Russian and Italian
prompts), other drum kits, tilesets and voice packs than the training corpus, and no file whose
bytes equal an evaluation file.

| features | dims | test {mini["metric"]} |
|---|---:|---:|
| atst-frame-mini (this model) | {mini["dims"]} | {mini["test"]:.3f} |
| same architecture, random weights | {random_["dims"]} | {random_["test"]:.3f} |
| log-mel mean + std | {logmel["dims"]} | {logmel["test"]:.3f} |

Per checkpoint (step: test {mini["metric"]}): {curve_text}.

| class | probe train | probe test | source packages |
|---|---:|---:|---|
{eval_table}

## Licence

The weights are released under {config["license"].upper()}. The training recordings carry the
licences listed above (mostly CC-BY-SA-3.0, CC-BY-3.0, CC0 and GPL-2+); see each package's
copyright file. The atst-features code is MIT-licensed.

## Citation

```bibtex
{ATST_CITATION}
```
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--probe", type=Path, required=True)
    parser.add_argument("--seconds", type=float, required=True, help="wall time of corpus + pretraining")
    args = parser.parse_args()
    series = read_metrics(args.run)
    probe = json.loads(args.probe.read_text(encoding="utf-8"))
    plot(series, probe, args.folder / "training.png")
    (args.folder / "README.md").write_text(card(args.folder, args.data, args.run, probe, args.seconds, series), encoding="utf-8")
    print(f"wrote {args.folder / 'README.md'} and {args.folder / 'training.png'}")


if __name__ == "__main__":
    main()
