"""Loss weightings: equal, static, uncertainty (Kendall et al.), and build_weighting."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from mtl.errors import ConfigError
from mtl.tasks import Task, binary_task, classification_task
from mtl.weighting import (
    WEIGHTINGS,
    EqualWeighting,
    StaticWeighting,
    UncertaintyWeighting,
    build_weighting,
)

W0 = [0.5, -1.0, 2.0]


def toy_losses():
    """Two losses of one shared parameter ``w`` with hand-derivable gradients.

    L_a = sum(w^2) (grad 2w), L_b = sum(3w) (grad 3).
    """
    w = torch.tensor(W0, requires_grad=True)
    return w, {"a": (w ** 2).sum(), "b": (3 * w).sum()}


def expected_grad(weight_a: float, weight_b: float) -> torch.Tensor:
    return torch.tensor([weight_a * 2 * v + weight_b * 3 for v in W0])


# ---------------------------------------------------------------------------
# build_weighting
# ---------------------------------------------------------------------------


def test_unknown_weighting_lists_the_names():
    with pytest.raises(ConfigError, match="unknown weighting 'pcgrad'") as err:
        build_weighting("pcgrad", ["a", "b"])
    expected = {"equal", "static", "uncertainty", "gradnorm", "mgda", "mgda_ub"}
    for name in expected:
        assert name in str(err.value)
    assert set(WEIGHTINGS) == expected


def test_build_weighting_by_name():
    assert type(build_weighting("equal", ["a", "b"])) is EqualWeighting
    static = build_weighting("static", ["a", "b"], weights={"a": 1.0, "b": 2.0})
    assert type(static) is StaticWeighting
    assert type(build_weighting("uncertainty", ["a"])) is UncertaintyWeighting


def test_build_weighting_turns_bad_options_into_config_errors():
    with pytest.raises(ConfigError, match="bad options for weighting 'static'"):
        build_weighting("static", ["a", "b"])  # no weights
    with pytest.raises(ConfigError, match="bad options for weighting 'equal'"):
        build_weighting("equal", ["a"], temperature=2.0)


def test_weighting_needs_a_task():
    with pytest.raises(ConfigError, match="at least one task"):
        build_weighting("equal", [])


def test_build_weighting_accepts_task_objects():
    tasks = [classification_task("left", 10), classification_task("right", 10)]
    weighting = build_weighting("equal", tasks)
    assert weighting.task_names == ["left", "right"]


# ---------------------------------------------------------------------------
# equal
# ---------------------------------------------------------------------------


def test_equal_gradients_are_those_of_the_plain_sum():
    w, losses = toy_losses()
    weights = build_weighting("equal", ["a", "b"]).backward(losses)
    assert weights == {"a": 1.0, "b": 1.0}
    torch.testing.assert_close(w.grad, expected_grad(1.0, 1.0))

    # the same against autograd on the plain sum
    w2, losses2 = toy_losses()
    (losses2["a"] + losses2["b"]).backward()
    torch.testing.assert_close(w.grad, w2.grad)


def test_equal_on_a_model_matches_the_plain_sum():
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 3)
    x, ya, yb = torch.randn(8, 4), torch.randint(0, 3, (8,)), torch.randn(8, 3)

    def losses():
        out = net(x)
        return {"cls": F.cross_entropy(out, ya), "reg": F.mse_loss(out, yb)}

    net.zero_grad()
    build_weighting("equal", ["cls", "reg"]).backward(losses())
    got = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    l = losses()
    (l["cls"] + l["reg"]).backward()
    for g, p in zip(got, net.parameters()):
        torch.testing.assert_close(g, p.grad)


def test_losses_for_other_tasks_are_a_config_error():
    weighting = build_weighting("equal", ["a", "b"])
    _, losses = toy_losses()
    with pytest.raises(ConfigError, match=r"built for tasks \['a', 'b'\] but got losses for \['a', 'c'\]"):
        weighting.backward({"a": losses["a"], "c": losses["b"]})
    with pytest.raises(ConfigError, match=r"got losses for \['a'\]"):
        weighting.backward({"a": losses["a"]})
    with pytest.raises(ConfigError, match="UncertaintyWeighting"):
        UncertaintyWeighting(["a", "b"]).check_losses({"a": losses["a"], "b": losses["b"], "z": losses["a"]})


# ---------------------------------------------------------------------------
# static
# ---------------------------------------------------------------------------


def test_static_gradients_are_those_of_the_weighted_sum():
    w, losses = toy_losses()
    weighting = build_weighting("static", ["a", "b"], weights={"a": 2.0, "b": 0.25})
    assert weighting.backward(losses) == {"a": 2.0, "b": 0.25}
    torch.testing.assert_close(w.grad, expected_grad(2.0, 0.25))  # [2*2*0.5+0.75, ...] = [2.75, -3.25, 8.75]
    torch.testing.assert_close(w.grad, torch.tensor([2.75, -3.25, 8.75]))


def test_static_zero_weight_drops_a_task():
    w, losses = toy_losses()
    assert StaticWeighting(["a", "b"], {"a": 0.0, "b": 1.0}).backward(losses) == {"a": 0.0, "b": 1.0}
    torch.testing.assert_close(w.grad, torch.full((3,), 3.0))


def test_static_default_fills_missing_tasks():
    w, losses = toy_losses()
    weighting = StaticWeighting(["a", "b"], {"a": 3.0}, default=0.5)
    assert weighting.backward(losses) == {"a": 3.0, "b": 0.5}
    torch.testing.assert_close(w.grad, expected_grad(3.0, 0.5))


@pytest.mark.parametrize(
    "weights, message",
    [
        ({"a": 1.0, "b": 1.0, "c": 1.0}, r"unknown task\(s\) \['c'\]"),
        ({"a": 1.0, "b": -0.5}, r"finite and >= 0, got \{'b': -0.5\}"),
        ({"a": float("nan"), "b": 1.0}, r"finite and >= 0, got \{'a': nan\}"),
        ({"a": float("inf"), "b": 1.0}, "finite and >= 0"),
        ({"a": 0.0, "b": 0.0}, "all zero"),
        ({"a": 1.0}, r"no weight for task\(s\) \['b'\]"),
    ],
)
def test_static_rejects_bad_weights(weights, message):
    with pytest.raises(ConfigError, match=message):
        StaticWeighting(["a", "b"], weights)
    with pytest.raises(ConfigError, match=message):
        build_weighting("static", ["a", "b"], weights=weights)


def test_static_rejects_a_negative_default():
    with pytest.raises(ConfigError, match="finite and >= 0"):
        StaticWeighting(["a", "b"], {"a": 1.0}, default=-1.0)


# ---------------------------------------------------------------------------
# uncertainty (Kendall, Gal & Cipolla 2018)
# ---------------------------------------------------------------------------

S_CLS, S_REG = 0.3, -0.7  # log variances
L_CLS, L_REG = 1.7, 2.5  # loss values


def uncertainty_setup():
    weighting = UncertaintyWeighting(["cls", "reg"], likelihoods={"reg": "regression"})
    with torch.no_grad():
        weighting.log_vars.copy_(torch.tensor([S_CLS, S_REG]))
    losses = {"cls": torch.tensor(L_CLS, requires_grad=True), "reg": torch.tensor(L_REG, requires_grad=True)}
    return weighting, losses


def test_uncertainty_total_follows_kendall():
    weighting, losses = uncertainty_setup()
    w = weighting.weights()
    total = sum(w[t] * losses[t] for t in weighting.task_names) + weighting.regulariser()
    # classification: exp(-s) L + s/2; regression: exp(-s) L / 2 + s/2
    expected = (math.exp(-S_CLS) * L_CLS + S_CLS / 2) + (0.5 * math.exp(-S_REG) * L_REG + S_REG / 2)
    assert float(total.detach()) == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(0.74082 * 1.7 + 0.15 + 0.5 * 2.01375 * 2.5 - 0.35, rel=1e-4)


def test_uncertainty_gradients_are_the_analytic_ones():
    weighting, losses = uncertainty_setup()
    returned = weighting.backward(losses)
    # d/ds [exp(-s) L + s/2] = -exp(-s) L + 1/2 ; d/ds [exp(-s) L/2 + s/2] = -exp(-s) L/2 + 1/2
    grad_s = weighting.log_vars.grad
    assert float(grad_s[0]) == pytest.approx(-math.exp(-S_CLS) * L_CLS + 0.5, rel=1e-6)
    assert float(grad_s[1]) == pytest.approx(-0.5 * math.exp(-S_REG) * L_REG + 0.5, rel=1e-6)
    assert float(grad_s[0]) == pytest.approx(-0.759391, rel=1e-5)
    assert float(grad_s[1]) == pytest.approx(-2.017191, rel=1e-5)
    # the losses are scaled by the weights, and those are what backward returns
    assert float(losses["cls"].grad) == pytest.approx(math.exp(-S_CLS), rel=1e-6)
    assert float(losses["reg"].grad) == pytest.approx(0.5 * math.exp(-S_REG), rel=1e-6)
    assert set(returned) == {"cls", "reg"}
    assert all(type(v) is float for v in returned.values())
    assert returned["cls"] == pytest.approx(math.exp(-S_CLS), rel=1e-6)
    assert returned["reg"] == pytest.approx(0.5 * math.exp(-S_REG), rel=1e-6)


def test_uncertainty_optimum_is_log_loss():
    # for classification the minimum over s of exp(-s) L + s/2 is at s = log(2L): gradient zero there
    weighting = UncertaintyWeighting(["cls"], init_log_var=math.log(2 * L_CLS))
    weighting.backward({"cls": torch.tensor(L_CLS)})
    assert float(weighting.log_vars.grad[0]) == pytest.approx(0.0, abs=1e-6)


def test_uncertainty_log_vars_are_saved_and_trained():
    weighting, _ = uncertainty_setup()
    assert list(weighting.state_dict()) == ["log_vars"]
    params = list(weighting.parameters())
    assert len(params) == 1 and params[0] is weighting.log_vars and params[0].requires_grad
    restored = UncertaintyWeighting(["cls", "reg"], likelihoods={"reg": "regression"})
    assert torch.equal(restored.log_vars.detach(), torch.zeros(2))
    restored.load_state_dict(weighting.state_dict())
    torch.testing.assert_close(restored.log_vars.detach(), torch.tensor([S_CLS, S_REG]))
    # an optimizer step moves the log variances against their gradient
    w, losses = uncertainty_setup()
    opt = torch.optim.SGD(w.parameters(), lr=0.1)
    w.backward(losses)
    opt.step()
    torch.testing.assert_close(
        w.log_vars.detach(),
        torch.tensor([S_CLS - 0.1 * (-math.exp(-S_CLS) * L_CLS + 0.5), S_REG - 0.1 * (-0.5 * math.exp(-S_REG) * L_REG + 0.5)]),
    )


def test_uncertainty_init_log_var():
    weighting = UncertaintyWeighting(["a", "b"], init_log_var=-1.0)
    torch.testing.assert_close(weighting.log_vars.detach(), torch.tensor([-1.0, -1.0]))
    assert float(weighting.weights()["a"].detach()) == pytest.approx(math.e, rel=1e-6)


def test_build_uncertainty_picks_likelihoods_from_tasks():
    depth = Task("depth", F.l1_loss, likelihood="regression")
    tasks = [classification_task("left", 10), depth, binary_task("attrs")]
    weighting = build_weighting("uncertainty", tasks)
    assert weighting.task_names == ["left", "depth", "attrs"]
    assert weighting.scales == [1.0, 0.5, 1.0]
    assert {t: float(v.detach()) for t, v in weighting.weights().items()} == {"left": 1.0, "depth": 0.5, "attrs": 1.0}
    # explicit likelihoods win over the tasks'
    explicit = build_weighting("uncertainty", tasks, likelihoods={"left": "regression"})
    assert explicit.scales == [0.5, 1.0, 1.0]
    # plain names: every task classification
    assert build_weighting("uncertainty", ["x", "y"]).scales == [1.0, 1.0]


def test_uncertainty_rejects_unknown_likelihoods():
    with pytest.raises(ConfigError, match=r"unknown likelihood\(s\) \{'a': 'poisson'\}"):
        UncertaintyWeighting(["a"], likelihoods={"a": "poisson"})
    with pytest.raises(ConfigError, match="unknown likelihood"):
        build_weighting("uncertainty", [Task("a", F.mse_loss, likelihood="gaussian")])


def test_uncertainty_checks_the_loss_names():
    weighting, losses = uncertainty_setup()
    with pytest.raises(ConfigError, match=r"got losses for \['cls', 'seg'\]"):
        weighting.backward({"cls": losses["cls"], "seg": losses["reg"]})
    assert weighting.log_vars.grad is None  # nothing was back-propagated
