"""LoRALinear and apply_lora_to_model on plain torch modules (fast, single process)."""

import copy
import math

import pytest
import torch
from torch import nn
from tests._support.numerics import assert_close, fp32_tolerance

from slime_plugins.lora.lora_layer import (
    LoRALinear,
    apply_lora_to_model,
    disable_adapters,
    lora_parameters,
    merge_lora,
    unmerge_lora,
)


class Block(nn.Module):
    def __init__(self, d=16, f=32):
        super().__init__()
        self.linear_qkv = nn.Linear(d, 3 * d, bias=False)
        self.linear_proj = nn.Linear(d, d, bias=True)
        self.linear_fc1 = nn.Linear(d, 2 * f, bias=False)
        self.linear_fc10 = nn.Linear(d, d)  # a name that merely starts with a target
        self.linear_proj_gate = nn.Linear(d, d)
        self.linear_fc2 = nn.Linear(f, d, bias=False)

    def forward(self, x):
        q = self.linear_proj(self.linear_qkv(x)[..., : x.shape[-1]])
        gate, up = self.linear_fc1(q).chunk(2, dim=-1)
        return self.linear_fc2(torch.nn.functional.silu(gate) * up) + self.linear_fc10(x) + self.linear_proj_gate(x)


class Toy(nn.Module):
    def __init__(self, layers=2):
        super().__init__()
        self.layers = nn.ModuleList(Block() for _ in range(layers))

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return x


def toy_with_lora(targets=("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"), r=4, alpha=8.0, **kw):
    torch.manual_seed(0)
    base = Toy()
    model = copy.deepcopy(base)
    names = apply_lora_to_model(model, list(targets), r=r, lora_alpha=alpha, **kw)
    return base, model, names


@pytest.mark.numerics
def test_init_output_equals_base_exactly_and_shapes():
    base, model, names = toy_with_lora()
    x = torch.randn(3, 5, 16)
    assert torch.equal(base(x), model(x))
    layer = model.layers[0].linear_fc1
    assert isinstance(layer, LoRALinear)
    assert layer.lora_A.shape == (4, 16) and layer.lora_B.shape == (64, 4)
    assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) > 0
    bound = 1 / math.sqrt(16)  # kaiming_uniform(a=sqrt(5)) bound for fan_in 16
    assert layer.lora_A.abs().max() <= bound
    # the wrapper holds the model's own linear (the weights it was built with), not a new one
    assert type(layer.base_layer) is nn.Linear and torch.equal(layer.base_layer.weight, base.layers[0].linear_fc1.weight)
    assert layer.lora_parameters() == [layer.lora_A, layer.lora_B]


def test_wraps_without_copying_base_weights():
    model = Toy()
    weight = model.layers[0].linear_qkv.weight
    apply_lora_to_model(model, ["linear_qkv"], r=2, lora_alpha=4)
    assert model.layers[0].linear_qkv.base_layer.weight is weight


def test_training_changes_A_and_B_lowers_loss_and_keeps_base_bitwise():
    base, model, _ = toy_with_lora()
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(lora_parameters(model), lr=1e-2)
    x, target = torch.randn(8, 16), torch.randn(8, 16)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = (model(x) - target).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for n, p in model.named_parameters():
        if "lora_" in n:
            assert not torch.equal(p, before[n]), f"{n} did not change"
        else:
            assert torch.equal(p, before[n]), f"base parameter {n} changed"
            assert p.grad is None, f"frozen {n} got a gradient"


@pytest.mark.numerics
def test_merge_unmerge_and_disable():
    _, model, _ = toy_with_lora()
    for p in lora_parameters(model):
        nn.init.normal_(p, std=0.1)
    x = torch.randn(4, 16)
    out = model(x)
    base, _, _ = toy_with_lora()
    with disable_adapters(model):
        assert torch.equal(model(x), base(x))
    assert torch.equal(model(x), out)
    merge_lora(model)
    assert_close(model(x), out, atol=1e-5, rtol=1e-5, what="merged vs unmerged")
    unmerge_lora(model)
    assert_close(model(x), out, atol=1e-5, rtol=1e-5, what="unmerged again vs before merge")
    in_train_mode = model(x)
    model.eval()  # train/eval changes nothing but dropout (none here): the same kernels, bit for bit
    assert torch.equal(model(x), in_train_mode)


