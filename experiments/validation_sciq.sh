#!/usr/bin/env bash
# Self-distillation on SciQ validation (issue #10's tuning, new evaluation protocol):
# SciQ only, all 500 train items, 200 validation items, answer_first format, the teacher's
# demonstration as an earlier assistant turn (TEMPLATE, default assistant_turn). Each
# recipe's metrics land in metrics/tune/v2/<recipe>/trained.json (the base model's in
# .../base.json); every stage is cached, so a rerun only computes what is missing. Tuning
# evaluates in bf16 (cheaper; base and trained alike); published test numbers use fp32.
# FORMAT sets prompts.mcq_format (default answer_first; answer_prefilled adds "-prefilled" to V,
# open_answer "-open_answer").
# SET adds overrides to every run (a budget, say) and TAG names them in V ("-<TAG>").
#   TEMPLATE=prior_exchange experiments/validation_sciq.sh sd   # the layout added after v2
#   TEMPLATE=worked_example FORMAT=answer_prefilled experiments/validation_sciq.sh sd
#   TEMPLATE=worked_example FORMAT=open_answer experiments/validation_sciq.sh sd sft
#   TAG=lr3e-4-e3 SET="--set train.lr=3e-4 --set train.epochs=3" experiments/validation_sciq.sh sft sd
#   experiments/validation_sciq.sh unisd-full sft sd     # recipes, in order
#   experiments/validation_sciq.sh scaled                # unisd-full, mechanisms scaled to ~60 steps
set -euo pipefail
cd "$(dirname "$0")/.."
UNISD=${UNISD:-.venv/bin/unisd}
V=v2; [ "${TEMPLATE:-assistant_turn}" = assistant_turn ] || V="v3-${TEMPLATE}"
FORMAT=${FORMAT:-answer_first}; [ "$FORMAT" = answer_first ] || V="$V-${FORMAT#answer_}"
[ -z "${TAG:-}" ] || V="$V-$TAG"
read -r -a EXTRA <<< "${SET:-}"
COMMON=(--set eval.split=validation --set eval.limit=200 --set 'data.benchmarks=[sciq]' --set train_set.limit=0
        --set eval.ppl=false --set eval.bf16_autocast=true --set prompts.teacher_template=${TEMPLATE:-assistant_turn} --set prompts.mcq_format=$FORMAT "${EXTRA[@]}")
# EMA every 4 of ~62 steps, agreement weights that differ (gamma 0.1) and drop the 20% least
# agreed trajectories, adaptive clipping at the 99th percentile of per-token divergence
SCALED='{agreement: {gamma: 0.1, filter_quantile: 0.8}, teacher: {ema_every: 4, ema_beta: 0.9}, clip: {mode: quantile, q: 0.99}}'
for r in "$@"; do
  if [ "$r" = scaled ]; then
    "$UNISD" run --set recipe=unisd-full --set run.name=unisd-full-scaled --set "components=$SCALED" \
      --set paths.metrics=metrics/tune/$V/scaled --set paths.artifacts=artifacts/tune/$V-scaled "${COMMON[@]}"
  else
    "$UNISD" run --set recipe="$r" --set paths.metrics=metrics/tune/$V/$r --set paths.artifacts=artifacts/tune/$V "${COMMON[@]}"
  fi
done
