"""The per-expert PEFT layout our writer produces for Qwen3-MoE, read by peft and by vLLM.

A tiny random Qwen3-MoE (4 experts, head_dim 32: vLLM's CPU attention needs >= 32) gets LoRA
adapters with random ``A`` and ``B`` on every attention projection and every expert's
gate/up/down, written with :func:`slime.utils.peft_format.write_peft_dir` and the config of
:func:`slime_plugins.lora.peft_io.peft_adapter_config`, exactly as the trainer saves them.

* peft (in-process): ``PeftModel.from_pretrained`` on ``Qwen3MoeForCausalLM`` gives the logits of
  the plain model whose weights were edited by ``s B A``.
* vLLM (subprocess in the vLLM venv, one engine start; skipped without it): after ``add_lora``
  the weight changes in vLLM's LoRA buffers equal ``s B A`` of the files for every module.
  vLLM on CPUs cannot *run* an MoE model with LoRA (its fused-MoE LoRA kernels are Triton-only),
  so only loading and packing are checked; :func:`vllm_moe_lora_error` is what preflight says.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest
import torch

from slime.backends.megatron_utils.arch import ModelArch
from slime.backends.megatron_utils.hf_checkpoint import hf_param_shapes
from slime.backends.megatron_utils.hf_convert import hf_names, split_megatron_name
from slime.rollout.engines import vllm_moe_lora_error
from slime.rollout.vllm_server import find_vllm_python, vllm_lora_rank, vllm_python_error
from slime.utils.arguments import build_parser
from slime.utils.hf_names import HF_LAYER_PREFIX
from slime.utils.lora_config import LoraConfig
from slime.utils.peft_format import peft_key, read_peft_adapter, write_peft_dir
from slime_plugins.lora.peft_io import peft_adapter_config
from tests._support.tiny_models import make_tiny_checkpoint

VLLM_PYTHON = find_vllm_python(None)
VLLM_MISSING = vllm_python_error(VLLM_PYTHON)
needs_vllm = pytest.mark.skipif(VLLM_MISSING is not None, reason=f"no vLLM environment: {VLLM_MISSING}")
INSPECT = Path(__file__).resolve().parents[1] / "_support" / "vllm_moe_inspect.py"
LORA = LoraConfig(r=4, alpha=8.0)  # scaling 2: a scaling vLLM forgot to fold into B would show
ALL_PROJ = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
_EXPERT = re.compile(rf"^{re.escape(HF_LAYER_PREFIX)}\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)$")


def hf_linears(arch: ModelArch) -> dict[str, tuple[int, int]]:
    """Every HF linear the trainer can put LoRA on (from the Megatron layout), with its ``(out, in)``."""
    shapes = hf_param_shapes(arch)
    out = {}
    for name in arch.linear_shapes():
        layer, module, _ = split_megatron_name(f"{name}.weight")
        for hf in hf_names(layer, module, "weight"):
            rel = hf.removeprefix(f"{HF_LAYER_PREFIX}.{layer}.")
            out[hf.removesuffix(".weight")] = tuple(shapes[rel])
    return out


def write_adapter(out_dir: Path, arch: ModelArch, base: Path, keep, seed: int) -> Path:
    """A per-expert adapter (random A and B, std 0.1) on the HF linears ``keep`` selects, written
    with our writer and the config the trainer writes for these tensors."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, (rows, cols) in sorted(hf_linears(arch).items()):
        if keep(module):
            tensors[peft_key(module, "A")] = torch.randn(LORA.r, cols, generator=gen) * 0.1
            tensors[peft_key(module, "B")] = torch.randn(rows, LORA.r, generator=gen) * 0.1
    return write_peft_dir(out_dir, tensors, peft_adapter_config(LORA, arch, str(base), tensors=tensors))


def expected_deltas(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """``s_m B A`` per HF module, as our reader sees the files."""
    adapter = read_peft_adapter(adapter_dir)
    return {m: adapter.scaling(m) * (b.double() @ a.double()) for m, (a, b) in adapter.modules.items()}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("moe"), family="qwen3_moe", head_dim=32)


