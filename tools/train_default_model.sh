#!/usr/bin/env bash
# Trains the default model (tokred_jax/assets/glyph-llava) from nothing: the five stages
# of configs/glyph_llava.py, each resuming from its checkpoints when rerun.
#
#   bash tools/train_default_model.sh RUN_DIR [extra flags for every stage]
#
# glyph_vqa is generated on the fly (no build step); set DATA_DIR to read a TFDS copy
# built by `python -m tokred_jax.data.glyph_vqa --data_dir=DIR` instead. WORKERS sets
# grain's data worker processes (default 8). The dense model ends in RUN_DIR/finetune/export,
# the p-MoD variants in RUN_DIR/pmod/export (PRD cosine, mean kept ratio 0.5, from stage 3)
# and RUN_DIR/pmod-quarter/export (constant, mean 0.25 on every layer, from stage 4).
set -euo pipefail
run=${1:?usage: train_default_model.sh RUN_DIR [flags]}
shift
data=(--config.data.worker_count="${WORKERS:-8}")
if [[ -n "${DATA_DIR:-}" ]]; then data+=(--config.data.data_dir="$DATA_DIR"); fi
stage() {  # name, then the command; prints the stage's wall time
  local name=$1 start=$SECONDS
  shift
  "$@" "${data[@]}" --workdir="$run/$name"
  echo "stage $name: $((SECONDS - start)) s"
}
stage tower python -m tokred_jax.proj.glyph_vqa.tower_pretrain --config=configs/glyph_llava.py:tower "$@"
stage align python train.py --config=configs/glyph_llava.py:align \
  --config.model.checkpoint="$run/tower/export" "$@"
stage instruct python train.py --config=configs/glyph_llava.py:instruct \
  --config.model.checkpoint="$run/align/export" "$@"
stage finetune python train.py --config=configs/glyph_llava.py:finetune \
  --config.model.checkpoint="$run/instruct/export" "$@"
stage pmod python train.py --config=configs/glyph_llava.py:pmod \
  --config.model.checkpoint="$run/instruct/export" "$@"
stage pmod-quarter python train.py --config=configs/glyph_llava.py:pmod-constant@0.25 \
  --config.model.checkpoint="$run/finetune/export" "$@"
