#!/usr/bin/env bash
# The staged recipe: vocabulary adaptation -> data preparation -> align (new embeddings only) -> structured pruning
# to a target shape (PRUNE_METHOD: learned L0 masks, or one-shot importance / depth pruning then a recovery stage;
# dynamic loading, distillation) -> continual pretraining (optional distillation) -> knowledge replay ->
# evaluation of the base model and every stage's export (evaluate.py) -> report.
#
# Copy to train.sh and edit the variables below. Every stage reads the previous stage's plain Hugging Face directory
# and writes its own; a stage whose output exists is skipped on re-run (delete it to redo it), and an interrupted
# training stage resumes from its own checkpoints: re-running the script resumes the pipeline.
# With no edits it runs the embedded default: the bundled tiny Llama and corpus on 2 CPU processes, in minutes.
set -euo pipefail
cd "$(dirname "$0")"

# ---- what to run ------------------------------------------------------------------------------------------------
PROJECT_NAME=${PROJECT_NAME:-demo}
PARENT_SAVE_DIR=${PARENT_SAVE_DIR:-outputs/$PROJECT_NAME}            # everything this run writes
PARENT_TENSORBOARD_DIR=${PARENT_TENSORBOARD_DIR:-$PARENT_SAVE_DIR/tensorboard}
PRETRAINED_MODEL_PATH=${PRETRAINED_MODEL_PATH:-}                   # empty: build the bundled tiny Llama
NEW_DOMAIN_DATA=${NEW_DOMAIN_DATA:-colossal_shear/assets/corpus/zh.jsonl}   # the new language / domain (JSONL)
REPLAY_DATA=${REPLAY_DATA:-colossal_shear/assets/corpus}           # old + new domains for knowledge replay
NEW_PIECES=${NEW_PIECES:-}                                         # JSONL/text of pieces to add; empty: learn them
NUM_NEW_PIECES=${NUM_NEW_PIECES:-64}                               # pieces learned from NEW_DOMAIN_DATA
TARGET_SHAPE=${TARGET_SHAPE:-48,2,3,128}                          # hidden,heads,layers,intermediate[,kv] or config.json
NPROC_PER_NODE=${NPROC_PER_NODE:-2}
HOSTFILE=${HOSTFILE:-}                                             # empty: this machine only (see hostfile.example)
PLUGIN=${PLUGIN:-zero2}                                            # gemini, gemini_auto, zero2, zero2_cpu, 3d, ddp
PRECISION=${PRECISION:-fp32}                                       # bf16 on GPUs
MAX_LENGTH=${MAX_LENGTH:-128}
BATCH_SIZE=${BATCH_SIZE:-4}
ALIGN_STEPS=${ALIGN_STEPS:-10}
PRUNE_STEPS=${PRUNE_STEPS:-60}                                     # l0: target ramp 40%, hardening 30%, then fixed masks
# How the model is pruned to TARGET_SHAPE (docs/pruning.md; the prune stage's output is prune/export either way):
#   l0          learned hard-concrete masks (Sheared-LLaMA), PRUNE_STEPS steps of train.py --stage prune
#   importance  prune.py --method importance (Minitron activations, calibrated on the replay data), then PRUNE_STEPS
#               steps of recovery training
#   depth       prune.py --method depth --match_params (whole layers: as many as give the target's parameter
#               count), then the same recovery
# Default importance: the best measured on SmolLM2-135M at every budget (docs/benchmarks.md, pruning quality), 0.97
# nats ahead of l0 at 150 steps, 0.50 at 400 and 0.43 at 1000: l0 closes the gap slowly, and is for long runs
# (Sheared-LLaMA: thousands of prune steps).
# A finished prune stage is kept: to switch methods after it ran, delete $PARENT_SAVE_DIR/prune (and the stages after).
PRUNE_METHOD=${PRUNE_METHOD:-importance}
# Distil the prune stage (l0 from the parent, --teacher parent; one-shot from the aligned model): 1, 0, or auto: on when
# the stage trains on at least PRUNE_KD_MIN_TOKENS tokens (PRUNE_STEPS x BATCH_SIZE x MAX_LENGTH x processes). Measured
# on SmolLM2-135M (docs/benchmarks.md, pruning quality): distillation lost at 9,600 tokens, won at 25,600 and 64,000.
PRUNE_KD=${PRUNE_KD:-auto}
PRUNE_KD_MIN_TOKENS=${PRUNE_KD_MIN_TOKENS:-16384}
PRUNE_KD_WEIGHT=${PRUNE_KD_WEIGHT:-1.0}                            # --kd_weight of the prune stage
PRUNE_KD_TEMPERATURE=${PRUNE_KD_TEMPERATURE:-1.0}                  # --kd_temperature
PRUNE_LM_WEIGHT=${PRUNE_LM_WEIGHT:-}  # --lm_weight; empty: 1 for l0 (the parent moves with the weights), 0 (KL only) else
CALIBRATION_SAMPLES=${CALIBRATION_SAMPLES:-512}                    # importance / depth: calibration sequences
STOP_AFTER=${STOP_AFTER:-}           # align|prune|continue|replay: stop after that training stage (tests, staged jobs)
CONTINUE_STEPS=${CONTINUE_STEPS:-20}
REPLAY_STEPS=${REPLAY_STEPS:-20}
USE_TEACHER=${USE_TEACHER:-1}                                      # distil the continue stage from the aligned model
EVAL_TASKS=${EVAL_TASKS-piqa}                                      # evaluate.py --tasks (e.g. piqa,arc_easy,hellaswag); empty: none
EVAL_LIMIT=${EVAL_LIMIT-20}                                        # documents per task; empty: the full validation sets
EVAL_TEXTS=${EVAL_TEXTS-$NEW_DOMAIN_DATA}                          # nats/char per category (comma-separated files); empty: none
PYTHON=${PYTHON:-python}

