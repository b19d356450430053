"""The vLLM rollout engine on the real SmolLM2-135M, against peft's forward pass.

One engine (one vLLM server) serves the whole module.  Skipped, with the reason, where no
vLLM environment exists (``make setup-vllm``); CI makes one.  The fast tests at the bottom
need no vLLM.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from slime.rollout.engine import POLICY_ADAPTER, SamplingParams
from slime.rollout.vllm_server import (
    VLLM_LORA_RANKS,
    find_vllm_python,
    group_members,
    vllm_lora_rank,
    vllm_python_error,
)
from slime.utils.errors import UserError
from slime.utils.peft_format import read_peft_adapter
from tests._support.adapters import peft_adapter_with_random_b

VLLM_MISSING = vllm_python_error(find_vllm_python(None))
needs_vllm = pytest.mark.skipif(VLLM_MISSING is not None, reason=f"no vLLM environment: {VLLM_MISSING}")
QUESTIONS = ["What is 3 + 4?", "Name a colour.", "What is 12 - 5? Answer with just the number.", "Say hello."]


@pytest.fixture(scope="module")
def base() -> str:
    from slime.utils.model_prep import prepare_model

    return str(prepare_model("smollm2-135m-instruct"))


@pytest.fixture(scope="module")
def prompts(base) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    out = []
    for question in QUESTIONS:
        ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
        out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return out


@pytest.fixture(scope="module")
def adapters(base, tmp_path_factory) -> dict[str, Path]:
    """Two random-B adapters (rank 12: vLLM serves it at rank 16) saved by peft."""
    root = tmp_path_factory.mktemp("adapters")
    return {name: (peft_adapter_with_random_b(base, root / name, seed=seed, r=12, lora_alpha=24, b_std=0.02),
                   root / name)[1] for name, seed in (("a", 1), ("b", 2))}


@pytest.fixture(scope="module")
def engine(base, tmp_path_factory):
    from slime.rollout.vllm_engine import VLLMOptions, VLLMRolloutEngine

    options = VLLMOptions(lora_rank=12, max_model_len=512, kv_cache_gib=1, log_dir=str(tmp_path_factory.mktemp("log")))
    eng = VLLMRolloutEngine(base, torch.float32, options=options)
    yield eng
    server = eng.server
    eng.shutdown()
    assert server.exit_code() is not None
    assert group_members(server.pid) == [], "a process of the vLLM server's group outlived shutdown"


def api_server(launcher: int):
    """vLLM's API server: the launcher's child running the OpenAI entry point (the other is the reaper)."""
    import psutil

    return next(p for p in psutil.Process(launcher).children() if "vllm.entrypoints.openai" in " ".join(p.cmdline()))


def _peft_logprobs(base: str, adapter: Path | None, prompt: list[int], response: list[int], temperature: float):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    tokens = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model.eval()(tokens).logits[0, len(prompt) - 1:-1] / temperature
    return torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(response)[:, None])[:, 0]


@pytest.mark.slow
@needs_vllm
def test_logprobs_are_the_adapters_and_the_gap_check_can_tell(engine, base, prompts, adapters):
    """Sampled through adapter ``a`` (loaded as files written from its tensors, the sync path): the
    engine's log-probs equal peft's forward with ``a`` (T = 0.7), and are far from the base's and
    from adapter ``b``'s, so a rollout on the wrong weights cannot pass the trainer's gap check."""
    adapter = read_peft_adapter(adapters["a"])
    written = engine.load_lora_adapter(POLICY_ADAPTER, tensors=adapter.state_dict(), config=adapter.config)
    assert written > sum(t.numel() * 4 for t in adapter.state_dict().values())  # fp32 tensors + a header
    params = SamplingParams(max_new_tokens=12, temperature=0.7, seed=3, stop_token_ids=[])
    outs = engine.generate(prompts[:2], params, POLICY_ADAPTER)
    assert [len(o.token_ids) for o in outs] == [12, 12] and all(o.finish_reason == "length" for o in outs)
    gaps = {}
    for which in ("a", "b", None):
        diffs = [(_peft_logprobs(base, adapters[which] if which else None, p, o.token_ids, 0.7)
                  - torch.tensor(o.logprobs)).abs() for p, o in zip(prompts, outs)]
        gaps[which] = torch.cat(diffs).mean().item()
    assert gaps["a"] < 1e-4, gaps
    assert gaps["b"] > 1e-2 and gaps[None] > 1e-2, gaps


@pytest.mark.slow
@needs_vllm
def test_versions_replace_each_other_and_old_ones_are_unloaded(engine, adapters):
    """Every sync is a new name ``policy-vN``; the previous one leaves the server and its files go."""
    first = engine.list_adapters()
    for name in ("a", "b"):
        adapter = read_peft_adapter(adapters[name])
        engine.apply_update((adapter.state_dict(), adapter.config))
    assert engine.list_adapters() == sorted({*first, POLICY_ADAPTER})
    served = engine.served_models()
    policy_versions = [m for m in served if m.startswith(f"{POLICY_ADAPTER}-v")]
    assert policy_versions == [engine._current[POLICY_ADAPTER]], served
    assert [p.name for p in engine.sync_root.iterdir()] == policy_versions
    status, _ = engine.server.request("POST", "/v1/completions", {"model": "policy-v1", "prompt": [1, 2], "max_tokens": 1})
    assert status == 404


@pytest.mark.slow
@needs_vllm
def test_groups_share_a_request_seeds_reproduce_and_stop_tokens_end_outputs(engine, prompts):
    """The n samples of one prompt differ; the same seed repeats a call exactly; a stop token ends its
    output and is part of it.  (Greedy calls are not compared across calls: vLLM's batching can
    flip a near-tie.)"""
    group = [prompts[0]] * 4 + [prompts[1]] * 4
    params = SamplingParams(max_new_tokens=8, temperature=1.0, seed=11, stop_token_ids=[])
    first, again = engine.generate(group, params), engine.generate(group, params)
    assert [o.token_ids for o in first] == [o.token_ids for o in again]
    assert len({tuple(o.token_ids) for o in first[:4]}) > 1
    greedy = SamplingParams(max_new_tokens=24, temperature=0.0)
    outs = engine.generate(prompts, greedy, [None, None, None, None])
    stopped = [o for o in outs if o.finish_reason == "stop"]
    assert stopped and all(o.token_ids[-1] == 2 for o in stopped)  # SmolLM2's <|im_end|>
    stop_at = outs[0].token_ids[2]
    cut = engine.generate(prompts[:1], SamplingParams(max_new_tokens=24, temperature=0.0, stop_token_ids=[stop_at]))[0]
    assert cut.finish_reason == "stop" and cut.token_ids == outs[0].token_ids[:cut.token_ids.index(stop_at) + 1]


@pytest.mark.slow
@needs_vllm
def test_task_adapters_keep_their_own_versions_and_each_request_runs_its_own(engine, base, prompts, adapters):
    """--lora-tasks: every task's adapter is versioned on its own (``<task>-vN``, ``sync/adapter_version``
    its N); one call mixing both tasks runs each request through its task's adapter."""
    a, b = read_peft_adapter(adapters["a"]), read_peft_adapter(adapters["b"])
    for _ in range(2):
        synced_a = engine.apply_update((a.state_dict(), a.config), "add")
        synced_b = engine.apply_update((b.state_dict(), b.config), "mul")
    assert (synced_a["sync/adapter_version"], synced_b["sync/adapter_version"]) == (2.0, 2.0)
    served = engine.served_models()
    assert {"add-v2", "mul-v2"} <= set(served) and not {"add-v1", "mul-v1"} & set(served), served
    params = SamplingParams(max_new_tokens=6, temperature=0.7, seed=3, stop_token_ids=[])
    outs = engine.generate(prompts[:2], params, ["add", "mul"])
    for prompt, out, mine, theirs in zip(prompts, outs, ("a", "b"), ("b", "a")):
        gap = lambda which: (_peft_logprobs(base, adapters[which], prompt, out.token_ids, 0.7)  # noqa: E731
                             - torch.tensor(out.logprobs)).abs().mean().item()
        assert gap(mine) < 1e-4 and gap(theirs) > 1e-2
    engine.unload_lora_adapter("add")
    engine.unload_lora_adapter("mul")


