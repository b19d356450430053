"""Serve several per-task adapters side by side from one base model, in the built-in engine.

    python examples/lora/serve_adapters.py --hf-checkpoint BASE \
        --adapter add=outputs/.../lora-add/adapter --adapter sub=outputs/.../lora-sub/adapter \
        --task add=outputs/.../data/eval.jsonl --task sub=outputs/.../sub/data/eval.jsonl

Every task's held-out prompts are answered greedily by the base model and by every adapter,
all requests in one batch with a per-request adapter name (as SGLang's ``lora_path`` or vLLM's
``model`` field would route them), and scored with ``--rm-type math``.  Prints the accuracy
table: each adapter should be best on its own task.  ``--show-answers`` then prints every
request's answer as one JSON line (task, adapter, prompt index, response token ids, text).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from slime.rollout.engine import SamplingParams
from slime.rollout.hf_engine import HFRolloutEngine
from slime.rollout.rm import extract_final_number
from slime.utils.errors import UserError, run_main


def _pairs(values: list[str], flag: str) -> dict[str, str]:
    out = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not Path(path).exists():
            raise UserError(f"{flag} {value}: expected NAME=PATH with an existing PATH")
        out[name] = path
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hf-checkpoint", required=True)
    parser.add_argument("--adapter", action="append", default=[], help="NAME=PEFT_DIR (repeat)")
    parser.add_argument("--task", action="append", default=[], help="NAME=EVAL_JSONL (repeat)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--show-answers", action="store_true", help="print each request's answer as a JSON line")
    args = parser.parse_args()
    adapters, tasks = _pairs(args.adapter, "--adapter"), _pairs(args.task, "--task")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.hf_checkpoint)
    engine = HFRolloutEngine(args.hf_checkpoint)
    for name, path in adapters.items():
        engine.load_lora_adapter(name, path)

    requests, meta = [], []
    for task, path in tasks.items():
        for index, line in enumerate(Path(path).read_text().splitlines()):
            row = json.loads(line)
            text = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
            ids = tokenizer(text, add_special_tokens=False).input_ids
            for model in [None, *adapters]:
                requests.append(ids)
                meta.append((task, model, index, float(row["label"])))
    outputs = engine.generate(requests, SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0.0),
                              lora_names=[model for _, model, _, _ in meta])
    correct: dict[tuple[str, str | None], list[float]] = {}
    answers = []
    for (task, model, index, label), out in zip(meta, outputs):
        text = tokenizer.decode(out.token_ids, skip_special_tokens=True)
        answer = extract_final_number(text)
        correct.setdefault((task, model), []).append(float(answer is not None and abs(answer - label) < 1e-6))
        answers.append({"task": task, "adapter": model, "index": index, "token_ids": out.token_ids, "text": text})

    models = [None, *adapters]
    print("greedy accuracy | " + " | ".join(f"task {t}" for t in tasks))
    for model in models:
        cells = [f"{sum(correct[t, model]) / len(correct[t, model]):.2f}" for t in tasks]
        print(f"{model or 'base':>15} | " + " | ".join(cells))
    if args.show_answers:
        for answer in answers:
            print(json.dumps(answer))


if __name__ == "__main__":
    run_main(main)