def test_rslora_scaling_and_dropout_on_lora_input_only():
    _, model, _ = toy_with_lora(r=16, alpha=8.0, use_rslora=True, lora_dropout=0.5, targets=["linear_fc2"])
    layer = model.layers[0].linear_fc2
    assert layer.scaling == pytest.approx(8.0 / 4.0)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(4, 32)
    model.train()
    torch.manual_seed(1)
    y1 = layer(x)
    torch.manual_seed(2)
    y2 = layer(x)
    assert not torch.equal(y1, y2)  # dropout is active on the LoRA path
    with disable_adapters(model):
        assert torch.equal(layer(x), layer.base_layer(x))  # and never on the base path


def test_matching_is_exact_name_or_glob_with_hf_aliases():
    _, _, names = toy_with_lora(targets=["linear_fc1", "linear_proj"])
    assert names == ["layers.0.linear_proj", "layers.0.linear_fc1", "layers.1.linear_proj", "layers.1.linear_fc1"]
    _, _, names = toy_with_lora(targets=["layers.0.*qkv"])
    assert names == ["layers.0.linear_qkv"]
    _, _, names = toy_with_lora(targets=["q_proj", "k_proj", "v_proj", "down_proj"])
    assert sorted(names) == ["layers.0.linear_fc2", "layers.0.linear_qkv", "layers.1.linear_fc2", "layers.1.linear_qkv"]
    _, _, names = toy_with_lora(targets=["all-linear"])
    assert len(names) == 8 and not any("fc10" in n or "gate" in n for n in names)


def test_never_wraps_twice():
    _, model, _ = toy_with_lora(targets=["linear_fc1"])
    with pytest.raises(ValueError, match="linear_fc1"):
        apply_lora_to_model(model, ["linear_fc1"], r=4, lora_alpha=8)
    assert isinstance(model.layers[0].linear_fc1.base_layer, nn.Linear)
    with pytest.raises(ValueError, match="base_layer"):
        apply_lora_to_model(model, ["*.linear_fc1.base_layer"], r=4, lora_alpha=8)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(r=0), "--lora-r"),
        (dict(lora_alpha=0.0), "--lora-alpha"),
        (dict(lora_dropout=1.0), "--lora-dropout"),
        (dict(lora_dropout=-0.1), "--lora-dropout"),
        (dict(r=17), r"^--lora-r 17 exceeds the smaller dimension of 2 target modules "
                     r"\(layers\.\*\.linear_qkv x2: 16\); use --lora-r <= 16$"),
        (dict(targets=["linear_nothing"]), "'linear_nothing' matches no module"),
    ],
)
def test_bad_inputs_name_the_flag(kwargs, message):
    args = dict(targets=["linear_qkv"], r=4, lora_alpha=8.0)
    args.update(kwargs)
    targets = args.pop("targets")
    with pytest.raises(ValueError, match=message):
        apply_lora_to_model(Toy(), targets, **args)


def test_a_rank_too_large_for_many_modules_is_said_once_per_name_pattern():
    with pytest.raises(ValueError) as info:
        apply_lora_to_model(Toy(layers=12), ["all-linear"], r=40, lora_alpha=8.0)
    # linear_qkv [48, 16], linear_proj [16, 16], linear_fc1 [64, 16], linear_fc2 [16, 32] in each of 12 layers
    assert str(info.value) == ("--lora-r 40 exceeds the smaller dimension of 48 target modules "
                               "(layers.*.linear_qkv x12: 16, layers.*.linear_proj x12: 16, "
                               "layers.*.linear_fc1 x12: 16, layers.*.linear_fc2 x12: 16); use --lora-r <= 16")


def test_errors_are_collected():
    with pytest.raises(ValueError) as info:
        apply_lora_to_model(Toy(), ["nope"], r=0, lora_alpha=-1.0)
    text = str(info.value)
    assert "--lora-r" in text and "--lora-alpha" in text and "'nope'" in text


