#!/usr/bin/env bash
# The whole replication (docs/experiments.md): assets -> fine-tunes -> sweeps -> eval -> report.
# Usage: experiments/run_experiment.sh [PYTHON]   (`make experiment` passes .venv/bin/python)
# Every stage skips work whose output already exists, so an interrupted run resumes;
# `rm -rf experiments/work` starts from scratch. Work products stay in experiments/work
# (git-ignored); only docs/experiments.md's numbers and docs/images/ come from here.
set -euo pipefail
PY=${1:-python}
BIN=$(dirname "$PY")
FAPM="$BIN/fapm-merge"
MKY="$BIN/mergekit-yaml"
W=$(pwd)/experiments/work
D=$W/data
R=$W/results
mkdir -p "$R"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
SEED=0
SPARSITIES=0.5,0.7,0.8,0.9,0.95,0.99
ALPHAS=0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9
LORA_SPARSITIES="0.0 0.1 0.3 0.5 0.7 0.9"
# Evaluation sizes, chosen for the CPU budget (docs/experiments.md, "Caveats"):
# 150 test prompts scored by exact match of the greedy answer token, and the
# first 3 windows of 512 tokens of each general text.
EVAL_TEXT=(--window 512 --max-tokens 1536 --batch-size 3 --no-bos)
EVAL_TASK=(--task "$D/rt_test_eval.jsonl" --no-bos)

T0=$(date +%s)
stamp() { echo "[$(date +%H:%M:%S)] +$(( $(date +%s) - T0 ))s $*"; }

# evaluate MODEL... : task accuracy + Wikipedia loss in one record, Lee text in a second file
evaluate() {
  "$FAPM" eval "$@" --text "$D/wiki.txt" "${EVAL_TASK[@]}" "${EVAL_TEXT[@]}" --out "$R/main.jsonl"
  "$FAPM" eval "$@" --text "$D/lee.txt" "${EVAL_TEXT[@]}" --out "$R/lee.jsonl"
}
done_mark() { [ -f "$R/$1.done" ]; }
mark() { echo "$(( $(date +%s) - T0 ))" > "$R/$1.done"; }

stamp "stage 1: assets -> plain safetensors model and data files"
"$PY" experiments/prepare_assets.py --work "$W" --seed $SEED

stamp "stage 2: full fine-tune"
"$PY" experiments/finetune.py --base "$W/base" --train "$D/rt_train.jsonl" --out "$W/ft_full" \
  --mode full --lr 1e-4 --steps 72 --warmup 6 --seed $SEED

stamp "stage 3: evaluate base and full fine-tune"
done_mark refs || { evaluate "$W/base" "$W/ft_full"; mark refs; }

# A recipe per arm; absolute paths (mergekit's model card asks the hub about short relative ones).
cat > "$W/fapm_full.yml" <<EOF
merge_method: fapm
base_model: $W/base
models:
  - model: $W/ft_full
dtype: float32
EOF

stamp "stage 4: sweep FAPM, magnitude, DARE seed 0, WiSE-FT (one pass), evaluate, delete weights"
if ! done_mark sweep0; then
  rm -rf "$W/sweep0"
  "$FAPM" sweep "$W/fapm_full.yml" "$W/sweep0" --sparsity $SPARSITIES \
    --baselines magnitude,dare,wiseft --alpha $ALPHAS --seed $SEED
  evaluate "$W/sweep0"
  rm -rf "$W/sweep0"; mark sweep0
fi
for s in 1 2; do
  stamp "stage 4.$s: DARE seed $s"
  if ! done_mark dare$s; then
    rm -rf "$W/sweep$s"
    # The sweep always writes the FAPM points too; only the DARE ones are new.
    "$FAPM" sweep "$W/fapm_full.yml" "$W/sweep$s" --sparsity $SPARSITIES --baselines dare --seed $s
    evaluate "$W"/sweep$s/dare-*
    rm -rf "$W/sweep$s"; mark dare$s
  fi
done

stamp "stage 5: LoRA fine-tune"
"$PY" experiments/finetune.py --base "$W/base" --train "$D/rt_train.jsonl" --out "$W/ft_lora" \
  --mode lora --lr 1e-3 --steps 72 --warmup 6 --lora-r 16 --lora-alpha 32 --seed $SEED
stamp "stage 6: LoRA arm through the native adapter path (merge_method: fapm_lora)"
for s in $LORA_SPARSITIES; do
  name=lora-fapm-s$s
  done_mark "$name" && continue
  cat > "$W/$name.yml" <<EOF
merge_method: fapm_lora
base_model: $W/base
models:
  - model: $W/base
parameters:
  adapter: $W/ft_lora
  sparsity: $s
dtype: float32
EOF
  rm -rf "$W/$name"
  "$MKY" "$W/$name.yml" "$W/$name" --no-write-model-card --quiet
  evaluate "$W/$name"
  rm -rf "$W/$name"; mark "$name"
done

stamp "stage 7: report (table, plots)"
"$PY" experiments/report.py --work "$W" --docs docs
stamp "done: total $(( $(date +%s) - T0 )) s"
echo "$(( $(date +%s) - T0 ))" > "$R/total_seconds"
