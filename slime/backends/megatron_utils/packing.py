"""Train on each prompt once per group: one row holds a prompt and all its sampled responses.

GRPO samples every prompt n times.  Run naively, the trainer recomputes the prompt n times.
Instead a group becomes one row

    [ prompt (P tokens) | response 1 (L1) | response 2 (L2) | ... ]

with positions ``0..P-1, P..P+L1-1, P..P+L2-1, ...`` (each response continues the prompt) and
an attention mask that lets a response token see the prompt and the earlier tokens of its own
response only.  Every hidden state then equals the one of the unpacked sequence ``prompt +
response i``, so log-probs are identical (tests check it), at ``P + sum L_i`` tokens instead
of ``n P + sum L_i``.  The first token of every response is predicted by the logits of the
last prompt position, so targets are gathered by explicit (row, position) indices.

All per-token outputs are flat ``[T]`` vectors over the response tokens of the micro-batch.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from slime.rollout.batch import RolloutBatch


@dataclass
class PackedBatch:
    """One micro-batch. ``tokens, position_ids: [b, S]``; ``attention_mask: [b, 1, S, S]`` (True =
    masked out); per response token (``[T]``): ``pred_row, pred_col`` (whose logits predict it),
    ``targets``, ``rollout_logp``, ``advantages`` and ``sample`` (index into ``index``)."""

    tokens: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor
    pred_row: torch.Tensor
    pred_col: torch.Tensor
    targets: torch.Tensor
    rollout_logp: torch.Tensor
    advantages: torch.Tensor
    sample: torch.Tensor
    index: list[int]

    @property
    def num_tokens(self) -> int:
        return int(self.targets.numel())


def group_rows(samples: list[int], batch: RolloutBatch) -> list[list[int]]:
    """Sample indices into rows: consecutive ``samples`` with the same ``batch.group_ids`` form one
    row (samples of one group are consecutive in a rollout and share their prompt)."""
    groups: list[list[int]] = []
    for i in samples:
        if groups and batch.group_ids[groups[-1][-1]] == batch.group_ids[i]:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def row_width(group: list[int], batch: RolloutBatch) -> int:
    """``P + sum_i L_i``: the shared prompt once, then every response of the row."""
    prompt_len = batch.prompt_lens[group[0]]
    return prompt_len + sum(len(batch.tokens[i]) - prompt_len for i in group)


def plan_micro_batches(groups: list[list[int]], batch: RolloutBatch, micro_batch_size: int,
                       max_tokens: int | None) -> list[list[list[int]]]:
    """Rows (groups), longest first, into micro-batches of at most ``micro_batch_size`` samples or,
    when ``max_tokens`` is set, at most that many padded tokens (a lone row may exceed it)."""
    order = sorted(groups, key=lambda g: row_width(g, batch), reverse=True)
    batches: list[list[list[int]]] = []
    for group in order:
        current = batches[-1] if batches else None
        if current is None:
            fits = False
        elif max_tokens is not None:
            fits = row_width(current[0], batch) * (len(current) + 1) <= max_tokens
        else:
            fits = sum(len(g) for g in current) + len(group) <= micro_batch_size
        if fits:
            current.append(group)
        else:
            batches.append([group])
    return batches


def default_device() -> torch.device:
    """Where the model's inputs live: the current CUDA device on GPU machines, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def collate(rows: list[list[int]], batch: RolloutBatch, device: torch.device | str | None = None,
            width_multiple: int = 1, *, width: int = 0, num_rows: int = 0) -> PackedBatch:
    """Build the packed tensors for rows of sample groups (see the module docstring).

    The tensors are built on the CPU and moved once to ``device`` (default: :func:`default_device`,
    where megatron puts the model), so the batch can be fed to the model and mixed with its outputs.
    ``S`` is rounded up to a multiple of ``width_multiple`` (sequence parallelism splits the
    sequence into TP equal slices); the extra positions are padding like any other.  ``width``
    and ``num_rows`` pad the batch to at least ``[num_rows, width]`` with padding rows (expert
    parallelism needs one shape on every rank of the group); with no ``rows`` at all the batch
    is padding only and has no response tokens (``T = 0``).
    """
    needed = max((row_width(g, batch) for g in rows), default=1)
    width = max(width, -(-needed // width_multiple) * width_multiple)
    b = max(len(rows), num_rows)
    tokens = torch.zeros(b, width, dtype=torch.long)
    positions = torch.zeros(b, width, dtype=torch.long)
    allowed = torch.zeros(b, width, width, dtype=torch.bool)
    pred_row, pred_col, targets, rollout_logp, advantages, sample = [], [], [], [], [], []
    index: list[int] = []
    for r, group in enumerate(rows):
        prompt_len = batch.prompt_lens[group[0]]
        tokens[r, :prompt_len] = torch.tensor(batch.prompt(group[0]))
        positions[r, :prompt_len] = torch.arange(prompt_len)
        allowed[r, :prompt_len, :prompt_len] = torch.ones(prompt_len, prompt_len, dtype=torch.bool).tril()
        start = prompt_len
        for i in group:
            response = batch.response(i)
            n = len(response)
            end = start + n
            tokens[r, start:end] = torch.tensor(response)
            positions[r, start:end] = torch.arange(prompt_len, prompt_len + n)
            allowed[r, start:end, :prompt_len] = True
            allowed[r, start:end, start:end] = torch.ones(n, n, dtype=torch.bool).tril()
            pred_row += [r] * n
            pred_col += [prompt_len - 1] + list(range(start, end - 1))
            targets += response
            rollout_logp += list(batch.rollout_logprobs[i][:n])
            advantages += [batch.advantages[i]] * n
            sample += [len(index)] * n
            index.append(i)
            start = end
    # Padding positions attend to themselves only: a fully masked row would give NaN, and
    # 0 x NaN would then leak into real positions through the value matmul.
    allowed[:, torch.arange(width), torch.arange(width)] = True
    device = default_device() if device is None else torch.device(device)

    def put(t: torch.Tensor) -> torch.Tensor:
        return t if t.device == device else t.to(device)

    return PackedBatch(
        tokens=put(tokens), position_ids=put(positions), attention_mask=put(~allowed.unsqueeze(1)),
        pred_row=put(torch.tensor(pred_row, dtype=torch.long)), pred_col=put(torch.tensor(pred_col, dtype=torch.long)),
        targets=put(torch.tensor(targets, dtype=torch.long)),
        rollout_logp=put(torch.tensor(rollout_logp, dtype=torch.float32)),
        advantages=put(torch.tensor(advantages, dtype=torch.float32)), sample=put(torch.tensor(sample, dtype=torch.long)),
        index=index,
    )


@contextlib.contextmanager
def rope_at_positions(model: nn.Module, position_ids: torch.Tensor):
    """Make megatron's RoPE use ``position_ids [b, S]`` instead of ``0..S-1`` inside the block.

    megatron-core's GPTModel computes rotary frequencies for positions ``0..S-1`` shared by the
    batch; here they become per-row ``[S, b, 1, d]`` frequencies, which its rotary kernels
    broadcast over heads.
    """
    rope = getattr(model, "rotary_pos_emb", None)
    if rope is None:
        yield
        return
    original = rope.forward

    def forward(max_seq_len: int, *args, **kwargs) -> torch.Tensor:
        table = original(int(position_ids.max()) + 1, *args, **kwargs)  # [P, 1, 1, d]
        return table[position_ids.t(), 0]  # [S, b, 1, d]

    rope.forward = forward
    try:
        yield
    finally:
        del rope.forward  # back to the class's method


def _take_rows(flat: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``flat[index]`` ``[T, h]`` whose backward sums repeated rows in a fixed order.

    On the CPU, advanced indexing's backward (``index_put_`` with accumulate) adds with atomics
    from several threads, in a different order each run (it made whole training runs diverge);
    ``index_select``'s (``index_add_``) is serial there.  On CUDA it is the other way round:
    ``index_add_`` uses atomics and ``index_put_`` sorts the indices first.
    """
    return flat.index_select(0, index) if flat.device.type == "cpu" else flat[index]


@contextlib.contextmanager
def logits_only_at(model: nn.Module, rows: torch.Tensor, cols: torch.Tensor):
    """Inside the block, the model's output layer sees only the hidden states at ``(rows, cols)``.

    The forward then returns ``[T, 1, V/tp]`` logits for those T positions instead of
    ``[b, S, V/tp]``: the vocabulary projection (a fifth of SmolLM2's FLOPs) and its backward
    run only where a response token is predicted, and the full logits never exist.  The T
    positions go in as a batch of length-1 sequences (``[1, T, h]``): the gradient reaching
    the projection is then contiguous and its backward is one matmul, where ``[T, 1, h]``
    made torch expand the weight per token (measured: 1.2 s instead of ~0.2 s per call).

    A position can be selected more than once (a shared prompt's last token predicts the first
    token of every response), so backward sums several gradients into one row; see
    :func:`_take_rows` for doing that in the same order every run.

    Under sequence parallelism the output layer receives this rank's slice ``[S/tp, b, h]`` and
    would all-gather it along the sequence.  The positions are picked from the whole sequence,
    so the hidden states are gathered first (backward: this rank's slice of the gradient, which
    is complete on every rank) and the output layer runs as under plain TP, all-reducing the
    gradient of its input (megatron does the same for its last-token logits in inference).
    """
    output_layer = model.output_layer
    sequence_parallel = bool(getattr(output_layer, "sequence_parallel", False))

    def select(module, args, kwargs):
        hidden = args[0]  # [S, b, h] ([S/tp, b, h] under SP), sequence first as everywhere in megatron
        if sequence_parallel:
            from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

            hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False,
                                                          group=output_layer.tp_group)
        picked = _take_rows(hidden.reshape(-1, hidden.shape[-1]), cols * hidden.shape[1] + rows)
        return (picked.unsqueeze(0), *args[1:]), kwargs

    handle = output_layer.register_forward_pre_hook(select, with_kwargs=True)
    output_layer.sequence_parallel = False
    try:
        yield
    finally:
        handle.remove()
        output_layer.sequence_parallel = sequence_parallel
