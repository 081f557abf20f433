#!/usr/bin/env bash
# Megatron checkpoints end to end, on CPU:
#   1. write the tiny-llama preset as a Hugging Face checkpoint,
#   2. convert it to megatron-core's distributed format (torch_dist),
#   3. generate from the Megatron checkpoint at CP=2 under torchrun, then under DeepSpeed's
#      launcher; both must give the same tokens.
#
#   bash examples/megatron_checkpoint.sh [OUT_DIR]     (PYTHON=... to pick the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-demo_out/megatron}
PY=${PYTHON:-.venv/bin/python}
BIN=$(dirname "$PY")
export OMP_NUM_THREADS=1
port() { "$PY" -c 'from cp_infer.distributed import free_port; print(free_port())'; }

# token ids only: the megatron checkpoint it converts to carries no tokenizer
"$PY" examples/make_tiny_checkpoint.py --preset tiny-llama --output "$OUT/hf" --no-tokenizer
"$PY" -m cp_infer convert --from hf --to megatron --input "$OUT/hf" --output "$OUT/mcore" --force
ARGS=(generate --checkpoint "$OUT/mcore" --cp 2 --input examples/prompts.jsonl --timeout 120)
"$BIN/torchrun" --standalone --nproc-per-node 2 -m cp_infer "${ARGS[@]}" --output "$OUT/torchrun.jsonl"
"$BIN/deepspeed" --num_gpus 2 --master_port "$(port)" --module cp_infer "${ARGS[@]}" \
    --output "$OUT/deepspeed.jsonl"
cmp "$OUT/torchrun.jsonl" "$OUT/deepspeed.jsonl"
echo "torchrun and deepspeed agree on the Megatron checkpoint: $OUT/torchrun.jsonl"
