"""Prompt-shared packing gives exactly the log-probs of the unpacked sequences (TP=1 and TP=2)."""

import pytest
import torch

from tests._support.dist import run_distributed
from tests._support.numerics import assert_close

VOCAB = 128


def _data():
    from slime.rollout.batch import RolloutBatch

    g = torch.Generator().manual_seed(0)
    p1 = torch.randint(0, VOCAB, (7,), generator=g).tolist()
    p2 = torch.randint(0, VOCAB, (5,), generator=g).tolist()
    responses = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (3, 6, 1, 4, 2)]
    tokens = [p1 + responses[0], p1 + responses[1], p1 + responses[2], p2 + responses[3], p2 + responses[4]]
    return RolloutBatch(tokens=tokens, prompt_lens=[7, 7, 7, 5, 5],
                        rollout_logprobs=[[0.0] * len(r) for r in responses],
                        advantages=[0.5, -1.0, 0.5, 1.0, -1.0], group_ids=[0, 0, 0, 1, 1])


def _packed_vs_plain(rank):
    from slime.backends.megatron_utils.arch import ModelArch
    from slime.backends.megatron_utils.loss import token_logprobs_and_entropy
    from slime.backends.megatron_utils.parallel import gather_vocab
    from slime.backends.megatron_utils.model import initialize_model_and_optimizer
    from slime.backends.megatron_utils.packing import collate, group_rows, plan_micro_batches, rope_at_positions
    from slime.utils.arguments import parse_args
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    arch = ModelArch.from_hf_config(dict(architectures=["LlamaForCausalLM"], num_hidden_layers=2, hidden_size=64,
                                         intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                                         vocab_size=VOCAB))
    torch.manual_seed(0)
    model = initialize_model_and_optimizer(parse_args(["--tensor-model-parallel-size", str(tp)]), arch=arch).model[0]
    data = _data()
    groups = group_rows(list(range(5)), data)
    plan = plan_micro_batches(groups, data, micro_batch_size=8, max_tokens=None)
    packed, order = [], []
    with torch.no_grad():
        for rows in plan:
            mb = collate(rows, data)
            with rope_at_positions(model, mb.position_ids):
                logits = model(mb.tokens, mb.position_ids, mb.attention_mask)
            logp, _ = token_logprobs_and_entropy(gather_vocab(logits[mb.pred_row, mb.pred_col]), mb.targets, VOCAB)
            for local, i in enumerate(mb.index):
                packed.append(logp[mb.sample == local])
                order.append(i)
        plain = []
        for i in order:
            seq, prompt_len = torch.tensor([data.tokens[i]]), data.prompt_lens[i]
            logits = gather_vocab(model(seq[:, :-1], torch.arange(seq.shape[1] - 1)[None], None))
            plain.append(token_logprobs_and_entropy(logits[0, prompt_len - 1:], seq[0, prompt_len:], VOCAB)[0])
    return groups, [len(rows) for rows in plan], torch.cat(packed), torch.cat(plain)


@pytest.mark.numerics
def test_group_packing_is_exact_at_tp1_and_tp2():
    for world in (1, 2):
        for groups, plan, packed, plain in run_distributed(_packed_vs_plain, world):
            assert groups == [[0, 1, 2], [3, 4]] and plan == [2]
            assert packed.shape == plain.shape == (16,)
            assert_close(packed, plain, atol=1e-5, rtol=1e-5, what=f"TP={world}: packed vs one sequence per row")


def test_packing_saves_the_repeated_prompts():
    from slime.backends.megatron_utils.packing import collate, group_rows, row_width

    data = _data()
    groups = group_rows(list(range(5)), data)
    assert sum(row_width(g, data) for g in groups) == 7 + 10 + 5 + 6  # vs 3 * 7 + 10 + 2 * 5 + 6
    mb = collate(groups, data)
    # a response token never sees another response of its group
    first_resp = slice(7, 10)
    second_resp = slice(10, 16)
    assert mb.attention_mask[0, 0, second_resp, first_resp].all()
    assert not mb.attention_mask[0, 0, second_resp, :7].any()
    assert mb.position_ids[0, 10].item() == 7  # the second response continues the prompt too


def test_rows_follow_group_ids():
    import dataclasses

    from slime.backends.megatron_utils.packing import collate, group_rows

    data = _data()
    assert group_rows([0, 1, 2, 3, 4], data) == [[0, 1, 2], [3, 4]]
    assert group_rows([1, 2, 4], data) == [[1, 2], [4]]  # a subset (a step or a DP share) keeps its groups
    # Two groups with the same prompt stay two rows: the ids, not the prompt tokens, decide.
    same_prompt = dataclasses.replace(data, tokens=data.tokens[:3] + [data.tokens[0][:7] + r for r in ([1, 2], [3])],
                                      prompt_lens=[7] * 5,
                                      rollout_logprobs=data.rollout_logprobs[:3] + [[0.0] * 2, [0.0]])
    rows = group_rows(list(range(5)), same_prompt)
    assert rows == [[0, 1, 2], [3, 4]]
    assert collate(rows, same_prompt).tokens.shape == (2, 7 + 10)


def test_logits_only_at_backward_is_deterministic_with_repeated_positions():
    """A shared prompt's last position is selected once per response; its gradient must be
    summed in index order, the same way every run (advanced indexing summed it with atomics
    from two threads, in a different order each time)."""
    from torch import nn

    from slime.backends.megatron_utils.packing import logits_only_at

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.output_layer = nn.Linear(576, 8, bias=False)

        def forward(self, hidden):
            return self.output_layer(hidden)

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(0)
        model, hidden = Toy(), torch.randn(128, 1, 576, requires_grad=True)
        # four responses of one prompt, each starting at the prompt's last position (40); 80 x 576
        # gradient elements, enough for torch to split the CPU backward over threads
        cols = torch.cat([torch.cat([torch.tensor([40]), torch.arange(41 + 20 * k, 60 + 20 * k)]) for k in range(4)])
        rows = torch.zeros_like(cols)
        upstream = torch.randn(1, len(cols), 8)
        grads = []
        for _ in range(20):
            hidden.grad = None
            with logits_only_at(model, rows, cols):
                out = model(hidden)
            out.backward(upstream)
            grads.append(hidden.grad.clone())
    finally:
        torch.set_num_threads(threads)
    per_position = (upstream[0] @ model.output_layer.weight).detach()  # [T, h]
    expected = torch.zeros(128, 576)
    for i, c in enumerate(cols.tolist()):  # in index order
        expected[c] += per_position[i]
    for g in grads:
        assert torch.equal(g[:, 0], expected)
