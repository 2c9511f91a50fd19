#!/usr/bin/env bash
# Rebuild atst-frame-mini from scratch on one machine: corpus and evaluation set (Debian packages,
# apt-get as root), pretraining with `atst-train frame --config frame-mini`, export with
# `atst-convert`, linear probes of every checkpoint and of the baselines with `atst-probe`, and the
# model card with its training figure.
#
#   bash recipes/mini/run.sh [OUT_FOLDER]
#
# Environment: ATST_MINI_DATA (corpus, default ~/atst-mini-data), ATST_MINI_RUN (checkpoints and
# logs, default ~/atst-mini-run), RESUME=1 to continue an interrupted pretraining from last.ckpt.
# Needs `pip install atst-features[train]` (the train extra brings matplotlib for the figure).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
data="${ATST_MINI_DATA:-$HOME/atst-mini-data}"
run="${ATST_MINI_RUN:-$HOME/atst-mini-run}"
out="${1:-$run/atst-frame-mini}"
started=$(date +%s)

python "$here/build_corpus.py" --install --out "$data"

mkdir -p "$run"
cd "$run"
atst-train frame --config frame-mini --data.path "$data/train.csv" \
    --trainer.enable_progress_bar false ${RESUME:+--ckpt_path last}
trained=$(date +%s)

atst-convert runs/frame-mini/checkpoints/last.ckpt "$out" --license cc-by-sa-4.0 --overwrite

checkpoints=()
while IFS= read -r path; do checkpoints+=(--model "$path"); done \
    < <(ls runs/frame-mini/checkpoints/*step=*.ckpt | sort -t= -k3 -n)
atst-probe "$data/eval.csv" --model "$out" --model "random:$out" --model logmel "${checkpoints[@]}" \
    --json "$run/probe.json"

python "$here/model_card.py" "$out" --data "$data" --run "$run" --probe "$run/probe.json" \
    --seconds $((trained - started))
echo "done in $(( ($(date +%s) - started) / 60 )) min: $out"
