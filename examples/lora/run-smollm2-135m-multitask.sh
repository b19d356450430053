#!/usr/bin/env bash
# Two LoRA adapters in one GRPO run on one frozen SmolLM2-135M-Instruct, on the CPU:
# task "add" ("What is a + b?") and task "sub" ("What is a - b?"), a, b in 0..20.
# What `make demo-multitask` runs; the same model and flags as run-smollm2-135m-lora.sh, with
# --lora-tasks in place of --prompt-data/--eval-prompt-data. Adapters: $OUT/lora/{add,sub}/adapter.
# Extra arguments go to train.py (e.g. --num-rollout 5).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
OUT="${OUT:-$ROOT/outputs/smollm2-135m-lora-multitask}"

MODEL="$("$PY" tools/prepare_model.py smollm2-135m-instruct)"   # once; cached under ~/.cache/slime
for OP in add sub; do
   "$PY" tools/make_arith_data.py --out-dir "$OUT/data-$OP" --op "$OP" --seed 0 --n-train 2000 --n-eval 100 >/dev/null
done
# One entry per task: its adapter's name, prompts, reward and held-out set (docs/multitask.md).
cat > "$OUT/tasks.yaml" <<YAML
tasks:
  - name: add
    prompt_data: $OUT/data-add/train.jsonl
    rm_type: math
    eval_prompt_data: $OUT/data-add/eval.jsonl
  - name: sub
    prompt_data: $OUT/data-sub/train.jsonl
    rm_type: math
    eval_prompt_data: $OUT/data-sub/eval.jsonl
YAML

MODEL_ARGS=(--hf-checkpoint "$MODEL")
LORA_ARGS=(
   --use-lora
   --lora-r 16
   --lora-alpha 32
   --lora-dropout 0.0
   --lora-target-modules linear_qkv linear_proj linear_fc1 linear_fc2
   --lora-tasks "$OUT/tasks.yaml"
)
ROLLOUT_ARGS=(
   --apply-chat-template
   --rollout-batch-size 8
   --n-samples-per-prompt 4
   --rollout-max-response-len 48
   --rollout-temperature 1.0
   --num-rollout "${NUM_ROLLOUT:-28}"
)
EVAL_ARGS=(
   --eval-interval "${EVAL_INTERVAL:-7}"
   --eval-temperature 0
   --eval-max-response-len 48
)
TRAIN_ARGS=(
   --advantage-estimator grpo
   --lr "${LR:-1e-4}"
   --clip-grad 1.0
   --max-tokens-per-micro-batch 256
   --seed 1234
)
exec "$PY" train.py "${MODEL_ARGS[@]}" "${LORA_ARGS[@]}" "${ROLLOUT_ARGS[@]}" "${EVAL_ARGS[@]}" "${TRAIN_ARGS[@]}" \
   --save "$OUT/lora" --log-dir "$OUT" "$@"
