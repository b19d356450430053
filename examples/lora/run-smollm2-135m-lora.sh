#!/usr/bin/env bash
# LoRA GRPO on SmolLM2-135M-Instruct, on the CPU: "What is a + b?" with a, b in 0..20.
# What `make demo` runs. Extra arguments go to train.py (e.g. --num-rollout 5, --save DIR).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
OUT="${OUT:-$ROOT/outputs/smollm2-135m-lora-arith}"
OP="${OP:-add}"

MODEL="$("$PY" tools/prepare_model.py smollm2-135m-instruct)"   # once; cached under ~/.cache/slime
"$PY" tools/make_arith_data.py --out-dir "$OUT/data" --op "$OP" --seed 0 --n-train 2000 --n-eval 100 >/dev/null

MODEL_ARGS=(--hf-checkpoint "$MODEL")
LORA_ARGS=(
   --use-lora
   --lora-r 16
   --lora-alpha 32
   --lora-dropout 0.0
   --lora-target-modules linear_qkv linear_proj linear_fc1 linear_fc2
)
ROLLOUT_ARGS=(
   --prompt-data "$OUT/data/train.jsonl"
   --apply-chat-template
   --rm-type math
   --rollout-batch-size 8
   --n-samples-per-prompt 4
   --rollout-max-response-len 48
   --rollout-temperature 1.0
   --num-rollout "${NUM_ROLLOUT:-28}"
)
EVAL_ARGS=(
   --eval-prompt-data arith "$OUT/data/eval.jsonl"
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
   --save "$OUT/lora-$OP" --log-dir "$OUT" "$@"
