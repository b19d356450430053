"""slime/utils/peft_format.py: PEFT keys, reading/validating/writing an adapter directory, per-module scaling.

Real safetensors files in ``tmp_path`` and, as the reference for ``rank_pattern`` / ``alpha_pattern``,
the real ``peft`` library on a tiny torch module.  Already covered through the plugin in
tests/slime_plugins/lora/test_peft_io.py (not repeated here): an empty directory (no config), a
truncated safetensors header, peft_type IA3 / bias 'all' through ``load_peft_adapter``, an existing
output directory with a stale file being replaced.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from slime.utils.errors import UserError
from slime.utils.peft_format import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    PeftAdapter,
    foreign_base_error,
    parse_peft_key,
    peft_key,
    read_adapter_config,
    read_peft_adapter,
    validate_adapter_config,
    write_peft_dir,
)

Q = "model.layers.0.self_attn.q_proj"
DOWN = "model.layers.1.mlp.down_proj"
CONFIG = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "bias": "none", "use_rslora": False,
          "target_modules": ["down_proj", "q_proj"], "rank_pattern": {r"model\.layers\.1\.mlp\.down_proj": 2},
          "alpha_pattern": {}, "task_type": "CAUSAL_LM"}


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        peft_key(Q, "A"): torch.randn(4, 16, generator=gen),
        peft_key(Q, "B"): torch.randn(16, 4, generator=gen),
        peft_key(DOWN, "A"): torch.randn(2, 24, generator=gen),
        peft_key(DOWN, "B"): torch.randn(16, 2, generator=gen),
    }


@pytest.fixture
def adapter_dir(tmp_path) -> Path:
    return write_peft_dir(tmp_path / "adapter", _tensors(), CONFIG)


def _one_line_error(path, file: Path, match: str) -> str:
    with pytest.raises(UserError, match=match) as info:
        read_peft_adapter(path)
    message = str(info.value)
    assert "\n" not in message and str(file) in message, message
    return message


# ----------------------------------------------------------------------------- keys


@pytest.mark.parametrize("module", [Q, "lm_head", "model.layers.10.mlp.gate_proj", "a.lora_A"])
@pytest.mark.parametrize("which", ["A", "B"])
def test_peft_key_round_trip(module, which):
    key = peft_key(module, which)
    assert key == f"base_model.model.{module}.lora_{which}.weight"
    assert parse_peft_key(key) == (module, which)


def test_peft_key_hand_value():
    assert peft_key(Q, "A") == "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


@pytest.mark.parametrize("key", [
    "model.layers.0.self_attn.q_proj.lora_A.weight",                     # no base_model.model. prefix
    "base_model.model.model.layers.0.self_attn.q_proj.weight",           # a base weight
    "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight",  # in-memory name with adapter
    "base_model.model.model.layers.0.self_attn.q_proj.lora_C.weight",
    "base_model.model.model.layers.0.self_attn.q_proj.lora_A.bias",
    "base_model.model.model.layers.0.self_attn.q_proj.lora_a.weight",
    "base_model.model.model.embed_tokens.lora_embedding_A",
    "base_model.model.lora_A.weight",                                     # no module
    "xbase_model.model.m.lora_A.weight",
    "base_model.model.m.lora_A.weight.extra",
    "",
])
def test_parse_peft_key_rejects_other_keys(key):
    assert parse_peft_key(key) is None


# ----------------------------------------------------------------------------- write / read


def test_write_then_read_round_trips(adapter_dir, tmp_path):
    assert adapter_dir == tmp_path / "adapter"
    assert sorted(p.name for p in adapter_dir.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no staging directory left
    text = (adapter_dir / CONFIG_NAME).read_text()
    assert text == json.dumps(CONFIG, indent=2, sort_keys=True) + "\n"

    adapter = read_peft_adapter(str(adapter_dir))
    assert adapter.path == adapter_dir and adapter.config == CONFIG
    expected = _tensors()
    assert set(adapter.modules) == {Q, DOWN}
    for module, (a, b) in adapter.modules.items():
        assert torch.equal(a, expected[peft_key(module, "A")]) and torch.equal(b, expected[peft_key(module, "B")])
    (qa, qb), (da, db) = adapter.modules[Q], adapter.modules[DOWN]
    assert list(qa.shape) == [4, 16] and list(qb.shape) == [16, 4]  # A [r, in], B [out, r]
    assert list(da.shape) == [2, 24] and list(db.shape) == [16, 2]  # per-module rank


def test_state_dict_reproduces_the_file(adapter_dir):
    on_disk = load_file(adapter_dir / WEIGHTS_NAME)
    state = read_peft_adapter(adapter_dir).state_dict()
    assert sorted(state) == sorted(on_disk) == sorted(_tensors())
    assert all(torch.equal(state[k], on_disk[k]) for k in on_disk)


def test_write_accepts_views_parameters_and_keeps_dtypes(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(3, 8)
    tensors = {
        peft_key("m", "A"): base.t()[:3],                                     # a non-contiguous view [3, 3]
        peft_key("m", "B"): nn.Parameter(torch.ones(5, 3, dtype=torch.bfloat16)),  # requires grad
    }
    assert not tensors[peft_key("m", "A")].is_contiguous()
    adapter = read_peft_adapter(write_peft_dir(tmp_path / "out", tensors, {"r": 3, "lora_alpha": 3}))
    a, b = adapter.modules["m"]
    assert torch.equal(a, base.t()[:3]) and a.dtype == torch.float32
    assert b.dtype == torch.bfloat16 and torch.equal(b, torch.ones(5, 3, dtype=torch.bfloat16))


# ----------------------------------------------------------------------------- scaling


def _adapter(config: dict) -> PeftAdapter:
    return PeftAdapter(Path("/nowhere"), config, {})


def test_scaling_hand_values():
    config = {"r": 8, "lora_alpha": 16, "rank_pattern": {"q_proj": 4},
              "alpha_pattern": {r"layers\.1\.self_attn\.q_proj": 32}}
    adapter = _adapter(config)
    assert adapter.scaling("model.layers.0.self_attn.q_proj") == 16 / 4
    assert adapter.scaling("model.layers.1.self_attn.q_proj") == 32 / 4
    assert adapter.scaling("model.layers.1.self_attn.k_proj") == 16 / 8
    assert adapter.scaling("model.layers.0.self_attn.kq_proj") == 2.0  # 'q_proj' must be a whole dotted suffix
    assert adapter.scaling("model.layers.1.self_attn.q_proj.extra") == 2.0  # ... and a suffix
    assert _adapter({**config, "alpha_pattern": {r"layers\.1\.q_proj": 32}}).scaling(
        "model.layers.1.self_attn.q_proj") == 4.0  # no match: the pattern must cover whole dotted components
    rslora = _adapter({**config, "use_rslora": True})
    assert rslora.scaling("model.layers.1.self_attn.q_proj") == 32 / math.sqrt(4)
    assert rslora.scaling("model.layers.1.self_attn.v_proj") == 16 / math.sqrt(8)


@pytest.mark.parametrize("patterns", [{}, {"rank_pattern": None, "alpha_pattern": None}])
def test_scaling_without_patterns(patterns):
    assert _adapter({"r": 4, "lora_alpha": 8, **patterns}).scaling("anything.q_proj") == 2.0


def test_scaling_first_matching_pattern_wins():
    adapter = _adapter({"r": 8, "lora_alpha": 8, "rank_pattern": {"q_proj": 2, r"layers\.0\.q_proj": 4}})
    assert adapter.scaling("model.layers.0.q_proj") == 4.0  # 8 / 2, the first key, not the more specific one


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(8, 8, bias=False)
        self.k_proj = nn.Linear(8, 4, bias=False)
        self.v_proj = nn.Linear(8, 4, bias=False)


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([_Attention() for _ in range(3)])

    def forward(self, x):
        return x


@pytest.mark.filterwarnings("ignore:The following rank_pattern keys did not match")
@pytest.mark.parametrize("use_rslora", [False, True])
def test_scaling_and_ranks_match_peft(tmp_path, use_rslora):
    """peft's model and peft's reload of the saved directory agree with ``PeftAdapter.scaling``.

    The patterns overlap (``layers.1.q_proj`` matches two rank keys; the first wins) and are given
    in sorted order: peft writes ``adapter_config.json`` with sorted keys, so a reload applies the
    first-match rule in sorted order; with another order peft cannot reload its own adapter.
    ``proj`` matches nothing: a key must cover whole dotted components.
    """
    from peft import LoraConfig, PeftModel, get_peft_model

    rank_pattern = {r"layers\.0\.k_proj": 6, r"layers\.[12]\..*": 3, "proj": 7, "q_proj": 2}
    alpha_pattern = {"0.k_proj": 9, r"layers\.1\.q_proj": 5, "v_proj": 12}
    assert list(rank_pattern) == sorted(rank_pattern) and list(alpha_pattern) == sorted(alpha_pattern)
    torch.manual_seed(0)
    model = get_peft_model(_Tiny(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"],
                                                rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
                                                use_rslora=use_rslora))
    model.save_pretrained(tmp_path / "peft")
    adapter = read_peft_adapter(tmp_path / "peft")

    wrapped = {name: module for name, module in model.base_model.model.named_modules() if hasattr(module, "scaling")}
    assert len(wrapped) == 9 and set(adapter.modules) == set(wrapped)
    scalings = {name: module.scaling["default"] for name, module in wrapped.items()}
    assert len(set(scalings.values())) >= 4  # the patterns really make the modules differ
    for name, module in wrapped.items():
        assert adapter.scaling(name) == pytest.approx(scalings[name], rel=1e-12), name
        a, b = adapter.modules[name]
        assert a.shape == (module.r["default"], module.in_features)
        assert b.shape == (module.out_features, module.r["default"])
    assert scalings["layers.1.q_proj"] == pytest.approx(lora_scaling_ref(5, 3, use_rslora))  # r 3: first key won

    reloaded = PeftModel.from_pretrained(_Tiny(), tmp_path / "peft")
    reloaded_scalings = {name: module.scaling["default"] for name, module in reloaded.base_model.model.named_modules()
                         if hasattr(module, "scaling")}
    assert reloaded_scalings.keys() == scalings.keys()
    for name, value in reloaded_scalings.items():
        assert value == pytest.approx(adapter.scaling(name), rel=1e-12), name


def lora_scaling_ref(alpha, r, use_rslora):
    return alpha / math.sqrt(r) if use_rslora else alpha / r


# ----------------------------------------------------------------------------- validate_adapter_config


GOOD = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "bias": "none", "use_dora": False, "modules_to_save": None,
        "lora_bias": False}


def test_a_valid_config_is_returned_as_is():
    assert validate_adapter_config(GOOD, "x") is GOOD
    assert validate_adapter_config({"r": 1, "lora_alpha": 0.5}, "x") == {"r": 1, "lora_alpha": 0.5}  # defaults


@pytest.mark.parametrize(("config", "match"), [
    ([1, 2], r"^cfg\.json: expected a JSON object$"),
    (None, r"^cfg\.json: expected a JSON object$"),
    ("LORA", r"^cfg\.json: expected a JSON object$"),
    ({**GOOD, "peft_type": "IA3"}, r"^cfg\.json: peft_type is 'IA3', only 'LORA'"),
    ({**GOOD, "bias": "all"}, r"^cfg\.json: bias is 'all'"),
    ({**GOOD, "bias": "lora_only"}, r"bias is 'lora_only'"),
    ({**GOOD, "lora_bias": True}, r"LoRA bias terms are not supported"),
    ({**GOOD, "use_dora": True}, r"DoRA"),
    ({**GOOD, "modules_to_save": ["lm_head"]}, r"modules_to_save"),
    ({k: v for k, v in GOOD.items() if k != "r"}, r"'r' \(int >= 1\)"),
    ({**GOOD, "r": 0}, r"'r' \(int >= 1\)"),
    ({**GOOD, "r": -2}, r"'r' \(int >= 1\)"),
    ({**GOOD, "r": True}, r"'r' \(int >= 1\)"),
    ({**GOOD, "r": 4.0}, r"'r' \(int >= 1\)"),
    ({**GOOD, "r": "4"}, r"'r' \(int >= 1\)"),
    ({k: v for k, v in GOOD.items() if k != "lora_alpha"}, r"'lora_alpha' \(number\)"),
    ({**GOOD, "lora_alpha": "8"}, r"'lora_alpha' \(number\)"),
])
def test_invalid_configs_are_one_line_user_errors(config, match):
    with pytest.raises(UserError, match=match) as info:
        validate_adapter_config(config, "cfg.json")
    assert "\n" not in str(info.value)


def test_every_config_problem_is_reported_at_once():
    bad = {**GOOD, "peft_type": "IA3", "bias": "all", "use_dora": True, "r": 0}
    with pytest.raises(UserError) as info:
        validate_adapter_config(bad, Path("/a/adapter_config.json"))
    message = str(info.value)
    assert message.startswith("/a/adapter_config.json: ") and "\n" not in message
    for part in ("peft_type is 'IA3'", "bias is 'all'", "DoRA", "'r' (int >= 1)"):
        assert part in message


# ----------------------------------------------------------------------------- read errors


def test_a_directory_with_weights_but_no_config(adapter_dir):
    (adapter_dir / CONFIG_NAME).unlink()
    _one_line_error(adapter_dir, adapter_dir / CONFIG_NAME, r"adapter_config\.json: missing")


def test_a_path_that_does_not_exist(tmp_path):
    _one_line_error(tmp_path / "nope", tmp_path / "nope" / CONFIG_NAME, r"adapter_config\.json: missing")


@pytest.mark.parametrize("raw", [b"{not json", b"", b'{"r": 4,}', b"\xff\xfe\x00{"], ids=["syntax", "empty",
                                                                                        "trailing-comma", "not-utf8"])
def test_invalid_json(adapter_dir, raw):
    (adapter_dir / CONFIG_NAME).write_bytes(raw)
    _one_line_error(adapter_dir, adapter_dir / CONFIG_NAME, r"adapter_config\.json: not valid JSON")


def test_a_config_that_is_not_an_object(adapter_dir):
    (adapter_dir / CONFIG_NAME).write_text("[4, 8]")
    _one_line_error(adapter_dir, adapter_dir / CONFIG_NAME, r"adapter_config\.json: expected a JSON object")


def test_read_adapter_config_validates(adapter_dir):
    assert read_adapter_config(adapter_dir) == CONFIG
    (adapter_dir / CONFIG_NAME).write_text(json.dumps({**CONFIG, "use_dora": True}))
    with pytest.raises(UserError, match=r"adapter_config\.json: DoRA"):
        read_adapter_config(adapter_dir)


def test_missing_safetensors_and_a_pickle_is_never_read(adapter_dir):
    (adapter_dir / WEIGHTS_NAME).unlink()
    (adapter_dir / "adapter_model.bin").write_bytes(b"not even a pickle")
    message = _one_line_error(adapter_dir, adapter_dir / WEIGHTS_NAME, r"adapter_model\.safetensors: missing")
    assert "adapter_model.bin is never read" in message


def _corrupt_short(data: bytes) -> bytes:
    return b"abc"


def _corrupt_cut_data(data: bytes) -> bytes:
    return data[:-16]  # header intact, tensor bytes missing


def _corrupt_huge_header(data: bytes) -> bytes:
    return struct.pack("<Q", 1 << 40) + data[8:]


def _corrupt_offsets(data: bytes) -> bytes:
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    key = min(k for k in header if k != "__metadata__")
    header[key]["data_offsets"][1] += 4  # overlaps the next tensor / runs past the buffer
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data[8 + n:]


@pytest.mark.parametrize("corrupt", [_corrupt_short, _corrupt_cut_data, _corrupt_huge_header, _corrupt_offsets])
def test_corrupt_safetensors(adapter_dir, corrupt):
    weights = adapter_dir / WEIGHTS_NAME
    weights.write_bytes(corrupt(weights.read_bytes()))
    _one_line_error(adapter_dir, weights, r"adapter_model\.safetensors: corrupt or truncated safetensors file")


def _write_weights(adapter_dir: Path, tensors: dict[str, torch.Tensor]) -> Path:
    save_file(tensors, adapter_dir / WEIGHTS_NAME)
    return adapter_dir / WEIGHTS_NAME


@pytest.mark.parametrize("key", ["base_model.model.model.embed_tokens.weight",
                                 "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight",
                                 "model.layers.0.self_attn.q_proj.lora_A.weight"])
def test_a_key_that_is_not_a_lora_key(adapter_dir, key):
    weights = _write_weights(adapter_dir, {**_tensors(), key: torch.zeros(2, 2)})
    message = _one_line_error(adapter_dir, weights, "unexpected key")
    assert repr(key) in message


@pytest.mark.parametrize("which", ["A", "B"])
def test_a_module_with_only_one_matrix(adapter_dir, which):
    tensors = {k: v for k, v in _tensors().items() if k != peft_key(DOWN, "B" if which == "A" else "A")}
    weights = _write_weights(adapter_dir, tensors)
    _one_line_error(adapter_dir, weights, rf"module {DOWN} has lora_{which} but not both lora_A and lora_B")


@pytest.mark.parametrize(("a", "b", "shapes"), [
    ((4, 24), (16, 3), r"lora_A \(4, 24\) and lora_B \(16, 3\)"),  # ranks differ
    ((24,), (16, 1), r"lora_A \(24,\) and lora_B \(16, 1\)"),      # A not a matrix
    ((2, 24), (16, 2, 1), r"lora_A \(2, 24\) and lora_B \(16, 2, 1\)"),
])
def test_mismatched_shapes(adapter_dir, a, b, shapes):
    weights = _write_weights(adapter_dir, {**_tensors(), peft_key(DOWN, "A"): torch.zeros(a),
                                           peft_key(DOWN, "B"): torch.zeros(b)})
    _one_line_error(adapter_dir, weights, rf"module {DOWN}: {shapes} do not form \[r, in\] and \[out, r\]")


def test_no_tensors(adapter_dir):
    weights = _write_weights(adapter_dir, {})
    _one_line_error(adapter_dir, weights, r"adapter_model\.safetensors: holds no LoRA tensors")


def test_foreign_base_error_names_the_module_and_both_shapes():
    message = foreign_base_error(Path("/runs/adapter"), DOWN, torch.zeros(4, 48), torch.zeros(64, 4),
                                 torch.Size([64, 32]))
    assert message.startswith("/runs/adapter: module model.layers.1.mlp.down_proj: ")
    assert "lora_A [4, 48] / lora_B [64, 4]" in message and "[64, 32] weight" in message
    assert "another base model" in message and "--hf-checkpoint" in message and "\n" not in message
    assert "[64, 32]" in foreign_base_error("x", "m", torch.zeros(1, 1), torch.zeros(1, 1), (64, 32))