def test_base_state_dict_loads_unchanged_and_names_stay():
    base, model, _ = toy_with_lora()
    base_sd = base.state_dict()
    result = model.load_state_dict(base_sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    sd = model.state_dict()
    assert set(base_sd) <= set(sd)
    assert {k for k in sd if k not in base_sd} == {k for k in sd if k.endswith((".lora_A", ".lora_B"))}
    # round trip of the full state (base + adapter) into a fresh wrapped model
    _, other, _ = toy_with_lora()
    for p in lora_parameters(model):
        nn.init.normal_(p)
    other.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(2, 16)
    assert torch.equal(other(x), model(x))


def _three_outputs(layer, x):
    """The base output as add_delta may receive it: fresh (written in place), a view of a
    custom Function's output (new tensor from the same addmm), non-contiguous (plain path)."""

    class Passthrough(torch.autograd.Function):  # what megatron's TP=1 reductions do
        @staticmethod
        def forward(ctx, t):
            return t

        @staticmethod
        def backward(ctx, g):
            return g

    return {
        "in place": layer.base_layer(x),
        "view": Passthrough.apply(layer.base_layer(x)),
        "non-contiguous": layer.base_layer(x.transpose(0, 1)).transpose(0, 1),
    }


@pytest.mark.numerics
def test_every_add_delta_path_matches_the_formula_in_values_and_grads():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(12, 10, bias=False), r=4, lora_alpha=8.0)
    nn.init.normal_(layer.lora_B)
    x0 = torch.randn(3, 5, 12)
    weight = torch.randn(3, 5, 10)

    x = x0.clone().requires_grad_()
    expected = layer.base_layer(x) + torch.nn.functional.linear(x, layer.lora_B @ layer.lora_A) * layer.scaling
    want = torch.autograd.grad((expected * weight).sum(), [x, layer.lora_A, layer.lora_B])
    for path in ("in place", "view", "non-contiguous"):
        x = x0.clone().requires_grad_()
        base = _three_outputs(layer, x)[path]
        out = layer.add_delta(base, x)
        assert (out.data_ptr() == base.data_ptr()) == (path == "in place"), path
        got = torch.autograd.grad((out * weight).sum(), [x, layer.lora_A, layer.lora_B])
        # two chained products (A then B, or g B then x), reducing over <= 15 terms (12 features, 3 x 5 tokens)
        assert_close(out, expected, rtol=0, atol=fp32_tolerance(expected.abs().max(), 2, 15),
                     what=f"add_delta {path}: output")
        for g, w, name in zip(got, want, ("dx", "dA", "dB")):
            assert_close(g, w, rtol=0, atol=fp32_tolerance(w.abs().max(), 2, 15), what=f"add_delta {path}: {name}")


def test_scaled_up_projection_gradcheck():
    from slime_plugins.lora.up_projection import AddScaledUpProjection

    torch.manual_seed(0)
    h = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    B = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    for inplace in (True, False):
        def f(out, h, B):
            return AddScaledUpProjection.apply(out.clone(), h, B, 1.7, inplace)

        out = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(f, (out, h, B))


@pytest.mark.numerics
def test_a_base_subclass_that_saves_its_output_is_not_written_in_place():
    """Only nn.Linear and megatron's parallel linears are known to leave their output unsaved."""

    class SavesOutput(nn.Linear):
        def forward(self, x):
            return torch.tanh(super().forward(x))  # tanh saves its output for backward

    torch.manual_seed(0)
    layer = LoRALinear(SavesOutput(6, 5), r=2, lora_alpha=2.0)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(4, 6, requires_grad=True)
    layer(x).pow(2).sum().backward()
    expected = layer.base_layer(x) + x @ (layer.lora_B @ layer.lora_A).t() * layer.scaling
    want = torch.autograd.grad(expected.pow(2).sum(), x)[0]
    assert_close(x.grad, want, rtol=1.3e-6, atol=1e-5, what="output-saving base: dx")
    assert LoRALinear(nn.Linear(6, 5), r=2, lora_alpha=2.0)._output_writable and not layer._output_writable


@pytest.mark.numerics
def test_fused_addmm_path_equals_separate_scale_and_add():
    """add_delta's addmm path (contiguous output) and its fallback (any other output) agree."""
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(12, 10, bias=False), r=4, lora_alpha=8.0)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 5, 12)
    base = layer.base_layer(x)
    expected = base + torch.nn.functional.linear(x, layer.lora_B @ layer.lora_A) * layer.scaling
    fused = layer.add_delta(base.clone(), x)
    fallback = layer.add_delta(base.transpose(0, 1).clone().transpose(0, 1), x)  # non-contiguous
    atol = fp32_tolerance(expected.abs().max(), 2, 12)  # x A^T then (.) B^T, over 12 input features
    assert_close(fused, expected, rtol=0, atol=atol, what="fused addmm vs formula")
    assert_close(fallback, expected, rtol=0, atol=atol, what="fallback vs formula")


