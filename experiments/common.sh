# Sourced by run_experiment.sh once PY is set: the tools next to PY, the
# work folders, the offline environment, and the fapm_lora recipe of the LoRA arm.
BIN=$(dirname "$PY")
FAPM="$BIN/fapm-merge"
MKY="$BIN/mergekit-yaml"
W=$(pwd)/experiments/work
D=$W/data
R=$W/results
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

# write_lora_recipe FILE PARAMETER_LINES: fapm_lora on the LoRA fine-tune, absolute paths
# (mergekit's model card asks the hub about short relative ones).
write_lora_recipe() {
  cat > "$1" <<RECIPE
merge_method: fapm_lora
base_model: $W/base
models:
  - model: $W/base
parameters:
  adapter: $W/ft_lora
$2
dtype: float32
RECIPE
}
