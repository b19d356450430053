#!/usr/bin/env bash
# LoRA GRPO on Qwen3-30B-A3B (mixture of experts: 128 experts, 8 per token), for one 8-GPU node,
# laid out as slime's Qwen3-30B-A3B recipe: TP=4 with sequence parallel for attention, EP=8 for experts.
#   bash examples/lora/run-qwen3-30B-A3B-lora.sh --save /root/lora-math-moe/
# Extra arguments go to train.py and override the settings below.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
HF_CKPT="${HF_CKPT:-/root/Qwen3-30B-A3B}"
PROMPT_DATA="${PROMPT_DATA:-/root/dapo-math-17k/dapo-math-17k.jsonl}"
EVAL_DATA="${EVAL_DATA:-/root/aime-2024/aime-2024.jsonl}"

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.device_count() >= 8 else 1)" 2>/dev/null; then
   echo "error: this script needs 8 GPUs on one node (TP=4, EP=8) and found fewer; on a CPU machine run 'make demo' instead" >&2
   exit 2
fi
if [ ! -f "$HF_CKPT/config.json" ]; then
   echo "error: no Hugging Face checkpoint at $HF_CKPT (set HF_CKPT=/path/to/Qwen3-30B-A3B)" >&2
   exit 2
fi
if [ ! -f "$PROMPT_DATA" ]; then
   echo "error: no prompt data at $PROMPT_DATA (set PROMPT_DATA=/path/to/prompts.jsonl)" >&2
   exit 2
fi

CKPT_ARGS=(--hf-checkpoint "$HF_CKPT" --save-interval 20)
# linear_fc1/linear_fc2 are matched by name, so they adapt every expert (128 per layer, each with its
# own A and B); the router stays frozen. r=16 trains 639,369,216 parameters (10.2M attention,
# 629.1M experts; tools/lora_param_count.py --model qwen3-30b-a3b --lora-r 16).
LORA_ARGS=(
   --use-lora              # this flag triggers LoRA
   --lora-r 16             # rank
   --lora-alpha 32.0       # scaling alpha / r = 2
   --lora-dropout 0.05     # dropout on the adapter input
   --lora-target-modules linear_qkv linear_proj linear_fc1 linear_fc2
   --lora-only-trainable   # train only the LoRA parameters (the default with --use-lora)
)
ROLLOUT_ARGS=(
   --prompt-data "$PROMPT_DATA"
   --input-key prompt
   --label-key label
   --apply-chat-template
   --rm-type math
   --num-rollout 3000
   --rollout-batch-size 32
   --n-samples-per-prompt 8
   --rollout-max-response-len 8192
   --rollout-temperature 0.8
   --global-batch-size 256
)
EVAL_ARGS=()
if [ -f "$EVAL_DATA" ]; then
   EVAL_ARGS=(--eval-interval 20 --eval-prompt-data aime "$EVAL_DATA" --n-samples-per-eval-prompt 16
              --eval-max-response-len 16384 --eval-temperature 0.6)
fi
PERF_ARGS=(
   --tensor-model-parallel-size 4      # attention: 4-way tensor parallel (2 data-parallel groups)
   --sequence-parallel
   --pipeline-model-parallel-size 1
   --expert-model-parallel-size 8      # experts: 16 whole experts per GPU
   --expert-tensor-parallel-size 1     # LoRA on experts needs whole experts per rank
   --moe-token-dispatcher-type alltoall
   --actor-num-nodes 1
   --actor-num-gpus-per-node 8
   --max-tokens-per-micro-batch 20480  # slime's recipe: 20480 tokens per GPU
   --recompute-activations
   --bf16
)
GRPO_ARGS=(
   --advantage-estimator grpo
   --use-kl-loss
   --kl-loss-coef 0.00
   --kl-loss-type low_var_kl
   --entropy-coef 0.00
   --eps-clip 0.2
   --eps-clip-high 0.28
)
OPTIMIZER_ARGS=(
   --lr 1e-5               # ~10x slime's full-parameter 1e-6: LoRA wants a larger step
   --lr-decay-style constant
   --weight-decay 0.1
   --adam-beta1 0.9
   --adam-beta2 0.98
)
exec "$PY" train.py "${CKPT_ARGS[@]}" "${LORA_ARGS[@]}" "${ROLLOUT_ARGS[@]}" "${EVAL_ARGS[@]}" "${PERF_ARGS[@]}" \
   "${GRPO_ARGS[@]}" "${OPTIMIZER_ARGS[@]}" --log-dir "${LOG_DIR:-$ROOT/outputs/qwen3-30b-a3b-lora}" "$@"
