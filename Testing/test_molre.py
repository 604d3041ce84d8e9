"""MoLRE layer: the paper's equation, identity at initialisation, parameter counts, routing statistics."""

from __future__ import annotations

import math

import pytest
import torch

from HeadCTMoLRELib.model.molre import (
    MoLRE,
    MoLREConfig,
    expert_usage,
    load_balance_loss,
    molre_parameter_count,
    router_entropy,
)


def _trainable(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


@pytest.mark.parametrize(
    ("dim", "exact", "paper_millions"),
    [(768, 276_742, 0.28), (1024, 368_390, 0.37), (1152, 414_214, 0.41)],
)
def test_parameter_count_reproduces_paper_sizes(dim, exact, paper_millions):
    layer = MoLRE(dim)
    assert _trainable(layer) == exact == molre_parameter_count(dim)
    assert round(exact / 1e6, 2) == paper_millions


def test_parameter_count_formula_for_other_hyper_parameters():
    layer = MoLRE(40, num_experts=3, rank=5, router_hidden=7)
    assert _trainable(layer) == 3 * (2 * 5 + 1) * 40 + (40 + 1) * 7 + (7 + 1) * 3


def test_new_layer_is_exactly_the_frozen_identity():
    torch.manual_seed(0)
    layer = MoLRE(16, num_experts=4, rank=2, router_hidden=8)
    x = torch.randn(3, 5, 16)
    h, gates = layer(x)
    assert torch.equal(h, x)
    assert gates.shape == (3, 5, 4)
    torch.testing.assert_close(gates.sum(-1), torch.ones(3, 5))
    # experts' A is random (so training can start), B and its bias are zero
    assert all(e.down.weight.abs().sum() > 0 for e in layer.experts)
    assert all(torch.count_nonzero(e.up.weight) == 0 and torch.count_nonzero(e.up.bias) == 0 for e in layer.experts)


def test_new_layer_with_base_projection_is_exactly_w0_and_w0_is_frozen():
    torch.manual_seed(0)
    w0 = torch.randn(8, 8)
    layer = MoLRE(8, num_experts=2, rank=2, router_hidden=4, base_projection=w0)
    x = torch.randn(4, 8)
    h, _ = layer(x)
    torch.testing.assert_close(h, x @ w0.T)
    assert "base_projection" not in dict(layer.named_parameters())
    assert "base_projection" in layer.state_dict()


def test_forward_matches_hand_computation_of_the_paper_equation():
    torch.manual_seed(1)
    dim, experts, rank, hidden = 6, 3, 2, 5
    layer = MoLRE(dim, experts, rank, hidden)
    for expert in layer.experts:  # make the experts non-trivial
        torch.nn.init.normal_(expert.up.weight)
        torch.nn.init.normal_(expert.up.bias)
    x = torch.randn(dim)
    w1, b1 = layer.router[0].weight, layer.router[0].bias
    w2, b2 = layer.router[2].weight, layer.router[2].bias
    logits = w2 @ torch.relu(w1 @ x + b1) + b2
    gates = torch.exp(logits) / torch.exp(logits).sum()
    expected = x.clone()
    for i, expert in enumerate(layer.experts):
        expected = expected + gates[i] * (expert.up.weight @ (expert.down.weight @ x) + expert.up.bias)
    h, router_weights = layer(x)
    torch.testing.assert_close(router_weights, gates)
    torch.testing.assert_close(h, expected)


def test_gradients_reach_router_and_experts_but_not_w0():
    torch.manual_seed(2)
    layer = MoLRE(8, num_experts=2, rank=2, router_hidden=4, base_projection=torch.eye(8))
    h, _ = layer(torch.randn(5, 8))
    h.pow(2).sum().backward()
    # at init B = 0, so A gets no gradient yet, but B, its bias and (through them) training can start
    for expert in layer.experts:
        assert expert.up.weight.grad.abs().sum() > 0
    assert layer.base_projection.grad is None


def test_wrong_feature_size_is_refused():
    with pytest.raises(ValueError, match="size 8"):
        MoLRE(8)(torch.randn(2, 9))


def test_config_round_trip_and_unknown_keys():
    config = MoLREConfig(num_experts=4, rank=4, router_hidden=64, load_balance_weight=0.01)
    assert MoLREConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="Unknown MoLRE settings"):
        MoLREConfig.from_dict({"experts": 3})
    with pytest.raises(ValueError):
        MoLREConfig(rank=0)


def test_routing_statistics_ignore_masked_positions():
    uniform = torch.full((1, 2, 4), 0.25)
    collapsed = torch.tensor([[[1.0, 0.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]]])
    mask = torch.tensor([[True, False]])
    torch.testing.assert_close(router_entropy(uniform), torch.tensor(math.log(4)))
    torch.testing.assert_close(router_entropy(collapsed, mask), torch.tensor(0.0))
    torch.testing.assert_close(expert_usage(collapsed, mask), torch.tensor([1.0, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(expert_usage(collapsed), torch.tensor([0.625, 0.125, 0.125, 0.125]))
    with pytest.raises(ValueError, match="No valid positions"):
        expert_usage(collapsed, torch.zeros(1, 2, dtype=torch.bool))


def test_load_balance_loss_is_one_when_balanced_and_k_when_collapsed():
    balanced = torch.eye(4).unsqueeze(0)  # each of 4 positions picks a different expert
    collapsed = torch.tensor([[1.0, 0.0, 0.0, 0.0]]).expand(4, 4).unsqueeze(0)
    torch.testing.assert_close(load_balance_loss(balanced), torch.tensor(1.0))
    torch.testing.assert_close(load_balance_loss(collapsed), torch.tensor(4.0))
    logits = torch.randn(10, 4, requires_grad=True)
    load_balance_loss(torch.softmax(logits, -1)).backward()
    assert logits.grad.abs().sum() > 0