case "$PRUNE_METHOD" in l0|importance|depth) ;;
  *) echo "error: PRUNE_METHOD=$PRUNE_METHOD: must be l0, importance or depth" >&2; exit 2 ;; esac
case "$STOP_AFTER" in ''|align|prune|continue|replay) ;;
  *) echo "error: STOP_AFTER=$STOP_AFTER: must be empty, align, prune, continue or replay" >&2; exit 2 ;; esac
case "$PRUNE_KD" in 0|1|auto) ;;
  *) echo "error: PRUNE_KD=$PRUNE_KD: must be 0, 1 or auto" >&2; exit 2 ;; esac
if [ "$PRUNE_KD" = auto ]; then  # the rule from the user's budget (above)
  HOSTS=1; [ -n "$HOSTFILE" ] && HOSTS=$(grep -cv '^[[:space:]]*\(#\|$\)' "$HOSTFILE" || true)
  [ "${HOSTS:-0}" -ge 1 ] || { echo "error: HOSTFILE=$HOSTFILE: no host names in it" >&2; exit 2; }
  PRUNE_TOKENS=$((PRUNE_STEPS * BATCH_SIZE * MAX_LENGTH * NPROC_PER_NODE * HOSTS))
  PRUNE_KD=0; [ "$PRUNE_TOKENS" -ge "$PRUNE_KD_MIN_TOKENS" ] && PRUNE_KD=1
  echo "PRUNE_KD=auto: the prune stage trains on $PRUNE_TOKENS tokens, distillation $([ "$PRUNE_KD" = 1 ] && echo on || echo off) (on from $PRUNE_KD_MIN_TOKENS)"
fi

LAUNCH=(colossalai run --nproc_per_node "$NPROC_PER_NODE" --master_port "${MASTER_PORT:-29511}")
[ -n "$HOSTFILE" ] && LAUNCH+=(--hostfile "$HOSTFILE")
mkdir -p "$PARENT_SAVE_DIR"
say() { printf '\n=== %s\n' "$*"; }

# ---- 0. the base model ------------------------------------------------------------------------------------------
if [ -z "$PRETRAINED_MODEL_PATH" ]; then
  PRETRAINED_MODEL_PATH=$PARENT_SAVE_DIR/base/tiny-llama
  if [ -f "$PRETRAINED_MODEL_PATH/config.json" ]; then echo "bundled base model: done ($PRETRAINED_MODEL_PATH)"
  else say "bundled base model"; $PYTHON -m colossal_shear.bundled "$PARENT_SAVE_DIR/base"; fi
