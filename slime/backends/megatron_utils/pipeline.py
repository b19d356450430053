"""Pipeline parallelism (PP > 1) for the RL loss: megatron-core's 1F1B schedule over packed micro-batches.

Each stage holds a contiguous block of layers (and, on the first, the embedding; on the last, the
output layer).  :func:`run_pipeline` hands megatron's ``get_forward_backward_func()`` the packed
micro-batches of one optimizer step; activations ``[S, b, h]`` (``[S/TP, b, h]`` under sequence
parallelism) travel between stages with their shapes (``variable_seq_lengths``: micro-batches differ
in width and rows), and the backward pass runs in 1F1B order.

Only the last stage sees logits.  ``on_logits(i, mb, logits)`` is called there per micro-batch with
the ``[T, V_padded]`` logits of its response tokens (gathered over TP) and returns the micro-batch's
loss, already scaled for the step (megatron adds no scaling: ``calculate_per_token_loss``).  Every
quantity the RL update needs (log-probs, KL against the adapters-off reference, entropy, the
rollout gap) is therefore computed on the last stage and summed over the pipeline group by the
caller; gradients of the adapters on every stage come from the schedule's backward.
"""

from __future__ import annotations

import contextlib
from functools import partial
from typing import Callable, Sequence

import torch
from torch import nn

from slime.backends.megatron_utils.packing import PackedBatch, logits_only_at, rope_at_positions
from slime.backends.megatron_utils.parallel import gather_vocab

OnLogits = Callable[[int, PackedBatch, torch.Tensor], torch.Tensor]


def is_last_stage() -> bool:
    from megatron.core import parallel_state

    return parallel_state.is_pipeline_last_stage()


def configure_for_pipeline(chunks: Sequence[nn.Module]) -> None:
    """Micro-batches of different shapes, and a loss that is already the step's token mean."""
    for chunk in chunks:
        chunk.config.variable_seq_lengths = True
        chunk.config.calculate_per_token_loss = True


def run_pipeline(chunks: Sequence[nn.Module], batches: Sequence[PackedBatch], on_logits: OnLogits, *,
                 forward_only: bool = False) -> None:
    """One pass of ``batches`` through the pipeline (forward and backward unless ``forward_only``).

    Collective over the pipeline group (and, inside the model, over TP): every stage of a
    data-parallel replica calls it with the same micro-batches.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not batches:
        return
    last = is_last_stage()
    order = iter(range(len(batches)))

    def forward_step(data_iterator, model):
        index = next(data_iterator)
        mb = batches[index]
        select = logits_only_at(model, mb.pred_row, mb.pred_col) if last else contextlib.nullcontext()
        with rope_at_positions(model, mb.position_ids), select:
            output = model(mb.tokens, mb.position_ids, mb.attention_mask)
        return output, partial(_loss, on_logits, index, mb)

    first = batches[0]
    with torch.no_grad() if forward_only else contextlib.nullcontext():
        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=order, model=list(chunks), num_microbatches=len(batches),
            seq_length=first.tokens.shape[1], micro_batch_size=first.tokens.shape[0], forward_only=forward_only,
        )


def _loss(on_logits: OnLogits, index: int, mb: PackedBatch, output: torch.Tensor):
    """megatron's loss-function contract: ``(loss, num_tokens, reduced)``; the loss is ``on_logits``'s."""
    logits = gather_vocab(output[:, 0])  # [T, 1, V/tp] -> [T, V_padded]
    loss = on_logits(index, mb, logits)
    return loss, torch.tensor(mb.num_tokens, dtype=torch.int), {}
