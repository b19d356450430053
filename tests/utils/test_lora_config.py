"""slime/utils/lora_config.py: the scaling formula, the target names, LoraConfig from the flags.

Flag-level error messages through ``validate_args`` / ``parse_args`` are covered in
tests/utils/test_arguments.py; here the object itself: values, errors on values argparse cannot
produce, frozen, picklable.
"""

from __future__ import annotations

import dataclasses
import math
import pickle
import re

import pytest

from slime.utils.arguments import parse_args
from slime.utils.hf_names import LINEAR_MODULES, MEGATRON_TO_HF_LAYER, leaf
from slime.utils.lora_config import (
    ALL_LINEAR,
    ALL_LINEAR_FLAG,
    HF_ALIASES,
    LORA_TARGETS,
    LoraConfig,
    is_glob,
    lora_scaling,
    resolve_targets,
)


def _names(message: str, flag: str) -> bool:
    return re.search(re.escape(flag) + r"(?![\w-])", message) is not None


# ----------------------------------------------------------------------------- scaling


@pytest.mark.parametrize(("alpha", "r", "rslora", "expected"), [
    (16, 8, False, 2.0),
    (8, 4, False, 2.0),
    (1, 3, False, 1 / 3),
    (32.0, 64, False, 0.5),
    (16, 4, True, 8.0),     # 16 / sqrt(4)
    (8, 16, True, 2.0),     # 8 / sqrt(16)
    (3, 2, True, 3 / math.sqrt(2)),
    (16, 1, True, 16.0),    # r = 1: both formulas agree
    (16, 1, False, 16.0),
])
def test_lora_scaling_hand_values(alpha, r, rslora, expected):
    assert lora_scaling(alpha, r, rslora) == pytest.approx(expected, rel=1e-15, abs=0)


def test_scaling_property_uses_the_config_values():
    assert LoraConfig().scaling == 2.0  # defaults r=8, alpha=16
    assert LoraConfig(r=4, alpha=8).scaling == 2.0
    assert LoraConfig(r=4, alpha=8, use_rslora=True).scaling == 4.0
    assert LoraConfig(r=64, alpha=16, use_rslora=True).scaling == 2.0


# ----------------------------------------------------------------------------- names


def test_lora_targets_hand_table():
    assert LORA_TARGETS == {
        "linear_qkv": ("q_proj", "k_proj", "v_proj"),
        "linear_proj": ("o_proj",),
        "linear_fc1": ("gate_proj", "up_proj"),
        "linear_fc2": ("down_proj",),
    }
    assert ALL_LINEAR == ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


def test_targets_and_aliases_agree_with_the_hf_name_table():
    linear = [m for m in MEGATRON_TO_HF_LAYER if leaf(m).startswith("linear_")]
    assert list(LINEAR_MODULES) == linear and ALL_LINEAR == tuple(leaf(m) for m in linear)  # same order
    for module in linear:
        assert LORA_TARGETS[leaf(module)] == tuple(leaf(hf) for hf in MEGATRON_TO_HF_LAYER[module])
        for hf in MEGATRON_TO_HF_LAYER[module]:
            assert HF_ALIASES[leaf(hf)] == leaf(module)  # every fused projection maps back to its module
    n_projections = sum(len(MEGATRON_TO_HF_LAYER[m]) for m in linear)
    assert len(HF_ALIASES) == n_projections == 7  # no norm or embedding is an alias
    for norm in ("input_layernorm", "post_attention_layernorm", "q_norm", "k_norm"):
        assert norm not in HF_ALIASES


# ----------------------------------------------------------------------------- resolve_targets


@pytest.mark.parametrize(("given", "expected"), [
    ([ALL_LINEAR_FLAG], list(ALL_LINEAR)),
    (["q_proj"], ["linear_qkv"]),
    (["down_proj", "o_proj"], ["linear_fc2", "linear_proj"]),
    (["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"], ["linear_qkv", "linear_fc1"]),  # duplicates removed
    (["linear_fc2", "q_proj", "linear_qkv", "linear_fc2"], ["linear_fc2", "linear_qkv"]),  # first occurrence kept
    (["linear_fc1", ALL_LINEAR_FLAG], ["linear_fc1", "linear_qkv", "linear_proj", "linear_fc2"]),
    (["*.layers.0.*.linear_qkv", "v_proj", "*.layers.0.*.linear_qkv"], ["*.layers.0.*.linear_qkv", "linear_qkv"]),
    (["decoder.layers.[01].mlp.linear_fc?"], ["decoder.layers.[01].mlp.linear_fc?"]),  # glob unchanged
    ([], []),
])
def test_resolve_targets(given, expected):
    assert resolve_targets(given) == expected
    assert resolve_targets(iter(given)) == expected  # any iterable


def test_targets_property_resolves_but_target_modules_keeps_the_spelling():
    config = LoraConfig(target_modules=("q_proj", "down_proj", "k_proj"))
    assert config.target_modules == ("q_proj", "down_proj", "k_proj")
    assert config.targets == ["linear_qkv", "linear_fc2"]