fi

# ---- 1. vocabulary adaptation: expand the tokenizer, resize the model ---------------------------------------------
VOCAB=$PARENT_SAVE_DIR/vocab
if [ ! -f "$VOCAB/model/config.json" ]; then
  say "vocabulary adaptation"
  if [ -n "$NEW_PIECES" ]; then PIECES=(--expand_tokens_file "$NEW_PIECES")
  else PIECES=(--learn_from_corpus "$NEW_DOMAIN_DATA" --num_new_pieces "$NUM_NEW_PIECES"); fi
  $PYTHON tokenizer/init_tokenizer.py --source_tokenizer_dir "$PRETRAINED_MODEL_PATH" \
    --target_tokenizer_dir "$VOCAB/tokenizer" "${PIECES[@]}" --eval_file "$NEW_DOMAIN_DATA" --overwrite --no_progress
  $PYTHON tokenizer/init_model.py --source_model_and_tokenizer_path "$PRETRAINED_MODEL_PATH" \
    --target_tokenizer_path "$VOCAB/tokenizer" --target_model_path "$VOCAB/model" --overwrite
fi

# ---- 2. data preparation (with the adapted tokenizer) -------------------------------------------------------------
prepare() {  # input, output
  if [ ! -f "$2/manifest.json" ]; then
    $PYTHON data_prep/prepare_pretrain_dataset.py --data_input_dirs "$1" --tokenizer_dir "$VOCAB/model" \
      --data_output_dirs "$2" --max_length "$MAX_LENGTH" --num_spliced_dataset_bins 4 --num_proc 2 --no_progress
  fi
}
say "data preparation"
prepare "$NEW_DOMAIN_DATA" "$PARENT_SAVE_DIR/data/new"
prepare "$REPLAY_DATA" "$PARENT_SAVE_DIR/data/replay"

