#!/usr/bin/env bash
# ZO2's MeZO-runner invocation on zo2: the same environment variables, run by `zo2 finetune` through ZO2
# run.py's flag names (aliases of zo2 finetune's own flags; see docs/guides/migration.md).
#
#   MODEL=path/to/opt-2.7b TASK=SST2 MODE=ft LR=1e-7 EPS=1e-3 STEPS=20000 EVAL_STEPS=4000 bash mezo.sh
#
# MODEL is a local Hugging Face folder (e.g. `hf download facebook/opt-2.7b --local-dir opt-2.7b`).
# MODE: ft (all parameters) or lora. Extra arguments are passed on (e.g. --working_device cpu).
set -euo pipefail

MODEL=${MODEL:-facebook/opt-1.3b}
MODEL_NAME=$(basename "$MODEL")
TASK=${TASK:-SST2}
BS=${BS:-16}
LR=${LR:-1e-5}
EPS=${EPS:-1e-3}
SEED=${SEED:-0}
TRAIN=${TRAIN:-1000}
EVAL=${EVAL:-1000}
STEPS=${STEPS:-20000}
EVAL_STEPS=${EVAL_STEPS:-4000}
MODE=${MODE:-ft}
ZO2=${ZO2:-zo2}  # the command that runs zo2 (e.g. "python -m zo2")

EXTRA_ARGS=()
case $MODE in
    ft) ;;
    lora) EXTRA_ARGS+=(--lora) ;;
    *) echo "MODE=$MODE: use ft or lora (prefix tuning is not supported by zo2)" >&2; exit 2 ;;
esac

# MeZO trains Copa, ReCoRD, SQuAD and DROP on the answer's LM loss, the others as classification
CLASSIFY=True
case $TASK in
    Copa|ReCoRD|SQuAD|DROP) CLASSIFY=False ;;
esac

TAG=mezo-$MODE-$STEPS-$BS-$LR-$EPS-$SEED
echo "$TAG: BS $BS, LR $LR, EPS $EPS, SEED $SEED, steps $STEPS (eval every $EVAL_STEPS), mode $MODE"

$ZO2 finetune \
    --model_name "$MODEL" \
    --task_name "$TASK" \
    --output_dir "result/$TASK-$MODEL_NAME-$TAG" --train_set_seed "$SEED" --num_train "$TRAIN" --num_eval "$EVAL" \
    --max_steps "$STEPS" \
    --trainer zo --load_float16 \
    --learning_rate "$LR" --zo_eps "$EPS" --per_device_train_batch_size "$BS" --lr_scheduler_type constant \
    --load_best_model_at_end --save_total_limit 1 \
    --eval_steps "$EVAL_STEPS" --save_steps "$EVAL_STEPS" \
    --train_as_classification "$CLASSIFY" \
    ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"} \
    "$@"
