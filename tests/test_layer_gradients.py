"""Per-task gradient norms of one layer's weight from its input and output gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mtl.weighting import layer_gradients
from mtl.weighting.gradients import per_task_gradients
from mtl.weighting.gradnorm import GradNormWeighting
from mtl.weighting.layer_gradients import find_layer, weight_gradient_norms

T = 4


def task_losses(features: torch.Tensor) -> torch.Tensor:
    """T different losses of the same features (random projections, squared)."""
    directions = torch.randn(T, features.flatten(1).shape[1], generator=torch.Generator().manual_seed(1))
    return (features.flatten(1).float() @ directions.T).pow(2).mean(0)


def conv_net():
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 6, 3, padding=2, dilation=2), nn.ReLU(), nn.AdaptiveAvgPool2d(2))


def linear_net(bias=True):
    return nn.Sequential(nn.Linear(7, 5, bias=bias), nn.Tanh(), nn.Linear(5, 4))


CASES = [  # (network, input shape, index of the layer whose weight is checked)
    (conv_net, (4, 3, 9, 9), 0),
    (conv_net, (4, 3, 9, 9), 3),  # padding 2, dilation 2
    (linear_net, (6, 7), 0),
    (linear_net, (6, 7), 2),
    (lambda: linear_net(bias=False), (6, 7), 0),  # mm instead of addmm
    (linear_net, (2, 3, 7), 0),  # a linear layer over a sequence
]


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("build, shape, index", CASES)
def test_norms_match_the_per_task_gradients(build, shape, index, bf16):
    torch.manual_seed(0)
    net = build()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        features = net(torch.randn(*shape))
    losses = task_losses(features)
    weight = net[index].weight
    layer = find_layer(losses, weight)
    assert layer is not None
    output_grads = layer.output_gradients(losses)
    expected = per_task_gradients(losses, [weight])[0].flatten(1).float().norm(dim=1)
    # bf16: the reference is itself a bf16 gradient, so only bf16's precision can be asked for
    tolerance = 1e-2 if bf16 else 1e-5
    assert torch.allclose(weight_gradient_norms(layer.inputs, output_grads), expected, rtol=tolerance)
    for route in ("gram", "product"):
        assert torch.allclose(weight_gradient_norms(layer.inputs, output_grads, route), expected, rtol=tolerance)


def test_weights_the_fast_path_cannot_read_are_left_to_the_caller():
    grouped = nn.Conv2d(4, 4, 3, groups=2)
    losses = task_losses(grouped(torch.randn(2, 4, 5, 5)))
    assert find_layer(losses, grouped.weight) is None
    shared = nn.Linear(3, 3)
    twice = shared(shared(torch.randn(2, 3)))
    assert find_layer(task_losses(twice), shared.weight) is None
    embedding = nn.Embedding(10, 4)
    assert find_layer(task_losses(embedding(torch.tensor([1, 2]))), embedding.weight) is None
    unused = nn.Linear(3, 3)
    assert find_layer(task_losses(shared(torch.randn(2, 3))), unused.weight) is None
    assert find_layer(torch.ones(T), shared.weight) is None  # no graph at all


def test_gradnorm_takes_the_same_step_by_either_route(monkeypatch):
    def run():
        torch.manual_seed(0)
        net = conv_net()
        weighting = GradNormWeighting([f"t{i}" for i in range(T)], alpha=1.0, lr=0.1)
        for _ in range(3):
            losses = task_losses(net(torch.randn(4, 3, 9, 9)))
            weighting.backward(dict(zip(weighting.task_names, losses)), shared_params=list(net.parameters()))
            net.zero_grad()
        return weighting.task_weights.detach()

    fast = run()
    calls = []
    monkeypatch.setattr(layer_gradients, "find_layer", lambda *a: calls.append(a))
    monkeypatch.setattr("mtl.weighting.gradnorm.find_layer", lambda *a: calls.append(a))
    slow = run()
    assert len(calls) == 3, "the second run must have taken the per-task gradient route"
    assert not torch.equal(fast, torch.ones(T)), "the weights must have moved"
    assert torch.allclose(fast, slow, atol=1e-5)
