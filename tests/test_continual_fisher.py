"""EWC's diagonal empirical Fisher (continual/fisher.py): per-sample, matches a hand-computed
value, agrees between torch.func and the per-sample loop, and leaves BatchNorm and the modes alone."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from continual.fisher import empirical_fisher
from mtl.errors import ConfigError, DataError
from mtl.heads import ClassificationHead
from mtl.model import MultiTaskModel


def neg_ce(out, y):
    return -F.cross_entropy(out, y, reduction="none")


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(0.5),
        nn.Flatten(), nn.Linear(4 * 3 * 3, 5),
    )


def data(n: int = 24, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=gen), torch.randint(5, (n,), generator=gen)


def warm_batchnorm(model: nn.Module) -> None:
    """Give BatchNorm non-trivial running statistics, as after training."""
    with torch.no_grad():
        model.train()
        for seed in range(3):
            model(data(16, seed=100 + seed)[0] * 2 + 0.5)


def test_vmap_and_loop_agree():
    model = tiny_net()
    warm_batchnorm(model)
    x, y = data(24)
    loader = DataLoader(TensorDataset(x, y), batch_size=10)  # batches of 10, 10, 4
    fast = empirical_fisher(model, loader, neg_ce, per_sample="vmap")
    slow = empirical_fisher(model, loader, neg_ce, per_sample="loop")
    assert set(fast) == {n for n, _ in model.named_parameters()}
    biggest = max(float(f.abs().max()) for f in slow.values())
    for name in slow:
        assert fast[name].shape == slow[name].shape and fast[name].dtype == torch.float32
        diff = float((fast[name] - slow[name]).abs().max())
        assert diff <= 1e-6 and diff <= 1e-6 * biggest * 10, (name, diff, biggest)
    assert biggest > 1e-3  # a real signal, not zeros everywhere
    # one (x, y) pair and chunked vmap give the same Fisher as the loader
    whole = empirical_fisher(model, (x, y), neg_ce, chunk_size=7)
    for name in slow:
        torch.testing.assert_close(whole[name], fast[name], rtol=1e-5, atol=1e-8)


def test_one_parameter_logistic_model_by_hand():
    # p(y = 1 | x) = sigmoid(w x), w = ln 3. d log p(y | x) / dw = (y - sigmoid(w x)) x:
    #   x = 1,  y = 1: sigmoid(ln 3) = 3/4,            gradient (1 - 3/4) * 1   = 1/4
    #   x = 2,  y = 0: sigmoid(2 ln 3) = 9/10,         gradient (0 - 9/10) * 2  = -9/5
    #   x = -3, y = 1: sigmoid(-3 ln 3) = 1/28,        gradient (1 - 1/28) * -3 = -81/28
    # F = mean of the squares = (1/16 + 81/25 + 6561/784) / 3.
    # The square of the mean gradient is ((1/4 - 9/5 - 81/28) / 3)^2, about half of F here.
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(math.log(3.0))
    x = torch.tensor([[1.0], [2.0], [-3.0]])
    y = torch.tensor([1.0, 0.0, 1.0])

    def log_lik(out, target):
        return -F.binary_cross_entropy_with_logits(out.squeeze(-1), target, reduction="none")

    expected = (1 / 16 + 81 / 25 + 6561 / 784) / 3
    mean_grad_squared = ((1 / 4 - 9 / 5 - 81 / 28) / 3) ** 2
    for mode in ("vmap", "loop"):
        fisher = empirical_fisher(model, (x, y), log_lik, per_sample=mode)
        assert fisher["weight"].shape == (1, 1)
        assert fisher["weight"].item() == pytest.approx(expected, rel=1e-6)
        assert fisher["weight"].item() != pytest.approx(mean_grad_squared, rel=0.1)
    # the batch-mean gradient, computed by autograd, matches the hand value for its square
    model.zero_grad()
    (-log_lik(model(x), y).mean()).backward()
    assert model.weight.grad.item() ** 2 == pytest.approx(mean_grad_squared, rel=1e-6)


def test_differs_from_the_square_of_the_batch_mean_gradient():
    model = tiny_net()
    model.eval()
    x, y = data(32, seed=3)
    fisher = empirical_fisher(model, (x, y), neg_ce)
    model.zero_grad()
    (-neg_ce(model(x), y).mean()).backward()
    for name, p in model.named_parameters():
        trap = p.grad.pow(2)
        # mean of squares >= square of the mean (Jensen), strictly almost everywhere with 32 samples
        assert (fisher[name] >= trap - 1e-7).all()
        assert float(fisher[name].sum()) > 2 * float(trap.sum()), name


def test_batchnorm_statistics_and_modes_are_left_alone():
    model = tiny_net()
    warm_batchnorm(model)
    model.train()
    model[4].eval()  # a submodule the user put in eval mode stays so
    bn = model[1]
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    grads_before = [p.grad for p in model.parameters()]
    model[6].bias.requires_grad_(False)
    x, y = data(20)
    for mode in ("vmap", "loop"):
        fisher = empirical_fisher(model, (x, y), neg_ce, per_sample=mode)
        assert "6.bias" not in fisher  # frozen parameters are skipped by default
        for k, v in bn.state_dict().items():
            assert torch.equal(v, before[k]), (mode, k)
        assert model.training and bn.training and not model[4].training
        assert [p.grad for p in model.parameters()] == grads_before  # .grad untouched
        assert not model[6].bias.requires_grad
    # it is the eval-mode Fisher (running statistics, no dropout): the same from a copy put in eval mode
    eval_model = tiny_net()
    eval_model.load_state_dict(model.state_dict())
    eval_model.eval()
    again = empirical_fisher(eval_model, (x, y), neg_ce, per_sample="loop", params=list(fisher))
    for name in fisher:
        torch.testing.assert_close(again[name], fisher[name])


def test_multi_head_model_with_a_task_head():
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU())
    model = MultiTaskModel(encoder, {"t0": ClassificationHead(16, 5), "t1": ClassificationHead(16, 5)})
    x, y = data(12)

    def current_task(out, target):  # the log-likelihood on the head of the task just learned
        return -F.cross_entropy(out["t1"], target, reduction="none")

    fast = empirical_fisher(model, [(x[:5], y[:5]), (x[5:], y[5:], torch.ones(7))], current_task)
    slow = empirical_fisher(model, [(x[:5], y[:5]), (x[5:], y[5:])], current_task, per_sample="loop")
    for name in slow:
        torch.testing.assert_close(fast[name], slow[name], rtol=1e-5, atol=1e-7)
        if name.startswith("heads.t0."):
            assert fast[name].abs().max() == 0  # the other head does not touch this log-likelihood
    assert fast["heads.t1." + next(n for n, _ in model.heads["t1"].named_parameters())].abs().max() > 0


def test_parameter_selection_and_max_samples():
    model = tiny_net()
    x, y = data(24)
    subset = empirical_fisher(model, (x, y), neg_ce, params=["6.weight", model[0].bias])
    assert list(subset) == ["6.weight", "0.bias"]
    first = empirical_fisher(model, [(x[:10], y[:10]), (x[10:], y[10:])], neg_ce, max_samples=13)
    reference = empirical_fisher(model, (x[:13], y[:13]), neg_ce, per_sample="loop")
    for name in reference:
        torch.testing.assert_close(first[name], reference[name], rtol=1e-5, atol=1e-8)


def test_bad_inputs_raise_clear_errors():
    model = tiny_net()
    x, y = data(4)
    with pytest.raises(ConfigError, match="unknown per_sample mode 'batch'"):
        empirical_fisher(model, (x, y), neg_ce, per_sample="batch")
    with pytest.raises(ConfigError, match="no parameter named 'fc.weight'"):
        empirical_fisher(model, (x, y), neg_ce, params=["fc.weight"])
    with pytest.raises(ConfigError, match="names or parameters of this model"):
        empirical_fisher(model, (x, y), neg_ce, params=[nn.Parameter(torch.zeros(1))])
    with pytest.raises(ConfigError, match=r"one value per sample.*reduction='none'"):
        empirical_fisher(model, (x, y), lambda out, t: -F.cross_entropy(out, t, reduction="none").repeat(2))
    with pytest.raises(ConfigError, match="max_samples"):
        empirical_fisher(model, (x, y), neg_ce, max_samples=0)
    with pytest.raises(DataError, match="at least one sample"):
        empirical_fisher(model, [], neg_ce)
    with pytest.raises(DataError, match="share the batch"):
        empirical_fisher(model, (x, y[:3]), neg_ce)
    with pytest.raises(DataError, match=r"\(inputs, targets, \.\.\.\)"):
        empirical_fisher(model, [{"x": x, "y": y}], neg_ce)
    frozen = tiny_net().requires_grad_(False)
    with pytest.raises(ConfigError, match="none requires grad"):
        empirical_fisher(frozen, (x, y), neg_ce)
    assert model.training  # errors restore the mode too
