"""Token sampling for the built-in engine: one token per row, and the log-prob the trainer recomputes."""

from __future__ import annotations

import torch

from slime.rollout.engine import SamplingParams


def sample_tokens(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row of ``logits [b, V]``; return ``(tokens [b], logprobs [b])``.

    ``logprobs = log_softmax(logits / T)[token]`` in fp32 over the full vocabulary
    (T = 1 when greedy), i.e. before top-k/top-p: the quantity the trainer recomputes.
    """
    scaled = logits.float() / params.logprob_temperature
    logp = torch.log_softmax(scaled, dim=-1)
    if params.greedy:
        tokens = scaled.argmax(dim=-1)
    else:
        filtered = truncate_logits(scaled, params.top_k, params.top_p)
        probs = logp.exp() if filtered is scaled else torch.softmax(filtered, dim=-1)
        # Inverse-CDF sampling: one uniform per row. torch.multinomial draws an exponential per
        # vocabulary entry instead, 13% of decoding time at a 49k vocabulary.
        cdf = probs.cumsum(dim=-1)
        u = torch.rand(probs.shape[0], 1, generator=generator, dtype=cdf.dtype) * cdf[:, -1:]
        tokens = torch.searchsorted(cdf, u, right=True).clamp_(max=probs.shape[-1] - 1).squeeze(1)
    return tokens, logp.gather(1, tokens[:, None]).squeeze(1)


def truncate_logits(scaled: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set logits outside the top-k, then outside the top-p nucleus, to -inf (``scaled`` itself if neither applies).

    The nucleus is the smallest prefix of tokens sorted by probability whose mass
    reaches ``top_p``: token i is kept iff the mass strictly before it is < top_p,
    so the most likely token always survives.
    """
    out = scaled
    if 0 < top_k < scaled.shape[-1]:
        kth = torch.topk(out, top_k, dim=-1).values[:, -1:]
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(out, dim=-1, descending=True)
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out
