#!/usr/bin/env bash
# The staged recipe. Copy to train.sh and edit the variables; every stage reads and writes plain Hugging Face
# directories, and a stage whose output already exists is skipped on re-run (delete it to redo it).
# With no edits it runs the embedded default: the bundled tiny Llama and corpus, on 2 CPU processes, in minutes.
set -euo pipefail
cd "$(dirname "$0")"

PROJECT_NAME=${PROJECT_NAME:-demo}
PARENT_SAVE_DIR=${PARENT_SAVE_DIR:-outputs/$PROJECT_NAME}            # checkpoints, exports and prepared data
PARENT_TENSORBOARD_DIR=${PARENT_TENSORBOARD_DIR:-$PARENT_SAVE_DIR/tensorboard}
PARENT_CONFIG_FILE=${PARENT_CONFIG_FILE:-$PARENT_SAVE_DIR/configs}  # effective config of each stage (JSON)
PRETRAINED_MODEL_PATH=${PRETRAINED_MODEL_PATH:-}                   # empty: build the bundled tiny Llama
DATASET_INPUTS=${DATASET_INPUTS:-colossal_shear/assets/corpus}     # comma-separated JSONL dirs or files
NPROC_PER_NODE=${NPROC_PER_NODE:-2}
HOSTFILE=${HOSTFILE:-}                                             # empty: this machine only
PLUGIN=${PLUGIN:-zero2}
PRECISION=${PRECISION:-fp32}                                       # bf16 on GPUs
MAX_LENGTH=${MAX_LENGTH:-128}
STEPS=${STEPS:-20}

PYTHON=${PYTHON:-python}
LAUNCH=(colossalai run --nproc_per_node "$NPROC_PER_NODE" --master_port "${MASTER_PORT:-29511}")
[ -n "$HOSTFILE" ] && LAUNCH+=(--hostfile "$HOSTFILE")
mkdir -p "$PARENT_SAVE_DIR" "$PARENT_CONFIG_FILE"

# 0. the base model (bundled default)
if [ -z "$PRETRAINED_MODEL_PATH" ]; then
  $PYTHON -m colossal_shear.bundled "$PARENT_SAVE_DIR/base"
  PRETRAINED_MODEL_PATH=$PARENT_SAVE_DIR/base/tiny-llama
fi

# 1. data preparation: JSONL -> packed, bucketed Arrow
DATA=$PARENT_SAVE_DIR/data
if [ ! -f "$DATA/manifest.json" ]; then
  $PYTHON data_prep/prepare_pretrain_dataset.py --data_input_dirs "$DATASET_INPUTS" \
    --tokenizer_dir "$PRETRAINED_MODEL_PATH" --data_output_dirs "$DATA" --max_length "$MAX_LENGTH" \
    --num_spliced_dataset_bins 4 --num_proc 2
fi

# 2. continual pretraining (resumes from its own checkpoints if interrupted)
STAGE=continue
OUT=$PARENT_SAVE_DIR/$STAGE
if [ ! -f "$OUT/export/config.json" ]; then
  RESUME=()
  [ -f "$OUT/checkpoints/latest" ] && RESUME=(--load_checkpoint "$OUT/checkpoints")
  "${LAUNCH[@]}" train.py --stage "$STAGE" --pretrained "$PRETRAINED_MODEL_PATH" --dataset "$DATA" \
    --eval_dataset "$DATA" --plugin "$PLUGIN" --mixed_precision "$PRECISION" --batch_size 4 --max_steps "$STEPS" \
    --lr 3e-3 --warmup_steps 2 --save_interval 10 --log_interval 5 --save_dir "$OUT/checkpoints" \
    --tensorboard_dir "$PARENT_TENSORBOARD_DIR/$STAGE" --config_file "$PARENT_CONFIG_FILE/$STAGE.json" \
    --export_dir "$OUT/export" "${RESUME[@]}"
fi

echo "final model: $OUT/export"
