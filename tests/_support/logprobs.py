"""Next-token log-probs of one batch of token ids from each side of the PEFT boundary, for parity tests.

``tokens`` is ``[b, s]`` (no padding); every helper returns ``log p(tokens[:, t+1] | tokens[:, :t+1])``
as ``[b, s-1]`` fp32 on the CPU:

* :func:`megatron_logprobs`: our megatron-core model chunks (the trainer's network, LoRA inside);
* :func:`hf_logprobs`: the plain Hugging Face checkpoint (transformers);
* :func:`peft_logprobs`: that checkpoint with a PEFT adapter directory loaded by peft itself.
"""

from __future__ import annotations

from pathlib import Path

import torch


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``logits [b, s, V]`` -> log-probs ``[b, s-1]`` of the tokens that follow each position."""
    return torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, tokens[:, 1:, None].to(logits.device)).squeeze(-1)


@torch.no_grad()
def megatron_logprobs(chunks, arch, tokens: torch.Tensor) -> torch.Tensor:
    """Our model (``chunks[0]``, eval mode expected), positions ``0..s-1``, causal mask."""
    from slime.backends.megatron_utils.parallel import gather_vocab

    device = next(chunks[0].parameters()).device  # CUDA on a GPU machine
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    logits = gather_vocab(chunks[0](tokens.to(device), positions.to(device), None), arch.vocab_size).cpu()
    return token_logprobs(logits, tokens)


@torch.no_grad()
def hf_logprobs(base: str | Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    return token_logprobs(model(tokens).logits, tokens)


@torch.no_grad()
def peft_logprobs(base: str | Path, adapter: str | Path, tokens: torch.Tensor) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), str(adapter))
    return token_logprobs(model.eval()(tokens).logits, tokens)
