"""The one-tensor SwiGLU: same values and gradients as the plain expression, less saved memory."""

import pytest
import torch
import torch.nn.functional as F

from slime.backends.megatron_utils.swiglu import SwiGLU, swiglu


def _plain(x):
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


@pytest.mark.numerics
def test_matches_plain_expression_and_gradcheck():
    x = torch.randn(5, 2, 8, dtype=torch.float64, requires_grad=True)
    assert torch.equal(swiglu(x), _plain(x))
    assert torch.autograd.gradcheck(swiglu, (x,))
    grad = torch.randn(5, 2, 4, dtype=torch.float64)
    (ours,) = torch.autograd.grad(swiglu(x), x, grad)
    (ref,) = torch.autograd.grad(_plain(x), x, grad)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


def _saved_bytes(fn, x):
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return sum(saved.values())


def test_saves_only_its_input():
    x = torch.randn(64, 1, 256, requires_grad=True)
    assert _saved_bytes(SwiGLU(), x) == x.numel() * 4
    assert _saved_bytes(_plain, x) >= 1.5 * x.numel() * 4  # plus silu(g) (and more in megatron)


def test_megatron_mlp_uses_it(single_process):
    from slime.backends.megatron_utils.arch import ModelArch
    from slime.backends.megatron_utils.model import model_provider
    from slime.utils.arguments import parse_args
    from tests._support.tiny_models import tiny_config

    model = model_provider(parse_args([]), ModelArch.from_hf_config(tiny_config().to_dict()))
    mlp = model.decoder.layers[0].mlp
    assert isinstance(mlp.activation_func, SwiGLU)
    hidden = torch.randn(3, 1, mlp.config.hidden_size)
    fc1, _ = mlp.linear_fc1(hidden)
    expected, _ = mlp.linear_fc2(_plain(fc1))
    out, _ = mlp(hidden)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
