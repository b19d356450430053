"""Tests for the transformers+peft rollout engine, on tiny random Llama checkpoints.

Every reference below is computed the slow, obvious way: a full forward pass over
prompt+response with no cache and no padding, one sequence at a time.

Benchmark (not a test): ``.venv/bin/python tests/rollout/test_hf_engine.py`` times
32 sequences x 48 new tokens (8 distinct prompts of 64 tokens, 4 samples each, T=1,
no early stop) on a random Llama shaped like SmolLM2-135M (hidden 576, 30 layers,
9 heads, 3 KV heads, FFN 1536, vocab 49152), fp32, 2 threads, with and without
prefix sharing.  Measured once on the 2-core dev machine: see ``_benchmark``.
"""

from __future__ import annotations

import os
import time

import pytest
import torch
from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from slime.rollout.engine import POLICY_ADAPTER, GenerateOutput, RolloutEngine, SamplingParams
from slime.rollout.hf_engine import HFRolloutEngine
from slime.utils.errors import UserError
from tests._support.adapters import peft_adapter_with_random_b
from tests._support.numerics import assert_close, fp32_tolerance
from tests._support.tiny_models import tiny_model

pytestmark = pytest.mark.numerics
EOS = 1
# Prompts of different lengths (left padding matters) and one duplicate (prefix sharing).
PROMPTS = [[5, 17, 3, 44, 9, 12, 30], [8, 2], [60, 61, 62, 63, 7], [5, 17, 3, 44, 9, 12, 30], [11]]
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _tiny_llama(seed: int) -> LlamaForCausalLM:
    # A large init range makes the random model's distributions peaked, so greedy
    # decoding is far from ties and different models give different tokens.
    # (transformers' init, not randomize_: weights ~ N(0, 0.2)); vocabulary 96, 2 layers, GQA 4/2, untied.
    return tiny_model("llama", seed=seed, randomize=False, hidden_size=64, intermediate_size=128,
                      max_position_embeddings=256, initializer_range=0.2, bos_token_id=0, eos_token_id=EOS)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("llama")
    _tiny_llama(seed=0).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def reference(checkpoint) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(checkpoint).eval()


@pytest.fixture(scope="module")
def peft_reference(checkpoint, tmp_path_factory):
    """A PeftModel with a random (nonzero-B) LoRA on all linear layers, and its saved directory."""
    path = tmp_path_factory.mktemp("adapter")
    model = peft_adapter_with_random_b(checkpoint, path, seed=1, b_std=None, target_modules=ALL_LINEAR)
    return model, str(path)


@pytest.fixture(params=[False, True], ids=["adapter-beside", "adapter-merged"])
def engine(checkpoint, request) -> HFRolloutEngine:
    """Every engine test runs with the adapter computed beside the base and merged into it."""
    return HFRolloutEngine(checkpoint, merge_adapters=request.param)


