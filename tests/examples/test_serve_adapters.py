"""serve_adapters.py on the real SmolLM2: one mixed batch, answers routed per adapter name.

Every request's answer must be the one its adapter gives in peft (greedy, one prompt at a time),
and a request without a name the base model's; the noisy adapter answers differently from the
base, so requests routed to the wrong model cannot pass.  An adapter whose B is zero (peft's
default init) changes nothing, so its accuracy row equals the base model's.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests._support.adapters import peft_adapter_with_random_b

ROOT = Path(__file__).resolve().parents[2]


def _adapter(base: Path, out: Path, init: bool) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=init)
    get_peft_model(model, config).save_pretrained(out)
    return out


@pytest.mark.slow
def test_zero_adapter_row_equals_base_row(tmp_path):
    from slime.utils.model_prep import prepare_model

    base = prepare_model("smollm2-135m-instruct")
    tasks = {}
    for op in ("add", "sub"):
        subprocess.run([sys.executable, str(ROOT / "tools/make_arith_data.py"), "--out-dir", str(tmp_path / op),
                        "--op", op, "--seed", "0", "--n-train", "1", "--n-eval", "12"], check=True,
                       capture_output=True)
        tasks[op] = tmp_path / op / "eval.jsonl"
    zero = _adapter(base, tmp_path / "zero", init=True)
    noisy = tmp_path / "noisy"
    peft_adapter_with_random_b(base, noisy, b_std=None, target_modules=["q_proj", "v_proj"])
    cmd = [sys.executable, str(ROOT / "examples/lora/serve_adapters.py"), "--hf-checkpoint", str(base),
           "--adapter", f"zero={zero}", "--adapter", f"noisy={noisy}", "--max-new-tokens", "12", "--show-answers",
           *[a for op, path in tasks.items() for a in ("--task", f"{op}={path}")]]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    rows = {line.split("|")[0].strip(): [c.strip() for c in line.split("|")[1:]]
            for line in lines if "|" in line and not line.startswith("{")}
    assert rows["greedy accuracy"] == ["task add", "task sub"]
    assert set(rows) == {"greedy accuracy", "base", "zero", "noisy"}
    assert rows["zero"] == rows["base"]

    answers = [json.loads(line) for line in lines if line.startswith("{")]
    served = {(a["task"], a["adapter"], a["index"]): a["token_ids"] for a in answers}
    expected = _peft_greedy_answers(base, {"zero": zero, "noisy": noisy}, tasks, max_new_tokens=12)
    assert served.keys() == expected.keys() and len(served) == 2 * 12 * 3
    wrong = [key for key in expected if served[key] != expected[key]]
    assert not wrong, f"{len(wrong)} answers differ from their adapter's in peft, e.g. {wrong[:3]}"
    differs = [k for k in expected if k[1] == "noisy" and expected[k] != expected[(k[0], None, k[2])]]
    assert len(differs) >= 6, "the noisy adapter must change most answers, or routing is not tested"


def _peft_greedy_answers(base: Path, adapters: dict[str, Path], tasks: dict[str, Path], max_new_tokens: int):
    """``(task, adapter or None, prompt index) -> greedy token ids`` from transformers + peft, one prompt at a time."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    names = list(adapters)
    model = PeftModel.from_pretrained(model, adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapters[name], adapter_name=name)
    answers = {}
    for task, path in tasks.items():
        for index, line in enumerate(Path(path).read_text().splitlines()):
            text = tokenizer.apply_chat_template(json.loads(line)["prompt"], tokenize=False, add_generation_prompt=True)
            ids = torch.tensor([tokenizer(text, add_special_tokens=False).input_ids])
            for name in [None, *names]:
                with torch.no_grad():
                    if name is None:
                        with model.disable_adapter():
                            out = model.generate(input_ids=ids, max_new_tokens=max_new_tokens, do_sample=False)
                    else:
                        model.set_adapter(name)
                        out = model.generate(input_ids=ids, max_new_tokens=max_new_tokens, do_sample=False)
                answers[(task, name, index)] = out[0, ids.shape[1]:].tolist()
    return answers


def test_bad_adapter_path_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "examples/lora/serve_adapters.py"), "--hf-checkpoint",
                           str(tmp_path), "--adapter", f"x={tmp_path / 'missing'}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --adapter x=")
    assert "Traceback" not in proc.stderr