@pytest.mark.slow
@needs_vllm
def test_an_unknown_adapter_is_an_error_not_the_base_model(engine, prompts):
    with pytest.raises(UserError, match="'nope' is not loaded"):
        engine.generate(prompts[:1], SamplingParams(max_new_tokens=2), "nope")


@pytest.mark.slow
@needs_vllm
def test_a_dead_server_is_one_line_naming_it_and_its_log(base, tmp_path):
    """SIGKILL of vLLM's API server under a running engine: its engine-core and worker processes go
    too (the launcher), and the next call fails with a VLLMError (resumable, exit status 3) naming
    the server's pid, its exit status and its log."""
    import psutil

    from slime.rollout.vllm_engine import VLLMOptions, VLLMRolloutEngine
    from slime.rollout.vllm_server import VLLMError

    eng = VLLMRolloutEngine(base, torch.float32, options=VLLMOptions(max_model_len=256, kv_cache_gib=1,
                                                                    log_dir=str(tmp_path)))
    try:
        family = psutil.Process(eng.server.pid).children(recursive=True)
        assert len(family) >= 3, family  # the reaper, the API server, its engine core (and workers)
        api_server(eng.server.pid).kill()
        eng.server.process.wait(30)
        assert group_members(eng.server.pid) == []
        start = time.monotonic()
        with pytest.raises(VLLMError) as info:
            eng.generate([[1, 2, 3]], SamplingParams(max_new_tokens=2))
        assert time.monotonic() - start < 5
        message = str(info.value)
        assert "\n" not in message and f"pid {eng.server.pid}" in message and "exited with status" in message
        assert str(tmp_path) in message and info.value.exit_status == 3
    finally:
        eng.shutdown()