@pytest.fixture(scope="module")
def arch(base) -> ModelArch:
    return ModelArch.from_checkpoint(base)


@pytest.fixture(scope="module")
def adapters(base, arch, tmp_path_factory) -> dict[str, Path]:
    """``full``: every attention projection and every expert's gate/up/down (what ``all-linear``
    trains); ``attention``: no expert adapters; ``down_only``: attention plus only the experts'
    down_proj (``--lora-target-modules linear_qkv linear_proj linear_fc2``); ``missing_expert``:
    ``full`` less layer 0's expert 3."""
    root = tmp_path_factory.mktemp("adapters")
    select = {
        "full": lambda m: True,
        "attention": lambda m: ".self_attn." in m,
        "down_only": lambda m: ".self_attn." in m or m.endswith("down_proj"),
        "missing_expert": lambda m: not m.startswith(f"{HF_LAYER_PREFIX}.0.mlp.experts.3."),
    }
    return {name: write_adapter(root / name, arch, base, keep, seed) for seed, (name, keep) in enumerate(select.items())}


def test_writer_layout(adapters, arch):
    """The trainer's config and keys for an MoE adapter: short target names, per-expert keys, one rank."""
    full = read_peft_adapter(adapters["full"])
    assert full.config["target_modules"] == ALL_PROJ
    assert full.config["rank_pattern"] == {} and full.config["alpha_pattern"] == {}
    assert "target_parameters" not in full.config
    experts = [m for m in full.modules if _EXPERT.match(m)]
    assert len(experts) == arch.num_layers * arch.num_experts * 3
    assert len(full.modules) == len(experts) + arch.num_layers * 4
    a, b = full.modules[f"{HF_LAYER_PREFIX}.1.mlp.experts.2.down_proj"]
    assert tuple(a.shape) == (LORA.r, arch.moe_ffn_hidden_size) and tuple(b.shape) == (arch.hidden_size, LORA.r)


# --------------------------------------------------------------------------- peft (in-process)


def edited_model(base: Path, deltas: dict[str, torch.Tensor]):
    """The plain transformers model with every weight edited by its delta (fused expert tensors:
    ``gate_up_proj [E, 2I, H]`` rows ``:I`` gate, ``I:`` up; ``down_proj [E, H, I]``)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    state = model.state_dict()
    for module, delta in deltas.items():
        match = _EXPERT.match(module)
        if match is None:
            state[f"{module}.weight"] += delta.float()
            continue
        layer, expert, proj = int(match[1]), int(match[2]), match[3]
        prefix = f"{HF_LAYER_PREFIX}.{layer}.mlp.experts"
        if proj == "down_proj":
            state[f"{prefix}.down_proj"][expert] += delta.float()
        else:
            inter = state[f"{prefix}.gate_up_proj"].shape[1] // 2
            rows = slice(0, inter) if proj == "gate_proj" else slice(inter, 2 * inter)
            state[f"{prefix}.gate_up_proj"][expert, rows] += delta.float()
    model.load_state_dict(state)
    return model


@torch.no_grad()
# peft's own MoE conversion adds a '.*\.gate_up_proj' rank/alpha pattern and then warns that it
# matched nothing; it is applied (the logits below prove it).
@pytest.mark.filterwarnings("ignore:The following (rank|alpha)_pattern keys did not match:RuntimeWarning")
def test_peft_loads_per_expert_adapter(base, adapters):
    """peft 0.21 converts the per-expert layout onto transformers' fused experts without loss."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[1, 5, 9, 33, 77, 20, 90, 3, 4, 8, 16, 50], [2, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43]])
    plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    peft_model = PeftModel.from_pretrained(plain, str(adapters["full"])).eval()
    got = peft_model(input_ids=ids).logits
    want = edited_model(base, expected_deltas(adapters["full"]))(input_ids=ids).logits
    with peft_model.disable_adapter():
        untouched = peft_model(input_ids=ids).logits
    assert (want - untouched).abs().max() > 0.1, "the adapter barely changes the logits; the check would be blind"
    assert (got - want).abs().max().item() <= 1e-5