# ---- 3..6. training stages ----------------------------------------------------------------------------------------
stage() {  # name[:train.py stage, when it differs], input model, dataset, steps, extra flags...
  local name=${1%%:*} kind=${1#*:} model=$2 data=$3 steps=$4; shift 4
  local out=$PARENT_SAVE_DIR/$name
  if [ -f "$out/export/config.json" ]; then echo "stage $name: done ($out/export)"; return; fi
  say "stage $name"
  local resume=()
  [ -f "$out/checkpoints/latest" ] && resume=(--load_checkpoint "$out/checkpoints")
  "${LAUNCH[@]}" train.py --stage "$kind" --pretrained "$model" --dataset "$data" --eval_dataset "$data" \
    --plugin "$PLUGIN" --mixed_precision "$PRECISION" --batch_size "$BATCH_SIZE" --max_steps "$steps" \
    --save_dir "$out/checkpoints" --save_interval 10 --log_interval 5 \
    --tensorboard_dir "$PARENT_TENSORBOARD_DIR/$name" \
    --export_dir "$out/export" "${resume[@]}" "$@"
}
stop_after() { if [ "$STOP_AFTER" = "$1" ]; then echo "STOP_AFTER=$1: stopping after stage $1"; exit 0; fi; }
REPLAY=$PARENT_SAVE_DIR/data/replay
ALIGNED=$PARENT_SAVE_DIR/align/export
stage align "$VOCAB/model" "$PARENT_SAVE_DIR/data/new" "$ALIGN_STEPS" --lr 1e-2 --warmup_steps 2
stop_after align

# the prune stage: whatever the method, PRUNE_STEPS steps on the replay data (dynamic loading) end in prune/export
PRUNE_KD_ARGS=()
if [ "$PRUNE_KD" = 1 ]; then
  if [ "$PRUNE_METHOD" = l0 ]; then KD_FROM=parent; LM_DEFAULT=1.0; else KD_FROM=$ALIGNED; LM_DEFAULT=0.0; fi
  PRUNE_KD_ARGS=(--teacher "$KD_FROM" --kd_weight "$PRUNE_KD_WEIGHT" --kd_temperature "$PRUNE_KD_TEMPERATURE"
    --lm_weight "${PRUNE_LM_WEIGHT:-$LM_DEFAULT}")
fi
PRUNE_DATA=(--eval_interval 50 --dynamic_loading --reference_model "$ALIGNED")
if [ "$PRUNE_METHOD" = l0 ]; then
  stage prune "$ALIGNED" "$REPLAY" "$PRUNE_STEPS" --lr 1e-3 --warmup_steps 2 --target_shape "$TARGET_SHAPE" \
    "${PRUNE_DATA[@]}" "${PRUNE_KD_ARGS[@]}"
else
  ONESHOT=$PARENT_SAVE_DIR/prune/oneshot-$PRUNE_METHOD
  if [ ! -f "$PARENT_SAVE_DIR/prune/export/config.json" ] && [ ! -f "$ONESHOT/config.json" ]; then
    say "one-shot pruning ($PRUNE_METHOD)"
    DEPTH=(); [ "$PRUNE_METHOD" = depth ] && DEPTH=(--match_params)
    $PYTHON prune.py --method "$PRUNE_METHOD" --pretrained "$ALIGNED" --target_shape "$TARGET_SHAPE" "${DEPTH[@]}" \
      --calibration_dataset "$REPLAY" --num_calibration_samples "$CALIBRATION_SAMPLES" \
      --calibration_length "$MAX_LENGTH" --output_dir "$ONESHOT" --overwrite
  fi
  stage prune:continue "$ONESHOT" "$REPLAY" "$PRUNE_STEPS" --lr 1e-3 --warmup_steps 2 \
    "${PRUNE_DATA[@]}" "${PRUNE_KD_ARGS[@]}"
fi
stop_after prune

TEACHER=()
[ "$USE_TEACHER" = 1 ] && TEACHER=(--teacher "$ALIGNED" --kd_weight 0.5 --kd_temperature 1.0)
stage continue "$PARENT_SAVE_DIR/prune/export" "$PARENT_SAVE_DIR/data/new" "$CONTINUE_STEPS" --lr 3e-3 \
  --warmup_steps 2 "${TEACHER[@]}"
stop_after continue
stage replay "$PARENT_SAVE_DIR/continue/export" "$REPLAY" "$REPLAY_STEPS" --lr 1e-3 --warmup_steps 2
stop_after replay

# ---- 7. evaluation: the base model and every stage's export --------------------------------------------------------
EVAL_ARGS=()
[ -n "$EVAL_TASKS" ] && EVAL_ARGS+=(--tasks "$EVAL_TASKS")
[ -n "$EVAL_TASKS" ] && [ -n "$EVAL_LIMIT" ] && EVAL_ARGS+=(--limit "$EVAL_LIMIT")
[ -n "$EVAL_TEXTS" ] && EVAL_ARGS+=(--text_eval "$EVAL_TEXTS")
EVALS=()
evaluate() {  # name, model directory
  local out=$PARENT_SAVE_DIR/eval/$1.json
  [ ${#EVAL_ARGS[@]} -eq 0 ] && return
  EVALS+=("$1=$out")
  if [ -f "$out" ]; then echo "eval $1: done ($out)"; return; fi
  say "evaluate $1"
  $PYTHON evaluate.py --model "$2" "${EVAL_ARGS[@]}" --output "$out" --no_progress
}
evaluate base "$PRETRAINED_MODEL_PATH"
for name in align prune continue replay; do evaluate "$name" "$PARENT_SAVE_DIR/$name/export"; done

# ---- 8. the run report ----------------------------------------------------------------------------------------------
say "report"
$PYTHON -m colossal_shear.report --tensorboard_dir "$PARENT_TENSORBOARD_DIR" --out "$PARENT_SAVE_DIR" \
  --models "before pruning=$ALIGNED" "after pruning=$PARENT_SAVE_DIR/prune/export" \
  --tokenizers "before vocab change=$PRETRAINED_MODEL_PATH" "after vocab change=$VOCAB/model" \
  --eval_texts "$NEW_DOMAIN_DATA" ${EVALS[@]+--evals "${EVALS[@]}"}
echo "final model: $PARENT_SAVE_DIR/replay/export"