# ------------------------------------------------------------------ no vLLM needed


def test_lora_ranks_round_up_to_the_ones_vllm_serves():
    assert [vllm_lora_rank(r) for r in (1, 2, 8, 9, 16, 17, 300, 512)] == [1, 8, 8, 16, 16, 32, 320, 512]
    with pytest.raises(UserError, match="rank <= 512"):
        vllm_lora_rank(VLLM_LORA_RANKS[-1] + 1)


def test_a_missing_vllm_environment_is_one_line_with_the_install_command(tmp_path):
    message = vllm_python_error(tmp_path / "nope" / "python")
    assert message and "make setup-vllm" in message and "--vllm-python" in message and "\n" not in message
    fake = tmp_path / "python"
    fake.symlink_to(os.path.realpath(os.sys.executable))  # a python without vllm
    message = vllm_python_error(fake)
    assert message and "vllm is not installed there" in message


def test_groups_of_identical_prompts_become_one_request():
    from slime.rollout.vllm_engine import _runs

    prompts = [[1, 2], [1, 2], [1, 2], [3], [3], [1, 2]]
    assert _runs(prompts, [None] * 6) == [(0, 3), (3, 2), (5, 1)]
    assert _runs(prompts, [None, None, "a", "a", "a", "a"]) == [(0, 2), (2, 1), (3, 2), (5, 1)]


@pytest.mark.slow
@needs_vllm
def test_a_launcher_killed_while_vllm_starts_leaves_no_vllm_process(base, tmp_path):
    """Ray SIGKILLs a dying actor's children: the launcher can die while vLLM is still starting (when
    vLLM ignores SIGTERM); its reaper then ends the whole process group within the grace period."""
    import psutil

    from slime.rollout.vllm_server import VLLMLaunch, VLLMServer

    server = VLLMServer(VLLMLaunch(model=base, python=find_vllm_python(None), max_model_len=256, kv_cache_gib=1),
                        tmp_path / "vllm.log")
    try:
        deadline = time.monotonic() + 60
        while len(psutil.Process(server.pid).children(recursive=True)) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)  # the API server has started its engine core: vLLM is mid start-up
        assert len(psutil.Process(server.pid).children(recursive=True)) >= 2
        os.kill(server.pid, 9)
        deadline = time.monotonic() + 30
        while group_members(server.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert group_members(server.pid) == [], (tmp_path / "vllm.log").read_text()[-2000:]
    finally:
        server.stop()
