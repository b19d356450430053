"""hf_convert against transformers: layouts, TP shards, load/export round trips, logits, errors.

Real components throughout: tiny random HF checkpoints (tests/_support/tiny_models.py), our
megatron-core GPTModel from ``get_model``, transformers' ``AutoModelForCausalLM`` as the
reference, and real gloo processes for TP=2 and PP=2.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from slime.backends.megatron_utils import hf_convert as hc
from slime.backends.megatron_utils.arch import ModelArch
from slime.backends.megatron_utils.hf_checkpoint import save_hf_checkpoint
from slime.backends.megatron_utils.parallel import gather_vocab
from slime.utils.errors import UserError
from tests._support.dist import run_distributed
from tests._support.numerics import arch_tolerance, assert_close
from tests._support.tiny_models import TINY_SHAPES, make_tiny_checkpoint

SEQ, BATCH = 10, 2  # even: sequence parallelism splits the sequence over TP


def _arch(heads: int, groups: int, head_dim: int) -> ModelArch:
    base = ModelArch.from_hf_config({"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 1, "hidden_size": 8,
                                     "intermediate_size": 8, "num_attention_heads": heads, "vocab_size": 10})
    return dataclasses.replace(base, num_query_groups=groups, head_dim=head_dim)


# ----------------------------------------------------------------------------- pure layouts


def test_qkv_order_is_per_query_group():
    # H=4 heads, G=2 groups, d=1: rows are labelled so the order is visible.
    arch = _arch(heads=4, groups=2, head_dim=1)
    q, k, v = torch.tensor([0.0, 1, 2, 3]), torch.tensor([100.0, 101]), torch.tensor([200.0, 201])
    fused = hc.qkv_hf_to_megatron(q, k, v, arch)
    assert fused.tolist() == [0, 1, 100, 200, 2, 3, 101, 201]
    assert [t.tolist() for t in hc.qkv_megatron_to_hf(fused, arch)] == [q.tolist(), k.tolist(), v.tolist()]


@pytest.mark.parametrize("heads,groups,head_dim", [(4, 4, 3), (4, 2, 5), (6, 2, 4), (3, 1, 2)])
@pytest.mark.parametrize("trailing", [(), (7,), (2,)], ids=["bias", "weight", "lora_B"])
def test_qkv_round_trip(heads, groups, head_dim, trailing):
    arch = _arch(heads, groups, head_dim)
    q = torch.randn(heads * head_dim, *trailing)
    k, v = torch.randn(groups * head_dim, *trailing), torch.randn(groups * head_dim, *trailing)
    fused = hc.qkv_hf_to_megatron(q, k, v, arch)
    assert fused.shape == ((heads + 2 * groups) * head_dim, *trailing)
    for got, want in zip(hc.qkv_megatron_to_hf(fused, arch), (q, k, v)):
        assert torch.equal(got, want)


def test_qkv_rejects_rows_that_do_not_fit_the_arch():
    with pytest.raises(ValueError, match="do not fit"):
        hc.qkv_hf_to_megatron(torch.zeros(4), torch.zeros(3), torch.zeros(2), _arch(4, 2, 1))


def test_fc1_round_trip_is_gate_then_up():
    gate, up = torch.randn(6, 4), torch.randn(6, 4)
    fused = hc.fc1_hf_to_megatron(gate, up)
    assert torch.equal(fused[:6], gate) and torch.equal(fused[6:], up)
    assert all(torch.equal(a, b) for a, b in zip(hc.fc1_megatron_to_hf(fused), (gate, up)))


@pytest.mark.parametrize("kind", hc.PARAM_KINDS)
@pytest.mark.parametrize("tp", [1, 2, 3])
def test_tp_shard_then_gather_is_identity(kind, tp):
    full = torch.randn(12, 6)
    shards = [hc.tp_shard(kind, full, r, tp) for r in range(tp)]
    assert torch.equal(hc.tp_gather(kind, shards), full)


def test_fc1_shard_holds_its_gate_and_up_chunks():
    gate, up = torch.arange(4.0).unsqueeze(1), torch.arange(10.0, 14.0).unsqueeze(1)
    full = hc.fc1_hf_to_megatron(gate, up)
    shards = [hc.tp_shard(hc.COLUMN_GATED, full, r, 2) for r in range(2)]
    assert [s.flatten().tolist() for s in shards] == [[0, 1, 10, 11], [2, 3, 12, 13]]
    assert torch.equal(hc.fc1_local_to_global(shards), full)


def test_qkv_shard_holds_whole_query_groups():
    arch = _arch(heads=6, groups=2, head_dim=3)
    q, k, v = torch.randn(18, 5), torch.randn(6, 5), torch.randn(6, 5)
    shard1 = hc.tp_shard(hc.COLUMN, hc.qkv_hf_to_megatron(q, k, v, arch), 1, 2)
    one_group = dataclasses.replace(arch, num_attention_heads=3, num_query_groups=1)
    assert torch.equal(shard1, hc.qkv_hf_to_megatron(q[9:], k[3:], v[3:], one_group))


def test_vocab_shards_are_zero_padded_and_stripped_by_callers():
    full = torch.randn(5, 3)
    shards = [hc.tp_shard(hc.VOCAB, full, r, 2) for r in range(2)]
    assert [s.shape[0] for s in shards] == [3, 3] and torch.all(shards[1][-1] == 0)
    assert torch.equal(hc.tp_gather(hc.VOCAB, shards)[:5], full)
    assert hc.tp_shard(hc.VOCAB, full, 0, 2, padded_rows=8).shape[0] == 4


@pytest.mark.parametrize("name,kind", [
    ("decoder.layers.3.self_attention.linear_qkv.weight", hc.COLUMN),
    ("decoder.layers.3.self_attention.linear_qkv.bias", hc.COLUMN),
    ("decoder.layers.3.self_attention.linear_qkv.lora_B", hc.COLUMN),
    ("decoder.layers.3.self_attention.linear_qkv.lora_A", hc.REPLICATED),
    ("decoder.layers.0.mlp.linear_fc1.base_layer.weight", hc.COLUMN_GATED),
    ("decoder.layers.0.mlp.linear_fc1.lora_B", hc.COLUMN_GATED),
    ("decoder.layers.0.mlp.linear_fc1", hc.COLUMN_GATED),
    ("decoder.layers.0.mlp.linear_fc2.weight", hc.ROW),
    ("decoder.layers.0.self_attention.linear_proj.lora_A", hc.ROW),
    ("decoder.layers.0.self_attention.linear_proj.lora_B", hc.REPLICATED),
    ("embedding.word_embeddings.weight", hc.VOCAB),
    ("output_layer.weight", hc.VOCAB),
    ("decoder.layers.1.self_attention.q_layernorm.weight", hc.REPLICATED),
    ("decoder.final_layernorm.weight", hc.REPLICATED),
])
def test_megatron_param_kind(name, kind):
    assert hc.megatron_param_kind(name) == kind


def test_name_tables():
    assert hc.hf_names(4, "self_attention.linear_qkv", "bias") == tuple(
        f"model.layers.4.self_attn.{p}_proj.bias" for p in "qkv")
    assert hc.hf_names(None, "output_layer", "weight") == ("lm_head.weight",)
    assert hc.split_megatron_name("decoder.layers.12.mlp.linear_fc2.weight") == (12, "mlp.linear_fc2", "weight")
    assert hc.split_megatron_name("decoder.final_layernorm.weight") == (None, "decoder.final_layernorm", "weight")


# ----------------------------------------------------------------------------- real models


def _build(checkpoint: Path, tp: int = 1, *flags: str, lora: bool = False, pp: int = 1):
    """Our model of ``checkpoint`` at TP ``tp`` / PP ``pp`` (plus any other ``flags``), base weights loaded, eval mode."""
    from slime.backends.megatron_utils.model import get_model
    from slime.utils.arguments import parse_args

    argv = ["--hf-checkpoint", str(checkpoint), "--tensor-model-parallel-size", str(tp),
            "--pipeline-model-parallel-size", str(pp), *flags] + (["--use-lora", "--lora-r", "2"] if lora else [])
    arch = ModelArch.from_checkpoint(checkpoint)
    args = parse_args(argv)
    chunks = get_model(args, arch, args.lora)
    hc.load_hf_weights(chunks, arch, checkpoint)
    for chunk in chunks:
        chunk.eval()
    return chunks, arch


def _inputs(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, vocab, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    return ids, torch.arange(SEQ).expand(BATCH, SEQ)


@torch.no_grad()
def _megatron_logits(chunks, arch) -> torch.Tensor:
    device = next(chunks[0].parameters()).device  # CUDA on a GPU machine
    ids, pos = _inputs(arch.vocab_size)
    return gather_vocab(chunks[0](ids.to(device), pos.to(device), None), arch.vocab_size).cpu()


@torch.no_grad()
def _hf_logits(checkpoint: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    return model(_inputs(model.config.vocab_size)[0]).logits


def _file_tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(checkpoint.glob("*.safetensors")) for k, v in load_file(f).items()}


def _round_trip_mismatches(exported: dict, checkpoint: Path) -> list[str]:
    expected = _file_tensors(checkpoint)
    if exported.keys() != expected.keys():
        return sorted(exported.keys() ^ expected.keys())
    return [k for k in expected if not torch.equal(exported[k], expected[k])]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {shape.name: shape.make(root) for shape in TINY_SHAPES}


@pytest.mark.numerics
@pytest.mark.parametrize("shape", [s.name for s in TINY_SHAPES])
def test_tp1_logits_match_transformers_and_export_round_trips(shape, checkpoints, single_process):
    chunks, arch = _build(checkpoints[shape])
    expected = _hf_logits(checkpoints[shape])
    assert_close(_megatron_logits(chunks, arch), expected, atol=arch_tolerance(arch, expected.abs().max()), rtol=0,
                 what=f"{shape}: megatron vs transformers logits")
    assert _round_trip_mismatches(hc.export_hf_weights(chunks, arch), checkpoints[shape]) == []


@pytest.mark.numerics
def test_lora_model_loads_base_weights_and_exports_them_unmerged(checkpoints, single_process):
    path = checkpoints["qwen2-gqa2"]
    chunks, arch = _build(path, lora=True)
    assert any(".base_layer." in n for n, _ in chunks[0].named_parameters())
    expected = _hf_logits(path)
    assert_close(_megatron_logits(chunks, arch), expected, atol=arch_tolerance(arch, expected.abs().max()), rtol=0,
                 what="LoRA at B = 0 vs transformers")
    with torch.no_grad():
        for name, param in chunks[0].named_parameters():
            if name.endswith("lora_B"):
                param.fill_(0.5)
    assert _round_trip_mismatches(hc.export_hf_weights(chunks, arch), path) == []


def test_sharded_checkpoint_loads(tmp_path, single_process):
    from transformers import AutoModelForCausalLM

    path = make_tiny_checkpoint(tmp_path, family="qwen3")
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(path).save_pretrained(sharded, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").is_file() and not (sharded / "model.safetensors").exists()
    chunks, arch = _build(sharded)
    assert _round_trip_mismatches(hc.export_hf_weights(chunks, arch), path) == []


def test_save_hf_checkpoint_is_loadable_by_transformers(tmp_path, checkpoints, single_process):
    path = checkpoints["qwen3-gqa1-tied"]
    chunks, arch = _build(path)
    config = json.loads((path / "config.json").read_text())
    out = save_hf_checkpoint(hc.export_hf_weights(chunks, arch), config, tmp_path / "out")
    assert torch.allclose(_hf_logits(out), _hf_logits(path), atol=0, rtol=0)
    (out / "tokenizer.json").write_text("{}")  # a second save into the directory keeps other files
    save_hf_checkpoint(hc.export_hf_weights(chunks, arch), config, out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary directory left


# ----------------------------------------------------------------------------- user errors


def _rewrite_weights(path: Path, edit) -> None:
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def test_unsupported_architecture_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(UserError, match="GPT2LMHeadModel.*not supported"):
        ModelArch.from_checkpoint(tmp_path)


def test_weights_of_another_model_name_file_and_tensor(tmp_path, single_process):
    path = make_tiny_checkpoint(tmp_path, family="llama")
    wide = make_tiny_checkpoint(tmp_path, family="llama", name="wide", intermediate_size=64)
    shutil.copy(wide / "model.safetensors", path / "model.safetensors")
    with pytest.raises(UserError, match=r"model\.safetensors: tensor model\.layers\.0\.mlp\.\w+_proj\.weight has shape"):
        _build(path)


def test_truncated_file_is_named(tmp_path, single_process):
    path = make_tiny_checkpoint(tmp_path, family="qwen2")
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=r"model\.safetensors: not a readable safetensors file.*truncated"):
        _build(path)


def test_missing_tensor_is_named(tmp_path, single_process):
    path = make_tiny_checkpoint(tmp_path, family="qwen3")
    _rewrite_weights(path, lambda t: t.pop("model.layers.1.self_attn.k_norm.weight"))
    with pytest.raises(UserError, match=r"tensor model\.layers\.1\.self_attn\.k_norm\.weight is missing"):
        _build(path)


def test_tied_lm_head_must_equal_the_embedding(tmp_path, single_process):
    path = make_tiny_checkpoint(tmp_path, family="llama", tie_word_embeddings=True)
    _rewrite_weights(path, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].clone()}))
    _build(path)  # present and equal: fine
    _rewrite_weights(path, lambda t: t.update({"lm_head.weight": t["lm_head.weight"] + 1}))
    with pytest.raises(UserError, match="tie_word_embeddings.*lm_head.weight differs"):
        _build(path)


# ----------------------------------------------------------------------------- TP=2 and PP=2


def _tp2_worker(rank: int, cases: dict[str, tuple[str, torch.Tensor]]) -> dict[str, list[str]]:
    """Per case: checks the logits against transformers' and gather_tp; returns the round-trip mismatches."""
    results = {}
    for name, (path, reference) in cases.items():
        chunks, arch = _build(Path(path), tp=2, lora=name.endswith("+lora"))
        assert_close(_megatron_logits(chunks, arch), reference, atol=arch_tolerance(arch, reference.abs().max()), rtol=0,
                     what=f"{name}: TP=2 megatron vs transformers logits")
        results[name] = _round_trip_mismatches(hc.export_hf_weights(chunks, arch), Path(path))
        for key, local in chunks[0].state_dict().items():
            if key.endswith((".weight", ".bias")):  # this rank's shard is the shard of the gathered whole
                kind = hc.megatron_param_kind(key)
                assert torch.equal(hc.tp_shard(kind, hc.gather_tp(local, kind), rank, 2), local), key
    return results