def test_is_glob():
    assert all(is_glob(t) for t in ("*.linear_qkv", "layers.?.x", "layers.[0-3].x"))
    assert not any(is_glob(t) for t in ("linear_qkv", "q_proj", ALL_LINEAR_FLAG, "a.b.c"))


# ----------------------------------------------------------------------------- errors


def test_default_and_valid_configs_have_no_errors():
    assert LoraConfig().errors() == []
    ok = LoraConfig(r=1, alpha=0.5, dropout=0.0, recompute_input=True,
                    target_modules=(ALL_LINEAR_FLAG, "q_proj", "linear_fc2", "*.layers.[01].*.linear_fc1"))
    assert ok.errors() == []
    assert LoraConfig(r=2, alpha=1, dropout=0.99).errors() == []


def test_errors_are_collected_at_once_and_name_their_flags():
    config = LoraConfig(r=0, alpha=-1.0, dropout=1.0, target_modules=("linear_qkv", "nope", "qproj"),
                        recompute_input=True)
    errors = config.errors()
    assert len(errors) == 6, errors
    assert all("\n" not in e for e in errors)
    r_err, alpha_err, dropout_err, nope_err, qproj_err, recompute_err = errors
    assert _names(r_err, "--lora-r") and "0" in r_err
    assert _names(alpha_err, "--lora-alpha") and "-1.0" in alpha_err
    assert _names(dropout_err, "--lora-dropout") and "1.0" in dropout_err
    assert _names(nope_err, "--lora-target-modules") and "'nope'" in nope_err
    assert _names(qproj_err, "--lora-target-modules") and "'qproj'" in qproj_err
    assert _names(recompute_err, "--lora-recompute-input") and _names(recompute_err, "--lora-dropout")


@pytest.mark.parametrize("r", [True, 2.0, "8", None, -3])
def test_r_must_be_a_true_integer(r):
    (error,) = LoraConfig(r=r).errors()
    assert _names(error, "--lora-r") and repr(r) in error


@pytest.mark.parametrize("alpha", ["16", None, 0, -0.5])
def test_alpha_must_be_a_positive_number(alpha):
    (error,) = LoraConfig(alpha=alpha).errors()
    assert _names(error, "--lora-alpha") and repr(alpha) in error


@pytest.mark.parametrize("dropout", ["0.1", None, -0.01, 1])
def test_dropout_must_be_in_0_1(dropout):
    errors = LoraConfig(dropout=dropout).errors()
    assert len(errors) == 1 and _names(errors[0], "--lora-dropout") and repr(dropout) in errors[0]


# ----------------------------------------------------------------------------- from the flags


def test_without_use_lora_there_is_no_config():
    args = parse_args(["--lora-r", "4", "--seed", "3"])
    assert args.lora is None
    assert LoraConfig.from_args(args) is None


def test_from_args_carries_every_flag_exactly():
    args = parse_args(["--use-lora", "--lora-r", "4", "--lora-alpha", "32", "--lora-dropout", "0.05",
                       "--lora-target-modules", "q_proj", "linear_fc2", "*.layers.0.*.linear_proj",
                       "--lora-use-rslora", "--seed", "77", "--lora-adapter-path", "/adapters/run-1",
                       "--no-lora-only-trainable", "--lora-verbose"])
    expected = LoraConfig(r=4, alpha=32.0, dropout=0.05,
                          target_modules=("q_proj", "linear_fc2", "*.layers.0.*.linear_proj"), use_rslora=True,
                          only_trainable=False, recompute_input=False, verbose=True,
                          adapter_path="/adapters/run-1", init_seed=77)
    assert args.lora == expected
    assert LoraConfig.from_args(args) == expected
    assert type(args.lora.target_modules) is tuple
    assert args.lora.init_seed == args.seed == 77
    assert args.lora.scaling == 32 / 2  # alpha / sqrt(4)
    assert args.lora.targets == ["linear_qkv", "linear_fc2", "*.layers.0.*.linear_proj"]


def test_from_args_defaults():
    args = parse_args(["--use-lora"])
    assert args.lora == LoraConfig(init_seed=1234)  # --seed default
    assert args.lora.target_modules == ALL_LINEAR and args.lora.adapter_path is None
    assert args.lora.only_trainable is True and args.lora.recompute_input is False
    args = parse_args(["--use-lora", "--lora-recompute-input"])
    assert args.lora.recompute_input is True


# ----------------------------------------------------------------------------- frozen, picklable


def test_config_is_frozen():
    config = LoraConfig(r=4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.r = 16
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.target_modules = ("linear_qkv",)
    assert config.r == 4


def test_config_pickles_round_trip():
    config = LoraConfig(r=4, alpha=8.0, dropout=0.1, target_modules=("q_proj", "*.linear_fc1"), use_rslora=True,
                        adapter_path="/a", init_seed=5)
    clone = pickle.loads(pickle.dumps(config))
    assert clone == config and clone is not config
    assert hash(clone) == hash(config)  # frozen with tuple fields: usable as a key
    assert clone.scaling == config.scaling and clone.targets == config.targets