# --------------------------------------------------------------------------- vLLM (subprocess)


@pytest.fixture(scope="module")
def vllm_run(base, adapters, tmp_path_factory) -> tuple[dict, Path]:
    """One vLLM engine loads every adapter; its report and the directory of the dumped deltas."""
    out_dir = tmp_path_factory.mktemp("vllm_deltas")
    cmd = [str(VLLM_PYTHON), str(INSPECT), str(base), str(vllm_lora_rank(LORA.r)), str(out_dir),
           *(f"{name}={path}" for name, path in adapters.items())]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - start
    lines = [line for line in done.stdout.splitlines() if line.startswith("VLLM_MOE_INSPECT ")]
    assert done.returncode == 0 and lines, f"vLLM inspect failed (rc {done.returncode}):\n{done.stderr[-4000:]}"
    report = json.loads(lines[-1].removeprefix("VLLM_MOE_INSPECT "))
    print(f"vLLM subprocess {wall:.1f} s (engine start {report['startup_s']} s)")
    return report, out_dir


def vllm_deltas(vllm_run, name: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    report, out_dir = vllm_run
    assert report["adapters"][name]["ok"], report["adapters"][name]
    return load_file(str(out_dir / f"{name}.safetensors"))


def assert_same_deltas(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    """Every adapter module's delta in vLLM equals ``s B A``; every other LoRA slot of vLLM is zero."""
    assert set(want) <= set(got), f"vLLM has no LoRA slot for {sorted(set(want) - set(got))[:5]}"
    worst = max((got[m].double() - want[m]).abs().max().item() for m in want)
    assert worst <= 1e-6, f"vLLM's stored deltas differ from s*B@A by {worst}"
    stray = [m for m in set(got) - set(want) if got[m].abs().max() > 0]
    assert not stray, f"vLLM applies LoRA to modules the adapter lacks: {stray[:5]}"


@needs_vllm
def test_vllm_stores_per_expert_deltas_exactly(vllm_run, adapters, arch):
    got = vllm_deltas(vllm_run, "full")
    wrappers = vllm_run[0]["adapters"]["full"]["wrappers"]
    assert wrappers[f"{HF_LAYER_PREFIX}.0.mlp.experts"] == "FusedMoEWithLoRA"
    assert sum(1 for m in got if _EXPERT.match(m)) == arch.num_layers * arch.num_experts * 3
    assert_same_deltas(got, expected_deltas(adapters["full"]))


@needs_vllm
def test_vllm_attention_only_adapter(vllm_run, adapters):
    """An MoE model's adapter without expert LoRA (``--lora-target-modules linear_qkv linear_proj``) loads."""
    assert_same_deltas(vllm_deltas(vllm_run, "attention"), expected_deltas(adapters["attention"]))


@needs_vllm
@pytest.mark.parametrize("name", ["down_only", "missing_expert"])
def test_vllm_rejects_incomplete_expert_adapters(vllm_run, name):
    """vLLM 0.32 packs gate/up/down of every expert together and fails (a bare AssertionError) when
    an adapted MoE layer lacks any projection of any expert.  If this starts passing, vLLM has
    learnt partial MoE adapters and a preflight check on --lora-target-modules can be relaxed."""
    report, _ = vllm_run
    result = report["adapters"][name]
    assert not result["ok"], f"vLLM now accepts the {name} adapter"
    assert result["error"].startswith("AssertionError"), result["error"]


# --------------------------------------------------------------------------- preflight message


def test_vllm_moe_lora_error():
    assert vllm_moe_lora_error(is_moe=False, on_gpu=False) is None
    assert vllm_moe_lora_error(is_moe=False, on_gpu=True) is None
    assert vllm_moe_lora_error(is_moe=True, on_gpu=True) is None
    message = vllm_moe_lora_error(is_moe=True, on_gpu=False)
    assert message and "\n" not in message
    assert message.startswith("--rollout-engine vllm:") and message.endswith("use --rollout-engine hf")
    # the flag and the engine the message names are real
    assert build_parser().parse_args(["--rollout-engine", "hf"]).rollout_engine == "hf"