# ---------------------------------------------------------------------------------------------
# Several adapters on one base layer (--lora-tasks)
# ---------------------------------------------------------------------------------------------

def _two_adapter_model():
    from slime_plugins.lora.lora_layer import add_adapter, apply_lora_to_model

    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(16, 12))
    apply_lora_to_model(model, ["proj"], r=4, lora_alpha=8, init_seed=5, adapter="add")
    add_adapter(model, "sub", r=2, lora_alpha=8, init_seed=5)
    for adapter, std in (("add", 0.1), ("sub", 0.3)):
        nn.init.normal_(model.proj.adapters[adapter].lora_B, std=std)
    return model


def test_each_adapter_is_applied_only_when_active():
    from slime_plugins.lora.lora_layer import adapter_names, disable_adapters, use_adapter

    model = _two_adapter_model()
    layer, x = model.proj, torch.randn(3, 16)
    assert adapter_names(model) == ["add", "sub"] and layer.active == "add"
    base = layer.base_layer(x)
    for adapter in ("add", "sub"):
        weights = layer.adapters[adapter]
        with use_adapter(model, adapter):
            assert (layer.r, layer.scaling) == (weights.r, weights.scaling)
            expected = base + torch.nn.functional.linear(x, weights.lora_B @ weights.lora_A) * weights.scaling
            torch.testing.assert_close(model(x), expected)
    assert layer.active == "add"  # restored after the block
    with disable_adapters(model):
        torch.testing.assert_close(model(x), base)  # the reference policy: every adapter off


def test_one_forward_trains_only_the_active_adapter():
    from slime_plugins.lora.lora_layer import adapter_parameters, use_adapter

    model = _two_adapter_model()
    with use_adapter(model, "sub"):
        model(torch.randn(3, 16)).sum().backward()
    assert all(p.grad is not None for p in adapter_parameters(model, "sub"))
    assert all(p.grad is None for p in adapter_parameters(model, "add"))


def test_a_new_adapter_starts_where_a_one_adapter_layer_starts():
    """Same seed, same module name: the same A whatever the adapter is called (B is zero)."""
    from slime_plugins.lora.lora_layer import add_adapter, apply_lora_to_model

    torch.manual_seed(0)
    one, two = nn.Sequential(nn.Linear(16, 12)), nn.Sequential(nn.Linear(16, 12))
    two.load_state_dict(one.state_dict())
    apply_lora_to_model(one, ["0"], r=4, lora_alpha=8, init_seed=9)
    apply_lora_to_model(two, ["0"], r=4, lora_alpha=8, init_seed=9, adapter="add")
    add_adapter(two, "sub", r=4, lora_alpha=8, init_seed=9)
    for adapter in ("add", "sub"):
        assert torch.equal(two[0].adapters[adapter].lora_A, one[0].lora_A)
        assert torch.count_nonzero(two[0].adapters[adapter].lora_B) == 0


def test_merge_folds_the_active_adapter_and_pins_it():
    from slime_plugins.lora.lora_layer import use_adapter

    model = _two_adapter_model()
    layer, x = model.proj, torch.randn(3, 16)
    with use_adapter(model, "sub"):
        expected = model(x)
        layer.merge()
        torch.testing.assert_close(model(x), expected)
        with pytest.raises(RuntimeError, match="unmerge 'sub' before switching"):
            layer.set_active("add")
        layer.unmerge()
    with pytest.raises(KeyError, match="no adapter 'mul'"):
        layer.set_active("mul")


def test_add_adapter_checks_rank_against_every_layer():
    from slime_plugins.lora.lora_layer import add_adapter

    model = _two_adapter_model()
    with pytest.raises(ValueError, match="adapter 'big': --lora-r 13 exceeds the smaller dimension"):
        add_adapter(model, "big", r=13, lora_alpha=8)
    with pytest.raises(ValueError, match="exists already"):
        model.proj.add_adapter("sub", 2, 8.0)
