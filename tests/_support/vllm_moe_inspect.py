"""Load PEFT adapters into vLLM and dump the weight changes vLLM would apply (run with the vLLM venv).

    python vllm_moe_inspect.py BASE_DIR MAX_LORA_RANK OUT_DIR NAME=ADAPTER_DIR [NAME=ADAPTER_DIR ...]

One offline ``LLM`` (CPU, fp32, eager, LoRA enabled) is started on ``BASE_DIR``; each adapter is
added with ``llm_engine.add_lora``, activated, and for every module vLLM wrapped with LoRA the
stacked buffers are read back as per-HF-module deltas ``B @ A`` (vLLM folds the scaling into
``B``): ``qkv_proj`` -> q/k/v_proj, ``gate_up_proj`` -> gate/up_proj, a fused-MoE ``experts``
wrapper -> ``experts.{e}.gate_proj/up_proj/down_proj``; an embedding or lm_head wrapper -> its raw
``A`` and ``B`` flattened (zero unless the adapter touched it).  The deltas of adapter ``NAME`` are
written to ``OUT_DIR/NAME.safetensors`` (keys: HF module names).  Nothing is generated: on CPUs
vLLM cannot run a forward pass of an MoE model with LoRA enabled.

The last stdout line is ``VLLM_MOE_INSPECT <json>`` with, per adapter, either
``{"ok": true, "wrappers": {vLLM module: wrapper class}}`` or ``{"ok": false, "error": "Type: msg"}``,
plus ``"startup_s"`` (seconds to build the engine).
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # apply_model then runs in this process's engine

MARKER = "VLLM_MOE_INSPECT "
PACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def deltas_of(model, lora_id: int) -> tuple[dict, dict]:
    """(HF module -> B @ A as vLLM stores it, vLLM module -> wrapper class) for adapter ``lora_id``."""
    manager = model.lora_manager
    manager.activate_adapter(lora_id)
    slot = manager.lora_index_to_id.index(lora_id)
    deltas, wrappers = {}, {}
    for name, module in manager.modules.items():
        wrappers[name] = type(module).__name__
        if hasattr(module, "w13_lora_a_stacked"):  # FusedMoEWithLoRA: [max_loras, E, r, in] per slice
            a13, b13 = module.w13_lora_a_stacked, module.w13_lora_b_stacked
            if len(a13) != 2:
                raise RuntimeError(f"{name}: expected separate w1/w3 LoRA slices, got {len(a13)}")
            a2, b2 = module.w2_lora_a_stacked[0][slot], module.w2_lora_b_stacked[0][slot]
            for e in range(a2.shape[0]):
                for proj, (a, b) in (("gate_proj", (a13[0][slot][e], b13[0][slot][e])),
                                     ("up_proj", (a13[1][slot][e], b13[1][slot][e])),
                                     ("down_proj", (a2[e], b2[e]))):
                    deltas[f"{name}.{e}.{proj}"] = (b.float() @ a.float()).cpu()
            continue
        if not isinstance(module.lora_a_stacked, (tuple, list)):  # embedding / lm_head: no B @ A to form
            deltas[name] = torch.cat([module.lora_a_stacked[slot].flatten(), module.lora_b_stacked[slot].flatten()])
            continue
        prefix, _, leaf = name.rpartition(".")
        parts = PACKED.get(leaf, (leaf,))
        if len(parts) != len(module.lora_a_stacked):
            raise RuntimeError(f"{name}: {len(module.lora_a_stacked)} LoRA slices, expected {len(parts)}")
        for part, a, b in zip(parts, module.lora_a_stacked, module.lora_b_stacked):
            deltas[f"{prefix}.{part}"] = (b[slot, 0].float() @ a[slot, 0].float()).cpu()
    return deltas, wrappers


def main(argv: list[str]) -> None:
    base, max_rank, out_dir, *adapters = argv
    from safetensors.torch import save_file
    from vllm import LLM
    from vllm.lora.request import LoRARequest

    start = time.perf_counter()
    llm = LLM(model=base, enable_lora=True, max_lora_rank=int(max_rank), max_loras=1, dtype="float32",
              enforce_eager=True, skip_tokenizer_init=True, max_model_len=128, max_num_seqs=4,
              max_num_batched_tokens=128, seed=0)
    report: dict = {"startup_s": round(time.perf_counter() - start, 2), "adapters": {}}
    for lora_id, spec in enumerate(adapters, start=1):
        name, _, path = spec.partition("=")
        try:
            llm.llm_engine.add_lora(LoRARequest(name, lora_id, path))
            deltas, wrappers = llm.apply_model(lambda model, lid=lora_id: deltas_of(model, lid))[0]
            save_file({k: v.contiguous() for k, v in deltas.items()}, os.path.join(out_dir, f"{name}.safetensors"))
            llm.llm_engine.remove_lora(lora_id)
            report["adapters"][name] = {"ok": True, "wrappers": wrappers}
        except Exception as exc:  # reported to the test, which decides what is expected
            report["adapters"][name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:500]}
    print(MARKER + json.dumps(report), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