def _full_forward_logprobs(model: torch.nn.Module, prompt: list[int], response: list[int], temperature: float):
    """``(log_softmax(logits / T) at each response token, argmax at each response position, max |logits / T|)``,
    no cache."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + response])).logits[0].float()
    positions = logits[len(prompt) - 1 : len(prompt) + len(response) - 1] / temperature
    logp = torch.log_softmax(positions, dim=-1)
    return logp.gather(1, torch.tensor(response)[:, None]).squeeze(1), positions.argmax(-1), positions.abs().max().item()


def _logprob_tolerance(config, logit_scale: float) -> float:
    """Two fp32 forwards of this model (KV cache vs none, other padding or batch, merged or not) sum in
    different orders: layers + head chained reductions over the widest dimension, through log-softmax."""
    width = max(config.hidden_size, getattr(config, "intermediate_size", None) or 4 * config.hidden_size)
    return fp32_tolerance(logit_scale, config.num_hidden_layers + 1, width, log_softmax=True)


def _assert_matches_model(model, prompts, outputs: list[GenerateOutput], temperature: float, greedy: bool,
                          what: str = "engine logprobs vs full forward") -> None:
    """The engine's log-probs equal a full no-cache forward's, to the rounding of the largest tempered logit."""
    for prompt, out in zip(prompts, outputs):
        logprobs, argmax, scale = _full_forward_logprobs(model, prompt, out.token_ids, temperature)
        assert_close(out.logprobs, logprobs, atol=_logprob_tolerance(model.config, scale), rtol=0, what=what)
        if greedy:
            assert out.token_ids == argmax.tolist()


def _logit_scale(model, prompts, outputs: list[GenerateOutput]) -> float:
    return max(_full_forward_logprobs(model, p, o.token_ids, 1.0)[2] for p, o in zip(prompts, outputs))


GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0, stop_token_ids=[])


def test_engine_satisfies_protocol(engine):
    assert isinstance(engine, RolloutEngine)
    assert engine.health()["status"] == "ok"
    assert engine.eos_token_ids == [EOS]


def test_greedy_equals_step_by_step_full_recompute(engine, reference):
    outputs = engine.generate(PROMPTS, GREEDY)
    for prompt, out in zip(PROMPTS, outputs):
        ids = list(prompt)
        for _ in range(GREEDY.max_new_tokens):
            with torch.no_grad():
                ids.append(int(reference(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
        assert out.token_ids == ids[len(prompt) :]
        assert out.finish_reason == "length" and len(out.logprobs) == GREEDY.max_new_tokens
    assert len({tuple(o.token_ids) for o in outputs}) > 2  # the check is not vacuous
    _assert_matches_model(reference, PROMPTS, outputs, temperature=1.0, greedy=True)


def test_left_padding_positions_with_absolute_position_embeddings(tmp_path):
    # RoPE only sees relative offsets, so a wrong per-row position shift is
    # invisible on Llama; learned absolute positions (GPT-2) expose it.
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=64,
        initializer_range=0.2, bos_token_id=0, eos_token_id=EOS,
    )  # fmt: skip
    GPT2LMHeadModel(config).eval().save_pretrained(tmp_path)
    reference = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    outputs = HFRolloutEngine(str(tmp_path)).generate(PROMPTS, GREEDY)
    _assert_matches_model(reference, PROMPTS, outputs, temperature=1.0, greedy=True)


@pytest.mark.parametrize("top_k,top_p", [(-1, 1.0), (20, 0.9)])
def test_sampled_logprobs_are_untruncated_tempered_log_softmax(engine, reference, top_k, top_p):
    params = SamplingParams(max_new_tokens=10, temperature=0.7, top_k=top_k, top_p=top_p, seed=3, stop_token_ids=[])
    outputs = engine.generate(PROMPTS, params)
    _assert_matches_model(reference, PROMPTS, outputs, temperature=0.7, greedy=False)


@pytest.mark.parametrize("top_k,top_p", [(1, 1.0), (-1, 1e-6)])
def test_extreme_truncation_is_greedy(engine, top_k, top_p):
    sampled = engine.generate(PROMPTS, SamplingParams(max_new_tokens=8, temperature=1.5, top_k=top_k, top_p=top_p))
    greedy = engine.generate(PROMPTS, SamplingParams(max_new_tokens=8, temperature=0.0))
    assert [o.token_ids for o in sampled] == [o.token_ids for o in greedy]


def test_seeded_sampling_is_reproducible_and_seeds_differ(engine):
    def run(seed):
        params = SamplingParams(max_new_tokens=10, temperature=1.0, seed=seed, stop_token_ids=[])
        return [(o.token_ids, o.logprobs) for o in engine.generate(PROMPTS, params)]

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_stop_token_ends_only_its_sequence(engine):
    free = engine.generate(PROMPTS, GREEDY)
    stop = free[0].token_ids[3]
    params = SamplingParams(max_new_tokens=GREEDY.max_new_tokens, temperature=0.0, stop_token_ids=[stop])
    outputs = engine.generate(PROMPTS, params)
    assert any(stop not in f.token_ids for f in free)  # some rows must outlive the stopped ones
    for f, out in zip(free, outputs):
        if stop in f.token_ids:
            end = f.token_ids.index(stop) + 1
            assert (out.token_ids, out.finish_reason) == (f.token_ids[:end], "stop")
            assert_close(out.logprobs, f.logprobs[:end], atol=1e-5, rtol=0, what="stopped row vs free row")
        else:
            assert (out.token_ids, out.finish_reason) == (f.token_ids, "length")


def test_prefix_sharing_matches_separate_prefill(checkpoint):
    shared, separate = HFRolloutEngine(checkpoint), HFRolloutEngine(checkpoint, share_prefix=False)
    prompts = [PROMPTS[0]] * 3 + [PROMPTS[1]] * 2 + [PROMPTS[2]]
    for params in (GREEDY, SamplingParams(max_new_tokens=10, temperature=1.0, seed=5, stop_token_ids=[])):
        a, b = shared.generate(prompts, params), separate.generate(prompts, params)
        assert [o.token_ids for o in a] == [o.token_ids for o in b]
        for x, y in zip(a, b):
            assert_close(x.logprobs, y.logprobs, atol=1e-5, rtol=0, what="shared vs separate prefill")
    # the three copies of one prompt were sampled independently
    sampled = shared.generate(prompts, SamplingParams(max_new_tokens=10, seed=5, stop_token_ids=[]))
    assert len({tuple(o.token_ids) for o in sampled[:3]}) > 1


def test_adapter_from_directory_matches_peft_model(engine, reference, peft_reference):
    peft_model, path = peft_reference
    engine.load_lora_adapter("policy", path)
    assert engine.list_adapters() == ["policy"]
    outputs = engine.generate(PROMPTS, GREEDY, lora_names="policy")
    _assert_matches_model(peft_model, PROMPTS, outputs, temperature=1.0, greedy=True)
    base = engine.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outputs] != [o.token_ids for o in base]
    _assert_matches_model(reference, PROMPTS, base, temperature=1.0, greedy=True)


def test_adapter_from_tensors_matches_directory(engine, peft_reference):
    peft_model, path = peft_reference
    engine.load_lora_adapter("from_dir", path)
    tensors = get_peft_model_state_dict(peft_model)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in tensors
    engine.load_lora_adapter("from_tensors", tensors=tensors, config=peft_model.peft_config["default"].to_dict())
    a = engine.generate(PROMPTS, GREEDY, lora_names="from_dir")
    b = engine.generate(PROMPTS, GREEDY, lora_names="from_tensors")
    assert [(o.token_ids, o.logprobs) for o in a] == [(o.token_ids, o.logprobs) for o in b]


def test_apply_update_routes_an_adapter_or_full_weights(engine, peft_reference):
    peft_model, path = peft_reference
    engine.load_lora_adapter("from_dir", path)
    tensors = get_peft_model_state_dict(peft_model)
    metrics = engine.apply_update((tensors, peft_model.peft_config["default"].to_dict()))
    assert engine.list_adapters() == sorted(["from_dir", POLICY_ADAPTER])
    assert metrics["sync/bytes"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert metrics["sync/tensors"] == len(tensors) and metrics["sync/engine_seconds"] >= 0
    a = engine.generate(PROMPTS, GREEDY, lora_names="from_dir")
    b = engine.generate(PROMPTS, GREEDY, lora_names=POLICY_ADAPTER)
    assert [(o.token_ids, o.logprobs) for o in a] == [(o.token_ids, o.logprobs) for o in b]

    head = engine.model.get_output_embeddings().weight
    new_head = torch.randn(head.shape, generator=torch.Generator().manual_seed(3))
    metrics = engine.apply_update(({"lm_head.weight": new_head}, None))
    assert torch.equal(engine.model.get_output_embeddings().weight, new_head)
    assert engine.health()["weight_updates"] == 1 and metrics["sync/bytes"] == new_head.numel() * 4
    assert engine.pid() == os.getpid()  # in-process here; the engine actor's process under Ray


def test_replacing_adapter_tensors_copies_in_place(engine, checkpoint, peft_reference):
    peft_model, path = peft_reference
    engine.load_lora_adapter("policy", path)
    before = engine.generate(PROMPTS, GREEDY, lora_names="policy")
    param = engine.model.model.layers[0].self_attn.q_proj.lora_B["policy"].weight

    torch.manual_seed(2)
    new = {k: torch.randn_like(v) * 0.3 for k, v in get_peft_model_state_dict(peft_model).items()}
    engine.load_lora_adapter("policy", tensors=new, config=peft_model.peft_config["default"].to_dict())
    after = engine.generate(PROMPTS, GREEDY, lora_names="policy")

    assert engine.model.model.layers[0].self_attn.q_proj.lora_B["policy"].weight is param
    assert [o.token_ids for o in after] != [o.token_ids for o in before]
    updated = get_peft_model(LlamaForCausalLM.from_pretrained(checkpoint), peft_model.peft_config["default"]).eval()
    set_peft_model_state_dict(updated, new)
    # Large random B's grow the logits, and merged W + sBA rounds apart from Wx + sB(Ax): the
    # tolerance follows max |logits|.
    _assert_matches_model(updated, PROMPTS, after, temperature=1.0, greedy=True,
                          what="engine logprobs, large random B, vs peft")


def test_mixed_batch_gives_each_request_its_own_model(engine, reference, peft_reference):
    engine.load_lora_adapter("policy", peft_reference[1])
    names = ["policy", None, "policy", None, None]
    mixed = engine.generate(PROMPTS, GREEDY, lora_names=names)
    base = engine.generate(PROMPTS, GREEDY)
    adapted = engine.generate(PROMPTS, GREEDY, lora_names="policy")
    # a different batch composition (padding width) sums in another order
    atol = _logprob_tolerance(reference.config, max(_logit_scale(reference, PROMPTS, base),
                                                    _logit_scale(peft_reference[0], PROMPTS, adapted)))
    for name, m, b, a in zip(names, mixed, base, adapted):
        expected = a if name else b
        assert m.token_ids == expected.token_ids
        assert_close(m.logprobs, expected.logprobs, atol=atol, rtol=0, what="mixed batch vs one-model batch")


def test_seeded_samples_of_an_adapter_do_not_depend_on_the_others_in_the_call(engine, peft_reference):
    """Several tasks sampled in one call (--lora-tasks): each adapter's requests get the samples a
    call of their own with the same seed gets."""
    engine.load_lora_adapter("policy", peft_reference[1])
    params = SamplingParams(max_new_tokens=8, temperature=1.0, seed=11)
    names = [None, "policy", None, "policy", "policy"]
    mixed = engine.generate(PROMPTS, params, lora_names=names)
    for name in (None, "policy"):
        rows = [i for i, n in enumerate(names) if n == name]
        alone = engine.generate([PROMPTS[i] for i in rows], params, lora_names=name)
        assert [mixed[i].token_ids for i in rows] == [out.token_ids for out in alone]
        # merged adapters: the base weights after merge + unmerge differ from the loaded ones by rounding
        for i, out in zip(rows, alone):
            assert_close(mixed[i].logprobs, out.logprobs, atol=1e-5, rtol=0, what="mixed call vs own call")


def test_unload_restores_base_and_forgets_name(engine, reference, peft_reference):
    base = engine.generate(PROMPTS, GREEDY)
    engine.load_lora_adapter("policy", peft_reference[1])
    engine.generate(PROMPTS, GREEDY, lora_names="policy")
    engine.unload_lora_adapter("policy")
    assert engine.list_adapters() == []
    after = engine.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in after] == [o.token_ids for o in base]
    if engine.merge_adapters:  # W + BA - BA is W up to fp32 rounding
        atol = _logprob_tolerance(reference.config, _logit_scale(reference, PROMPTS, base))
        for a, b in zip(after, base):
            assert_close(a.logprobs, b.logprobs, atol=atol, rtol=0, what="after unmerge vs base")
    else:
        assert [o.logprobs for o in after] == [o.logprobs for o in base]
    with pytest.raises(UserError, match="not loaded"):
        engine.generate(PROMPTS, GREEDY, lora_names="policy")


def test_bad_adapter_tensors_are_rejected_and_not_kept(engine, peft_reference):
    peft_model, _ = peft_reference
    tensors = dict(get_peft_model_state_dict(peft_model))
    tensors.pop(next(iter(tensors)))
    with pytest.raises(UserError, match="missing"):
        engine.load_lora_adapter("broken", tensors=tensors, config=peft_model.peft_config["default"].to_dict())
    assert engine.list_adapters() == []
    with pytest.raises(UserError, match="adapter_config.json"):
        engine.load_lora_adapter("nowhere", "/nonexistent")


def test_update_weights_switches_base_model(engine, tmp_path):
    other = _tiny_llama(seed=9)
    other.save_pretrained(tmp_path)
    engine.update_weights(other.state_dict())
    _assert_matches_model(other, PROMPTS, engine.generate(PROMPTS, GREEDY), temperature=1.0, greedy=True)
    assert engine.health()["weight_updates"] == 1
    with pytest.raises(UserError, match="not in"):
        engine.update_weights({"model.no_such.weight": torch.zeros(1)})


def test_request_validation(engine):
    with pytest.raises(UserError, match="lora_names"):
        engine.generate(PROMPTS, GREEDY, lora_names=[None])
    with pytest.raises(UserError, match="outside the vocabulary"):
        engine.generate([[1000]], GREEDY)
    with pytest.raises(UserError, match="top_p"):
        SamplingParams(max_new_tokens=4, top_p=0.0)


def _benchmark(num_prompts: int = 8, samples: int = 4, prompt_len: int = 64, new_tokens: int = 48) -> None:
    """Time one rollout batch on a random SmolLM2-135M-shaped Llama, prefix-shared vs not."""
    import tempfile

    torch.set_num_threads(2)
    config = LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True, eos_token_id=EOS,
    )  # fmt: skip
    torch.manual_seed(0)
    prompts = [torch.randint(2, 49152, (prompt_len,)).tolist() for _ in range(num_prompts)]
    batch = [p for p in prompts for _ in range(samples)]
    params = SamplingParams(max_new_tokens=new_tokens, temperature=1.0, seed=0, stop_token_ids=[])
    with tempfile.TemporaryDirectory() as path:
        LlamaForCausalLM(config).save_pretrained(path)
        for share in (True, False):
            engine = HFRolloutEngine(path, share_prefix=share)
            engine.generate(batch[:2], SamplingParams(max_new_tokens=2))  # warm-up
            start = time.perf_counter()
            outputs = engine.generate(batch, params)
            seconds = time.perf_counter() - start
            tokens = sum(len(o.token_ids) for o in outputs)
            print(f"share_prefix={share}: {seconds:.2f} s, {tokens / seconds:.0f} tokens/s")


if __name__ == "__main__":
    _benchmark()
