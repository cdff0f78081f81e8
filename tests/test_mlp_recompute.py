"""Gated MLPs that recompute silu in backward: the same values and gradients as plain autograd,
one (tokens, intermediate) tensor fewer kept per MLP, other MLPs left alone, LoRA unaffected, and
`model.recompute_mlp_activations` honoured by `load_policy`."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP

from dpo_cluster.config import LoraConfig, ModelConfig
from dpo_cluster.mlp_recompute import recompute_mlp_activations, silu_mul
from dpo_cluster.modeling import load_policy
from dpo_cluster.tiny import build_tiny_model, randomize_lora_b


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny_model"), num_layers=3)


def test_silu_mul_gradients_are_autograds() -> None:
    generator = torch.Generator().manual_seed(0)
    gate = torch.randn(3, 5, 7, dtype=torch.float64, generator=generator, requires_grad=True)
    up = torch.randn(3, 5, 7, dtype=torch.float64, generator=generator, requires_grad=True)
    assert torch.autograd.gradcheck(silu_mul, (gate, up))

    gate32, up32 = (t.detach().float().requires_grad_() for t in (gate, up))
    grad_out = torch.randn(3, 5, 7, generator=generator)
    out = silu_mul(gate32, up32)
    torch.testing.assert_close(out, nn.functional.silu(gate32) * up32, rtol=0, atol=0)
    ours = torch.autograd.grad(out, (gate32, up32), grad_out)
    plain = torch.autograd.grad(nn.functional.silu(gate32) * up32, (gate32, up32), grad_out)
    for a, b in zip(ours, plain):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def _intermediate_tensors_kept(mlp: nn.Module, x: torch.Tensor) -> int:
    """Distinct (…, intermediate_size) tensors autograd keeps for backward of one MLP call."""
    storages: set[int] = set()
    size = x.shape[:-1].numel() * mlp.up_proj.out_features

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.numel() == size:  # 3-D, or the 2-D view a linear layer keeps of its input
            storages.add(tensor.untyped_storage().data_ptr())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        mlp(x)
    return len(storages)


def test_a_switched_mlp_keeps_three_intermediate_tensors_instead_of_four(tiny_model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    mlp = model.model.layers[0].mlp
    x = torch.randn(2, 9, model.config.hidden_size, requires_grad=True)
    assert _intermediate_tensors_kept(mlp, x) == 4
    assert recompute_mlp_activations(model) == model.config.num_hidden_layers == 3
    assert _intermediate_tensors_kept(mlp, x) == 3
    assert recompute_mlp_activations(model) == 0  # already switched: nothing to do twice


def test_a_switched_model_gives_the_same_logits_and_gradients(tiny_model_dir: Path) -> None:
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    switched = copy.deepcopy(plain)
    assert recompute_mlp_activations(switched) == 3
    ids = torch.randint(0, plain.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    plain_logits, switched_logits = plain(input_ids=ids).logits, switched(input_ids=ids).logits
    torch.testing.assert_close(switched_logits, plain_logits, rtol=0, atol=0)
    plain_logits.logsumexp(-1).sum().backward()
    switched_logits.logsumexp(-1).sum().backward()
    for (name, a), b in zip(switched.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=name)


class _ScaledMLP(Qwen2MLP):
    """A gated MLP whose forward is not the standard expression: must not be switched."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def test_other_mlps_are_left_alone(tiny_model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    gelu = copy.deepcopy(model.model.layers[1].mlp)
    gelu.act_fn = nn.GELU()
    model.model.layers[1].mlp = gelu
    scaled = _ScaledMLP(model.config)
    model.model.layers[2].mlp = scaled
    assert recompute_mlp_activations(model) == 1
    assert "forward" in vars(model.model.layers[0].mlp)
    assert "forward" not in vars(gelu) and "forward" not in vars(scaled)


def test_lora_gradients_are_unchanged(tiny_model_dir: Path) -> None:
    lora = LoraConfig(enabled=True, r=4, alpha=8, target_modules=["all-linear"])
    torch.manual_seed(2)  # LoRA's A matrices are drawn at load: the same for both models
    plain = load_policy(ModelConfig(name_or_path=str(tiny_model_dir), recompute_mlp_activations=False), lora)
    torch.manual_seed(2)
    switched = load_policy(ModelConfig(name_or_path=str(tiny_model_dir)), lora)
    mlps = [m for m in switched.modules() if isinstance(m, Qwen2MLP)]
    assert mlps and all("forward" in vars(m) for m in mlps)
    assert not any("forward" in vars(m) for m in plain.modules() if isinstance(m, Qwen2MLP))
    # LoRA's B starts at zero: move it so that the adapters change the MLP's activations.
    for model in (plain, switched):
        randomize_lora_b(model, 0.1, seed=4)
    ids = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(3))
    for model in (plain, switched):
        model.eval()  # no LoRA dropout: both see the same activations
        model(input_ids=ids).logits.logsumexp(-1).sum().backward()
    trained = [(n, p) for n, p in switched.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n, _ in trained)
    for (name, a), b in zip(trained, (p for p in plain.parameters() if p.requires_grad)):
        assert a.grad is not None and a.grad.abs().sum() > 0, name
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=name)
