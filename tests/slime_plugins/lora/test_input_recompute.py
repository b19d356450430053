"""--lora-recompute-input: adapters keep no input for backward, and gradients stay bit-identical."""

import pytest
import torch
from torch import nn

from slime.backends.megatron_utils.swiglu import SwiGLU
from slime_plugins.lora.input_recompute import install_input_recompute, mark_recomputable, recipe_of
from slime_plugins.lora.lora_layer import LoRALinear
from tests._support.dist import run_distributed

pytestmark = pytest.mark.numerics  # bit-identity must hold under every kernel choice


class SavedStorages:
    """Distinct storages autograd saves inside the block (parameters excluded)."""

    def __init__(self, params):
        self.params = {p.untyped_storage().data_ptr() for p in params}
        self.saved = {}
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t):
        if t.untyped_storage().data_ptr() not in self.params:
            self.saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    def __enter__(self):
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)


class NormThenLoRA(nn.Module):
    """``LoRA(W)(producer(z))``: the shape of norm -> linear_qkv and SwiGLU -> linear_fc2."""

    def __init__(self, producer, width):
        super().__init__()
        torch.manual_seed(0)
        self.producer = producer
        self.proj = LoRALinear(nn.Linear(width, 12, bias=False), r=3, lora_alpha=6)
        self.proj.base_layer.weight.requires_grad_(False)
        with torch.no_grad():
            self.proj.lora_B.normal_()

    def forward(self, z):
        return self.proj(self.producer(z))


def _run(model, z):
    """(output, dz, dA, dB, saved bytes) of one forward+backward."""
    z = z.clone().requires_grad_(True)
    model.zero_grad()
    with SavedStorages(model.parameters()) as saved:
        out = model(z)
    out.square().sum().backward()
    return out.detach(), z.grad, model.proj.lora_A.grad.clone(), model.proj.lora_B.grad.clone(), sum(saved.saved.values())


@pytest.mark.parametrize("producer,width,z_width", [(nn.RMSNorm(16), 16, 16), (nn.LayerNorm(16), 16, 16),
                                                    (SwiGLU(), 16, 32)])
def test_gradients_bit_identical_and_input_not_kept(producer, width, z_width):
    z = torch.randn(5, 7, z_width)
    plain = _run(NormThenLoRA(producer, width), z)
    model = NormThenLoRA(producer, width)
    assert install_input_recompute(model) == ["producer"]
    recomputed = _run(model, z)
    for a, b in zip(plain[:4], recomputed[:4]):
        assert torch.equal(a, b)
    x_bytes = 5 * 7 * width * 4
    assert recomputed[4] == plain[4] - x_bytes


def test_modified_input_is_kept_not_recomputed():
    norm = nn.RMSNorm(8)
    install_input_recompute(norm)
    z = torch.randn(4, 8, requires_grad=True)
    x = norm(z)
    assert recipe_of(x) is not None
    x.mul_(2.0)  # version counter moves: the recipe no longer describes x
    assert recipe_of(x) is None
    layer = LoRALinear(nn.Linear(8, 4, bias=False), r=2, lora_alpha=2)
    with torch.no_grad():
        layer.lora_B.normal_()
    layer(x).sum().backward()
    dh = torch.ones(4, 4) @ layer.lora_B.detach() * layer.scaling  # d(sum of outputs)/dh  [4, r]
    torch.testing.assert_close(layer.lora_A.grad, dh.t() @ x.detach())  # the doubled x, not norm(z)


def test_no_tag_without_grad():
    norm = nn.RMSNorm(8)
    install_input_recompute(norm)
    assert recipe_of(norm(torch.randn(4, 8))) is None  # the input needs no grad
    with torch.no_grad():
        assert recipe_of(norm(torch.randn(4, 8, requires_grad=True))) is None
    assert recipe_of(norm(torch.randn(4, 8, requires_grad=True))) is not None


def test_no_recipe_when_the_producer_keeps_nothing():
    z = torch.randn(4, 8)  # no grad: the norm saves nothing, keeping z instead of x would not help
    x = torch.randn(4, 8, requires_grad=True)
    mark_recomputable(x, nn.RMSNorm(8), z)
    assert recipe_of(x) is None


def _megatron_steps(rank, flags):
    from slime.backends.megatron_utils.arch import ModelArch
    from slime.backends.megatron_utils.model import initialize_model_and_optimizer
    from slime.utils.arguments import parse_args

    arch = ModelArch.from_hf_config(dict(architectures=["LlamaForCausalLM"], num_hidden_layers=3, hidden_size=48,
                                         intermediate_size=80, num_attention_heads=4, num_key_value_heads=2,
                                         vocab_size=128, tie_word_embeddings=True))
    torch.manual_seed(0)
    built = initialize_model_and_optimizer(parse_args(["--use-lora", "--lora-r", "4", "--lr", "1e-2", *flags]),
                                           arch=arch)
    model, opt = built.model[0], built.optimizer
    device = next(model.parameters()).device
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(3)).to(device)
    pos = torch.arange(10, device=device).expand(2, -1)
    losses, saved_bytes = [], []
    for _ in range(3):
        opt.zero_grad()
        with SavedStorages(model.parameters()) as saved:
            loss = model(ids, pos, None, labels=ids).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        saved_bytes.append(sum(saved.saved.values()))
    adapters = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if "lora_" in n}
    return dict(losses=losses, saved=saved_bytes[0], adapters=adapters)


def test_megatron_model_trains_bit_identically_with_less_saved():
    (plain,) = run_distributed(_megatron_steps, 1, args=([],))
    (recomputed,) = run_distributed(_megatron_steps, 1, args=(["--lora-recompute-input"],))
    assert recomputed["losses"] == plain["losses"]
    assert plain["losses"][-1] < plain["losses"][0]
    for name, value in plain["adapters"].items():
        assert torch.equal(recomputed["adapters"][name], value), name
    # Per layer the inputs of linear_qkv (48), linear_fc1 (48) and linear_fc2 (80) go, except
    # layer 0's linear_qkv: its norm reads the frozen embedding, which needs no grad.
    tokens, layers = 2 * 10, 3
    assert plain["saved"] - recomputed["saved"] == tokens * 4 * (layers * (48 + 48 + 80) - 48)


def test_tp2_trains_bit_identically():
    flags = ["--tensor-model-parallel-size", "2"]
    plain = run_distributed(_megatron_steps, 2, args=(flags,))
    recomputed = run_distributed(_megatron_steps, 2, args=(flags + ["--lora-recompute-input"],))
    for p, r in zip(plain, recomputed):
        assert r["losses"] == p["losses"]
        assert all(torch.equal(r["adapters"][n], v) for n, v in p["adapters"].items())
        assert r["saved"] < p["saved"]


def test_flag_rejects_dropout():
    from slime.utils.arguments import parse_args
    from slime.utils.errors import UserError

    with pytest.raises(UserError, match=r"--lora-recompute-input needs --lora-dropout 0"):
        parse_args(["--use-lora", "--lora-recompute-input", "--lora-dropout", "0.1"])
    assert parse_args(["--use-lora", "--lora-recompute-input"]).lora_recompute_input
