"""LoRA self-check: ``python slime_plugins/lora/test_lora.py`` (from the repository root or this folder).

Builds a tiny megatron-core GPT model on this machine (CPU + gloo when there is no GPU), puts
LoRA in it exactly as training does, and verifies the properties training relies on.  Prints
one line per check and exits non-zero on the first failure.  The full suite is ``make test``.
"""

from __future__ import annotations

import socket
import time
import warnings

import torch

# megatron-core warns about optional CUDA extensions (Apex, TransformerEngine) it can do without.
warnings.filterwarnings("ignore")

TINY = dict(architectures=["Qwen3ForCausalLM"], num_hidden_layers=2, hidden_size=64, intermediate_size=128,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=256, tie_word_embeddings=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check(description: str, condition: bool) -> None:
    if not condition:
        print(f"FAIL  {description}", flush=True)
        raise SystemExit(1)
    print(f"ok    {description}", flush=True)


def _build():
    """A plain model, and the same model with LoRA (r=8) plus its optimizer, from one base state."""
    from slime.backends.megatron_utils.arch import ModelArch
    from slime.backends.megatron_utils.model import initialize_model_and_optimizer
    from slime.backends.megatron_utils.parallel import init_parallel
    from slime.utils.arguments import parse_args

    init_parallel(0, 1, master_port=_free_port())
    arch = ModelArch.from_hf_config(TINY)
    torch.manual_seed(0)
    plain = initialize_model_and_optimizer(parse_args(["--lr", "1e-2"]), arch=arch).model[0]
    base_state = {k: v.clone() for k, v in plain.state_dict().items() if not k.endswith("_extra_state")}
    args = parse_args(["--use-lora", "--lora-r", "8", "--lora-alpha", "16", "--lr", "1e-3"])
    built = initialize_model_and_optimizer(args, arch=arch)
    model, optimizer = built.model[0], built.optimizer
    missing, unexpected = model.load_state_dict(base_state, strict=False)
    check("a base checkpoint loads into the LoRA model under its original names",
          not unexpected and all(k.endswith("_extra_state") for k in missing))
    return plain, model, optimizer


def _check_training(model, optimizer, ids, pos) -> None:
    """Only the adapters are optimised, they learn, and the base stays bitwise frozen."""
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = model(ids, pos, None, labels=ids).mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    check(f"training lowers the loss ({losses[0]:.4f} -> {losses[-1]:.4f})", losses[-1] < losses[0])
    check("no frozen parameter received a gradient",
          all(p.grad is None for p in model.parameters() if not p.requires_grad))
    check("every base parameter is bitwise unchanged",
          all(torch.equal(p, frozen_before[n]) for n, p in model.named_parameters() if not p.requires_grad))
    check("both lora_A and lora_B changed",
          all(not torch.equal(p, lora_before[n]) for n, p in model.named_parameters() if p.requires_grad))


def _check_switches(plain, model, ids, pos) -> None:
    """disable_adapters gives the base; merge gives the adapter's function; bad targets are errors."""
    from slime_plugins.lora.lora_layer import apply_lora_to_model, disable_adapters, merge_lora, unmerge_lora

    with torch.no_grad():
        tuned = model(ids, pos, None)
        with disable_adapters(model):
            check("disable_adapters gives the base model's output exactly", torch.equal(model(ids, pos, None), plain(ids, pos, None)))
        merge_lora(model)
        merged_diff = (model(ids, pos, None) - tuned).abs().max().item()
        unmerge_lora(model)
    check(f"merged forward equals adapter forward (max diff {merged_diff:.1e} <= 1e-5)", merged_diff <= 1e-5)
    try:
        apply_lora_to_model(model, ["linear_fc10"], r=8, lora_alpha=16)
        check("a target that matches nothing is an error", False)
    except ValueError as exc:
        check(f"a target that matches nothing is an error ({exc})", "linear_fc10" in str(exc))


def main() -> None:
    from slime_plugins.lora.lora_layer import LoRALinear

    start = time.time()
    plain, model, optimizer = _build()
    wrapped = [m for m in model.modules() if isinstance(m, LoRALinear)]
    check(f"LoRA wraps the 4 target modules in each of the 2 layers ({len(wrapped)} LoRALinear)", len(wrapped) == 8)
    check("lora_A is random (Kaiming-uniform), lora_B is zero",
          all(m.lora_A.abs().sum() > 0 and m.lora_B.abs().sum() == 0 for m in wrapped))
    # Inputs live where megatron put the model (the current CUDA device on GPU machines).
    device = next(model.parameters()).device
    ids = torch.randint(0, TINY["vocab_size"], (4, 16), generator=torch.Generator().manual_seed(1)).to(device)
    pos = torch.arange(16, device=device).expand(4, -1)
    with torch.no_grad():
        check("at init the LoRA model's logits equal the base model's exactly",
              torch.equal(model(ids, pos, None), plain(ids, pos, None)))
    lora_ids = {id(p) for m in wrapped for p in m.lora_parameters()}
    check("the optimizer holds exactly the LoRA parameters", {id(p) for p in optimizer.params} == lora_ids)
    _check_training(model, optimizer, ids, pos)
    _check_switches(plain, model, ids, pos)
    print(f"\nAll LoRA checks passed in {time.time() - start:.1f} s.", flush=True)


if __name__ == "__main__":
    main()
