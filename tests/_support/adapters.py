"""LoRA adapters with random (nonzero) B, for tests: an adapter at init (B = 0) changes nothing,
so a test of loading, merging or routing an adapter needs one whose every module matters.

``peft_adapter_with_random_b(base, out)`` is the one helper for a peft-made adapter on a Hugging
Face checkpoint; ``randomize_lora_b_(chunks)`` gives our own megatron-core LoRA modules random B's.
"""

from __future__ import annotations

from pathlib import Path

import torch


def peft_adapter_with_random_b(base: str | Path, out: str | Path | None = None, *, seed: int = 0,
                               b_std: float | None = 0.2, r: int = 4, lora_alpha: int = 8,
                               target_modules: str | list[str] = "all-linear", **config):
    """A peft LoRA (``r``, ``lora_alpha``, ``target_modules``, plus any other ``LoraConfig`` field in
    ``config``) on the fp32 checkpoint ``base``, with every B random.

    Returns the ``PeftModel`` (adapter name ``"default"``, eval mode), first saved to ``out`` when
    given (``adapter_config.json`` + ``adapter_model.safetensors``, loadable with
    ``PeftModel.from_pretrained``).  Everything is drawn after ``torch.manual_seed(seed)``:
    A is peft's default init (Kaiming-uniform) and B ~ N(0, ``b_std``); ``b_std=None`` instead
    uses peft's ``init_lora_weights=False`` (A and B both with ``nn.Linear``'s uniform init).
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if b_std is None:
        config = {"init_lora_weights": False, **config}
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=target_modules,
                                                  **config))
    if b_std is not None:
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, b_std)
    if out is not None:
        peft_model.save_pretrained(out)
    return peft_model.eval()


@torch.no_grad()
def randomize_lora_b_(chunks, seed: int = 0, std: float = 0.3) -> None:
    """Give every LoRA module of our megatron-core model (``chunks[0]``, TP=1) a random B ~ N(0, ``std``)
    from a generator seeded ``seed``: a trained-looking adapter, in which every module changes the output."""
    from slime_plugins.lora.lora_layer import lora_modules

    gen = torch.Generator().manual_seed(seed)
    for _, layer in lora_modules(chunks[0]):
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * std)
