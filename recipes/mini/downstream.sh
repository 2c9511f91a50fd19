#!/usr/bin/env bash
# The results on the held-out set of atst-frame-mini in docs/downstream.md: both linear protocols
# and fine-tuning (from the packaged weights and from random weights), then an export and atst-tag.
#
#   bash recipes/mini/downstream.sh
#
# Environment: ATST_MINI_DATA (the corpus of build_corpus.py, default ~/atst-mini-data; built if
# missing), ATST_MINI_RUN (runs and results, default ~/atst-mini-run/downstream). About 12 min on a
# 2-core CPU. Needs `pip install atst-features[train]`.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
data="${ATST_MINI_DATA:-$HOME/atst-mini-data}"
run="${ATST_MINI_RUN:-$HOME/atst-mini-run}/downstream"
[ -f "$data/eval.csv" ] || python "$here/build_corpus.py" --install --out "$data"
mkdir -p "$run" && cd "$run"

atst-probe "$data/eval.csv" --model atst-frame-mini --model random:atst-frame-mini --model logmel --json logreg.json
atst-probe "$data/eval.csv" --protocol reference --model atst-frame-mini --model random:atst-frame-mini \
    --model logmel --json reference.json

finetune() {  # NAME [ARGS...]: one fine-tuning run in its own folder; prints the test accuracy
    local name=$1; shift
    mkdir -p "$run/$name"
    (cd "$run/$name" && atst-train finetune --config finetune-mini --data.manifest "$data/eval.csv" \
        --trainer.enable_progress_bar false "$@" > train.log 2>&1)
    echo "$name: $(grep -o 'test_accuracy *[0-9.]*' "$run/$name/train.log")"
}
python - "$run/random-mini" <<'PY'
import sys, torch
from atst_features import load_model, save_pretrained
from atst_features.model import ATSTModel
torch.manual_seed(0)
random_model = ATSTModel(load_model("atst-frame-mini", device="cpu").config)
save_pretrained(random_model, sys.argv[1], provenance={"source_file": "random weights, seed 0"})
PY
finetune pretrained
finetune pretrained-seed1 --seed_everything 1
finetune random --model.init "$run/random-mini"
finetune mixup --model.mixup true

best=$(ls "$run"/pretrained/runs/finetune-mini/checkpoints/epoch=*.ckpt)
atst-convert "$best" "$run/mini-tagger" --license cc-by-sa-4.0 --overwrite
atst-tag "$data"/eval/music/track17-71ba121d0e-0.flac "$data"/eval/eval-drums/VariBreaks-000.flac \
    "$data"/eval/nature_ambience/mudchute_cow_1-039c1bf579-0.flac --model "$run/mini-tagger" -k 3
