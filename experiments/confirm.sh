#!/usr/bin/env bash
# A larger evaluation of the points the verdicts of docs/experiments.md rest on.
# Usage: experiments/confirm.sh [PYTHON]   (after `make experiment`; ~15 min on 2 cores)
#
# The main protocol scores 100 test prompts and 2 windows of 512 tokens per text, for
# the CPU budget of ~70 evaluations. Here the few points that decide the verdicts are
# merged again from the same fine-tunes and scored on all 400 prepared test prompts and
# 8 windows per text: base, both fine-tunes, FAPM vs magnitude at 0.9 (full arm), and
# FAPM at 0.1 vs magnitude at 0.9 and WiSE-FT at alpha 0.5/0.7 (LoRA arm). Results go
# to experiments/work/results/confirm-*.jsonl and the table to confirm-table.md; the
# docs are not touched (docs/experiments.md quotes this table by hand).
set -euo pipefail
PY=${1:-python}
source "$(dirname "$0")/common.sh"
C=$W/confirm
[ -f "$W/ft_lora/adapter_config.json" ] || { echo "run make experiment first" >&2; exit 1; }
N=${CONFIRM_N:-400}
WINDOWS=${CONFIRM_WINDOWS:-8}
head -n "$N" "$D/rt_test_eval.jsonl" > "$D/rt_test_confirm.jsonl"
EVAL_TEXT=(--window 512 --max-tokens $((512 * WINDOWS)) --batch-size 2 --no-bos)
mkdir -p "$C"

# The same recipes as stages 4a and 6/6b (sweep and fapm_lora), into confirm/.
lora() {  # NAME PARAMETER_LINES
  [ -f "$C/$1/config.json" ] && return 0
  write_lora_recipe "$C/$1.yml" "$2"
  "$MKY" "$C/$1.yml" "$C/$1" --no-write-model-card --quiet
}
lora lora-fapm-s0.0 "  sparsity: 0.0"
lora lora-fapm-s0.1 "  sparsity: 0.1"
lora lora-magnitude-s0.9 "  sparsity: 0.9
  beta: 0.0"
lora lora-wiseft-a0.5 "  sparsity: 0.0
  lambda: 0.5"
lora lora-wiseft-a0.7 "  sparsity: 0.0
  lambda: 0.7"
[ -f "$C/sweep-confirm/sweep.json" ] || { rm -rf "$C/sweep-confirm"; "$FAPM" sweep "$W/fapm_full.yml" "$C/sweep-confirm" --sparsity 0.9 --baselines magnitude; }

MODELS=("$W/base" "$W/ft_full" "$C/sweep-confirm/fapm-s0.9" "$C/sweep-confirm/magnitude-s0.9"
        "$C/lora-fapm-s0.0" "$C/lora-fapm-s0.1" "$C/lora-magnitude-s0.9" "$C/lora-wiseft-a0.5" "$C/lora-wiseft-a0.7")
rm -f "$R/confirm-main.jsonl" "$R/confirm-lee.jsonl"
"$FAPM" eval "${MODELS[@]}" --text "$D/wiki.txt" --task "$D/rt_test_confirm.jsonl" --no-bos "${EVAL_TEXT[@]}" --out "$R/confirm-main.jsonl"
"$FAPM" eval "${MODELS[@]}" --text "$D/lee.txt" "${EVAL_TEXT[@]}" --out "$R/confirm-lee.jsonl"
"$PY" experiments/report.py --work "$W" --prefix confirm-
rm -rf "$C"
