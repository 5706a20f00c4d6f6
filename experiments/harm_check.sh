#!/usr/bin/env bash
# Harm check for the compare study (issue #10: "no significant harm on the other
# benchmarks"): the study trains and evaluates on SciQ only, so every finished cell's
# trained model is evaluated here on ARC-Challenge and CommonsenseQA test (LIMIT items
# each, default 150), in the study's answer form and the published fp32 precision, beside
# the base model. Read ll_acc / ll_norm_acc: in the open-answer form a one-word answer rarely
# names an ARC-C option (sentences), so generative accuracy there is mostly unparsed (tried:
# `LIMIT=4 experiments/harm_check.sh sft-s42`). The cells are not touched: each evaluation has its own artifacts root,
# artifacts/harm/<cell>, holding a copy of the cell's trained adapter; metrics land in
# metrics/harm/<cell>/. Every stage is cached, so a rerun only evaluates new cells.
# Paired differences: python experiments/paired.py \
#   artifacts/harm/base/eval/base/predictions/arc_challenge.jsonl \
#   artifacts/harm/<cell>/eval/recipes/<recipe>/predictions/arc_challenge.jsonl
#   experiments/harm_check.sh                 # every finished cell
#   LIMIT=20 experiments/harm_check.sh sft-s42  # named cells
set -euo pipefail
cd "$(dirname "$0")/.."
UNISD=${UNISD:-.venv/bin/unisd}
STUDY=artifacts/study/compare
# eval.ppl off: harm is read on ll_acc; the perplexities and the JSD to the base model would
# double each evaluation's cost (two models' full distributions) for what it does not decide.
COMMON=(--set 'data.benchmarks=[arc_challenge,commonsense_qa]' --set "eval.limit=${LIMIT:-150}"
        --set prompts.mcq_format=open_answer --set eval.ppl=false)
stages() {  # root, then extra args: the model and data of that root, then the evaluation
  local root=$1; shift
  for stage in model prepare; do "$UNISD" "$stage" --set paths.artifacts="$root" "${COMMON[@]}"; done
  "$UNISD" evaluate --set paths.artifacts="$root" "${COMMON[@]}" "$@"
}
stages artifacts/harm/base --set paths.metrics=metrics/harm/base
cells=("$@"); [ $# -gt 0 ] || cells=($(ls "$STUDY"))
for cell in "${cells[@]}"; do
  recipe=${cell%-s[0-9]*}
  trained="$STUDY/$cell/runs/$recipe/round-1/train"
  [ "$recipe" != base ] || continue
  [ -f "$trained/manifest.json" ] || { echo "$cell: not trained yet, skipped"; continue; }
  root=artifacts/harm/$cell
  if [ ! -d "$root/runs/$recipe/round-1/train" ]; then
    mkdir -p "$root/runs/$recipe/round-1"
    cp -r "$trained" "$root/runs/$recipe/round-1/train.tmp"
    mv "$root/runs/$recipe/round-1/train.tmp" "$root/runs/$recipe/round-1/train"
  fi
  stages "$root" --trained --set recipe="$recipe" --set paths.metrics="metrics/harm/$cell"
done