@pytest.mark.numerics
def test_tp2_logits_match_transformers_and_export_round_trips(checkpoints, tmp_path):
    cases = {name: path for name, path in checkpoints.items()}
    cases["qwen2-gqa2+lora"] = checkpoints["qwen2-gqa2"]
    cases["llama-odd-vocab"] = make_tiny_checkpoint(tmp_path, family="llama", vocab_size=97)  # padded to 98
    payload = {name: (str(path), _hf_logits(path)) for name, path in cases.items()}
    for rank_result in run_distributed(_tp2_worker, 2, tp=2, args=(payload,)):
        for name, mismatches in rank_result.items():
            assert mismatches == [], name


def _pp2_worker(rank: int, path: str) -> tuple[list[str], float]:
    """Round-trip mismatches, and |stage-local layer 0 norm - HF layer (offset) norm|."""
    chunks, arch = _build(Path(path), pp=2)
    offset = 2 * rank  # 4 layers over 2 stages
    local = chunks[0].decoder.layers[0].input_layernorm.weight
    expected = load_file(Path(path) / "model.safetensors")[f"model.layers.{offset}.input_layernorm.weight"]
    return _round_trip_mismatches(hc.export_hf_weights(chunks, arch), Path(path)), (local - expected).abs().max().item()


@pytest.mark.slow  # a second process spawn (~15-30 s on 2 cores)
def test_pp2_loads_each_stage_its_layers_and_export_gathers_them(tmp_path):
    # Untied: megatron's tied-embedding setup under PP calls .cuda(), which cpu_compat does not cover yet.
    path = make_tiny_checkpoint(tmp_path, family="qwen3", num_hidden_layers=4)
    for mismatches, layer_diff in run_distributed(_pp2_worker, 2, tp=1, pp=2, args=(str(path),)):
        assert mismatches == [] and layer_diff == 0.0


# ----------------------------------------------------------------------------- the real model


@pytest.mark.numerics
@pytest.mark.slow
def test_smollm2_logits_match_transformers(smollm2_checkpoint, single_process):
    chunks, arch = _build(smollm2_checkpoint)
    assert_close(_megatron_logits(chunks, arch), _hf_logits(smollm2_checkpoint), atol=1e-4, rtol=0, what="SmolLM2: megatron vs transformers")
