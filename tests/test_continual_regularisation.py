"""Quadratic-penalty strategies (L2, EWC, online EWC, SI, MAS, EWC++, RWalk): each one's defining
numbers on hand-checked tiny models, EWC beating fine-tuning on forgetting, exact resume, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from continual.learner import ContinualLearner, ExperienceData
from continual.runner import StreamRunner
from continual.scenarios import split_stream
from continual.strategies import EWC, L2, SI, FineTune, OnlineEWC
from continual.strategies.importance import MAS, EWCPlusPlus, RWalk
from mtl.config import TrainerConfig
from mtl.encoders import build_encoder
from mtl.errors import ConfigError
from test_continual_runner import crash_then_resume, run_differences, tiny_split

A, W0, W1 = "encoder.a", "heads.task0.weight", "heads.task1.weight"


# ----- a model small enough to differentiate by hand ------------------------------------------
class Scale(nn.Module):
    """z = a * x for 1x1 images: one shared parameter ``a`` (1.0 at first)."""

    out_features = 1

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return self.a * x.flatten(1)


X0, Y0 = [0.25, 0.5, 0.75, 1.0], [0, 1, 0, 1]  # experience 0: classes 0, 1
X1, Y1 = [0.2, 0.4, 0.6, 0.8], [2, 3, 2, 3]  # experience 1: classes 2, 3


def hand_learner(outputs: int | None = None, bias: bool = False) -> ContinualLearner:
    """Task-IL over two experiences of four 1-pixel images; heads ``Linear(1, outputs or 2)``."""
    x = torch.tensor(X0 + X1).reshape(-1, 1, 1, 1)
    y = torch.tensor(Y0 + Y1)
    stream = split_stream(x, y, x, y, classes_per_task=2, setting="task", name="hand")
    return ContinualLearner(Scale(), stream,
                            head_factory=lambda features, width: nn.Linear(features, outputs or width, bias=bias))


def set_weights(learner, **values) -> None:
    """``a=``, ``w0=``, ``w1=`` (or a full parameter name) set to the given numbers."""
    params = dict(learner.model.named_parameters())
    with torch.no_grad():
        for key, value in values.items():
            p = params[{"a": A, "w0": W0, "w1": W1}.get(key, key)]
            p.copy_(torch.tensor(value).reshape_as(p))


def penalty(strategy, learner, experience) -> torch.Tensor:
    """The strategy's penalty loss on two samples of ``experience`` (eval mode: no online updates)."""
    model = learner.model.eval()
    x, y, t = ExperienceData(experience, learner).batch(range(2))
    z = learner.encode(model, x, t)
    out = strategy.extra_losses(learner, model, (x, y, t), z, learner.logits(model, z, t))["penalty"]
    model.train()
    return out


def softmax_scores(a: float, w: list[float], x: float, y: int) -> dict[str, list[float]]:
    """d log p(y | x) for logits w_j * a * x: (1[y = j] - p_j) a x for w_j, sum_j (1[y = j] - p_j) w_j x for a."""
    logits = [wj * a * x for wj in w]
    p = [math.exp(v) / sum(math.exp(u) for u in logits) for v in logits]
    r = [(1.0 if j == y else 0.0) - p[j] for j in range(len(w))]
    return {"a": [sum(r[j] * w[j] * x for j in range(len(w)))], "w": [r[j] * a * x for j in range(len(w))]}


def fisher_by_hand(a, w, xs, ys) -> dict[str, list[float]]:
    """Mean over the samples of the squared scores (the empirical Fisher, per sample)."""
    scores = [softmax_scores(a, w, x, y % 2) for x, y in zip(xs, ys)]  # head label: position in the pair
    return {k: [sum(s[k][i] ** 2 for s in scores) / len(xs) for i in range(len(scores[0][k]))] for k in ("a", "w")}


def close(tensor: torch.Tensor, expected) -> None:
    torch.testing.assert_close(tensor.double().flatten(), torch.as_tensor(expected, dtype=torch.float64).flatten(),
                               rtol=1e-5, atol=1e-7)


# ----- EWC, online EWC, L2 ----------------------------------------------------------------------
def test_ewc_penalty_is_zero_at_the_anchor_and_is_the_fisher_weighted_squared_move():
    learner = hand_learner()
    exp0 = learner.stream[0]
    set_weights(learner, w0=[0.8, -0.4])
    ewc = EWC(strength=3.0)
    learner.prepare(exp0)
    ewc.before_experience(learner, exp0)
    ewc.after_experience(learner, exp0)
    fisher = fisher_by_hand(1.0, [0.8, -0.4], X0, Y0)
    close(ewc.importances[0][W0], fisher["w"])
    close(ewc.importances[0][A], fisher["a"])
    assert penalty(ewc, learner, exp0).item() == 0.0  # exactly, at the old optimum
    delta = 0.3
    set_weights(learner, w0=[0.8 + delta, -0.4])
    close(penalty(ewc, learner, exp0), [fisher["w"][0] * delta ** 2])
    set_weights(learner, a=1.0 - delta)
    close(penalty(ewc, learner, exp0), [(fisher["w"][0] + fisher["a"][0]) * delta ** 2])
    # the loss weight is the paper's lambda / 2
    assert ewc.weighting(learner, ["current", "penalty"]).weights() == {"current": 1.0, "penalty": 1.5}


def two_experiences(strategy, w0=(0.8, -0.4), w1=(-0.6, 0.9), a_after=0.7):
    """Train-free run: experience 0 ends at (a=1, w0), experience 1 at (a_after, w0, w1)."""
    learner = hand_learner()
    exp0, exp1 = learner.stream
    set_weights(learner, w0=list(w0))
    learner.prepare(exp0)
    strategy.before_experience(learner, exp0)
    strategy.after_experience(learner, exp0)
    learner.prepare(exp1)
    set_weights(learner, a=a_after, w1=list(w1))
    strategy.before_experience(learner, exp1)
    strategy.after_experience(learner, exp1)
    return learner


def test_ewc_keeps_one_anchor_per_experience_and_sums_their_penalties():
    ewc = EWC(strength=1.0)
    learner = two_experiences(ewc)
    first, second = fisher_by_hand(1.0, [0.8, -0.4], X0, Y0), fisher_by_hand(0.7, [-0.6, 0.9], X1, Y1)
    assert len(ewc.anchors) == len(ewc.importances) == 2
    close(ewc.anchors[0][A], [1.0])
    close(ewc.anchors[1][A], [0.7])
    close(ewc.importances[0][A], first["a"])
    close(ewc.importances[1][A], second["a"])
    close(ewc.importances[1][W1], second["w"])
    close(ewc.importances[1][W0], [0.0, 0.0])  # experience 1 never reads task 0's head
    assert W1 not in ewc.anchors[0]  # a head added later is not pulled towards an older anchor
    set_weights(learner, a=0.5)  # 0.5 from the first anchor, 0.2 from the second
    close(penalty(ewc, learner, learner.stream[1]), [first["a"][0] * 0.25 + second["a"][0] * 0.04])


def test_online_ewc_keeps_one_anchor_with_the_decayed_sum_of_fishers():
    online = OnlineEWC(strength=1.0, gamma=0.5)
    learner = two_experiences(online)
    first, second = fisher_by_hand(1.0, [0.8, -0.4], X0, Y0), fisher_by_hand(0.7, [-0.6, 0.9], X1, Y1)
    assert len(online.anchors) == len(online.importances) == 1
    close(online.anchors[0][A], [0.7])
    close(online.importances[0][A], [0.5 * first["a"][0] + second["a"][0]])  # F <- gamma F_old + F_new
    close(online.importances[0][W0], [0.5 * f for f in first["w"]])
    close(online.importances[0][W1], second["w"])
    set_weights(learner, a=0.5)
    close(penalty(online, learner, learner.stream[1]), [(0.5 * first["a"][0] + second["a"][0]) * 0.04])


def test_l2_pulls_every_parameter_with_weight_one_towards_the_last_weights():
    l2 = L2(strength=4.0)
    learner = two_experiences(l2)
    assert len(l2.anchors) == 1
    close(l2.importances[0][A], [2.0])  # ones, summed over the two experiences
    close(l2.importances[0][W0], [2.0, 2.0])
    close(l2.importances[0][W1], [1.0, 1.0])  # added in the second experience
    set_weights(learner, a=0.5, w1=[-0.6, 1.2])
    close(penalty(l2, learner, learner.stream[1]), [2 * 0.2 ** 2 + 1 * 0.3 ** 2])
    assert l2.loss_weights() == {"penalty": 2.0}


# ----- SI -----------------------------------------------------------------------------------
def test_si_importance_is_the_path_integral_over_the_squared_distance_plus_xi():
    # One parameter w, loss 0.5 (w - 1)^2, SGD with lr 0.5 from w = 0:
    #   w: 0 -> 0.5 -> 0.75 -> 0.875, gradients g = w - 1: -1, -0.5, -0.25
    #   omega = -sum g * delta w = 1 * 0.5 + 0.5 * 0.25 + 0.25 * 0.125 = 0.65625
    #   Omega = omega / (Delta^2 + xi) = 0.65625 / (0.875^2 + 0.1)
    learner = hand_learner(outputs=1)
    learner.model.encoder.a.requires_grad_(False)  # leave the one parameter w
    exp0 = learner.stream[0]
    set_weights(learner, w0=[0.0])
    si = SI(strength=2.0, xi=0.1)
    si.before_experience(learner, exp0)
    w = learner.model.heads["task0"].weight
    optimizer = torch.optim.SGD([w], lr=0.5)
    for _ in range(3):
        optimizer.zero_grad()
        (0.5 * (w - 1.0) ** 2).sum().backward()
        optimizer.step()
        si.after_step(learner, learner.model)
    close(w.detach(), [0.875])
    si.after_experience(learner, exp0)
    close(si.importances[0][W0], [0.65625 / (0.875 ** 2 + 0.1)])
    assert si.loss_weights() == {"penalty": 2.0}  # c, no 1/2


# ----- MAS ----------------------------------------------------------------------------------
def mas_by_hand(a: float, w: float, b: float, xs) -> dict[str, float]:
    """Mean over the samples of |d f^2 / d theta| for f = w a x + b: |2 f w x| (a), |2 f a x| (w), |2 f| (b)."""
    fs = [(w * a * x + b, x) for x in xs]
    n = len(xs)
    return {"a": sum(abs(2 * f * w * x) for f, x in fs) / n, "w": sum(abs(2 * f * a * x) for f, x in fs) / n,
            "b": sum(abs(2 * f) for f, _ in fs) / n}


def test_mas_importance_is_the_mean_absolute_per_sample_gradient_of_the_squared_output_and_adds_up():
    learner = hand_learner(outputs=1, bias=True)
    exp0, exp1 = learner.stream
    set_weights(learner, w0=[1.0], **{"heads.task0.bias": [-0.5]})  # f changes sign inside the batch
    mas = MAS(strength=5.0)
    learner.prepare(exp0)
    mas.before_experience(learner, exp0)
    mas.after_experience(learner, exp0)
    first = mas_by_hand(1.0, 1.0, -0.5, X0)
    # per sample: |2 f x| = 0.125, 0, 0.375, 1 -> 0.375 (the batch gradient's |.| would give 0.3125)
    assert first["w"] == pytest.approx(0.375)
    close(mas.importances[0][W0], [first["w"]])
    close(mas.importances[0]["heads.task0.bias"], [first["b"]])
    close(mas.importances[0][A], [first["a"]])
    learner.prepare(exp1)
    set_weights(learner, a=0.5, w1=[-2.0], **{"heads.task1.bias": [0.3]})
    mas.before_experience(learner, exp1)
    mas.after_experience(learner, exp1)
    second = mas_by_hand(0.5, -2.0, 0.3, X1)
    assert len(mas.anchors) == 1
    close(mas.importances[0][A], [first["a"] + second["a"]])  # summed over experiences
    close(mas.importances[0][W0], [first["w"]])  # experience 1's output does not depend on head 0
    close(mas.importances[0][W1], [second["w"]])
    assert mas.loss_weights() == {"penalty": 5.0}  # lambda, no 1/2


# ----- EWC++ --------------------------------------------------------------------------------
def online_step(strategy, learner, experience, rows) -> None:
    """One training step as the Trainer makes it (losses, then after_step), without moving the weights."""
    model = learner.model.train()
    x, y, t = ExperienceData(experience, learner).batch(rows)
    z = learner.encode(model, x, t)
    strategy.extra_losses(learner, model, (x, y, t), z, learner.logits(model, z, t))
    strategy.after_step(learner, model)


def test_ewc_pp_fisher_is_a_moving_average_of_batch_fishers_every_update_every_steps():
    learner = hand_learner()
    exp0, exp1 = learner.stream
    w = [0.8, -0.4]
    set_weights(learner, w0=w)
    ewc_pp = EWCPlusPlus(strength=3.0, alpha=0.25, update_every=2)
    learner.prepare(exp0)
    ewc_pp.before_experience(learner, exp0)
    batches = [[0, 1], [1, 2], [2, 3], [0, 3], [0, 2]]  # steps 0, 2 and 4 update the Fisher
    for rows in batches:
        online_step(ewc_pp, learner, exp0, rows)

    def batch_fisher(rows, a=1.0, weights=w, xs=X0, ys=Y0):
        return fisher_by_hand(a, weights, [xs[i] for i in rows], [ys[i] for i in rows])

    expected = {k: torch.tensor(v) for k, v in batch_fisher([0, 1]).items()}  # starts at the first batch's
    for rows in ([2, 3], [0, 2]):
        expected = {k: 0.25 * torch.tensor(v) + 0.75 * expected[k] for k, v in batch_fisher(rows).items()}
    close(ewc_pp.fisher[A], expected["a"])
    close(ewc_pp.fisher[W0], expected["w"])
    ewc_pp.after_experience(learner, exp0)
    close(ewc_pp.importances[0][W0], expected["w"])  # the penalty uses F at the end of the experience
    assert ewc_pp.loss_weights() == {"penalty": 1.5}  # lambda / 2

    # the average runs on into the next experience: head 0 is not read there, so its Fisher decays
    learner.prepare(exp1)
    set_weights(learner, w1=[-0.6, 0.9])
    ewc_pp.before_experience(learner, exp1)
    online_step(ewc_pp, learner, exp1, [1, 2])
    new = batch_fisher([1, 2], weights=[-0.6, 0.9], xs=X1, ys=Y1)
    close(ewc_pp.fisher[A], 0.25 * torch.tensor(new["a"]) + 0.75 * expected["a"])
    close(ewc_pp.fisher[W0], 0.75 * expected["w"])
    close(ewc_pp.fisher[W1], new["w"])  # a new head starts at its first batch's Fisher
    close(ewc_pp.importances[0][W0], expected["w"])  # the anchor's importance is left alone


# ----- RWalk --------------------------------------------------------------------------------
def walk(strategy, learner, moves) -> None:
    """Optimizer steps by hand: ``moves`` = [{parameter: (gradient applied, change of the parameter)}]."""
    params = dict(learner.model.named_parameters())
    for move in moves:
        for p in params.values():
            p.grad = None
        with torch.no_grad():
            for name, (g, delta) in move.items():
                params[name].grad = torch.full_like(params[name], g)
                params[name].add_(delta)
        strategy.after_step(learner, learner.model)


def test_rwalk_score_clips_averages_and_normalises_the_path_over_the_kl_distance():
    learner = hand_learner(outputs=1)
    exp0, exp1 = learner.stream
    rwalk = RWalk(strength=2.0, update_every=1, epsilon=0.1)
    learner.prepare(exp0)
    rwalk.before_experience(learner, exp0)
    rwalk.fisher = {A: torch.tensor([2.0]), W0: torch.tensor([[0.5]])}  # the running EWC++ Fisher
    # per step s += -g * delta / (0.5 * F * delta^2 + eps):
    #   a: 0.5 / (0.5 * 2 * 0.25 + 0.1) + 0.125 / (0.5 * 2 * 0.0625 + 0.1) = 0.5 / 0.35 + 0.125 / 0.1625
    #   w: -0.2 / (0.5 * 0.5 * 0.01 + 0.1) + 0.2 / (0.5 * 0.5 * 0.04 + 0.1) = -0.2 / 0.1025 + 0.2 / 0.11 < 0
    walk(rwalk, learner, [{A: (-1.0, 0.5), W0: (2.0, 0.1)}, {A: (-0.5, 0.25), W0: (1.0, -0.2)}])
    s_a = 0.5 / 0.35 + 0.125 / 0.1625
    close(rwalk.path[A], [s_a])
    close(rwalk.path[W0], [-0.2 / 0.1025 + 0.2 / 0.11])
    rwalk.after_experience(learner, exp0)
    close(rwalk.score[W0], [0.0])  # clipped: moving w raised the loss overall
    # Omega = F / max F + s / max s = (2/2 + 1, 0.5/2 + 0)
    close(rwalk.importances[0][A], [2.0])
    close(rwalk.importances[0][W0], [0.25])
    assert rwalk.loss_weights() == {"penalty": 2.0}  # lambda, no 1/2

    learner.prepare(exp1)
    rwalk.before_experience(learner, exp1)
    rwalk.fisher = {A: torch.tensor([2.0]), W0: torch.tensor([[0.5]]), W1: torch.tensor([[1.0]])}
    walk(rwalk, learner, [{A: (-1.0, 0.2), W1: (-2.0, 0.1)}])
    rwalk.after_experience(learner, exp1)
    s_a2 = 0.5 * (s_a + 0.2 / (0.5 * 2 * 0.04 + 0.1))  # averaged with the old score
    s_w1 = 0.2 / (0.5 * 1.0 * 0.01 + 0.1)  # a new head: its first score as it is
    close(rwalk.score[A], [s_a2])
    close(rwalk.score[W0], [0.0])
    close(rwalk.score[W1], [s_w1])
    close(rwalk.importances[0][A], [1.0 + s_a2 / s_w1])
    close(rwalk.importances[0][W1], [0.5 + 1.0])

    restored = RWalk()  # the state survives a checkpoint
    restored.load_state_dict(rwalk.state_dict())
    for name in rwalk.score:
        assert torch.equal(restored.score[name], rwalk.score[name]) and torch.equal(restored.fisher[name],
                                                                                    rwalk.fisher[name])
    assert torch.equal(restored.importances[0][A], rwalk.importances[0][A])


def test_rwalk_divides_the_gain_of_an_interval_of_update_every_steps_by_its_distance():
    learner = hand_learner(outputs=1)
    exp0 = learner.stream[0]
    rwalk = RWalk(update_every=2, epsilon=0.1)
    rwalk.before_experience(learner, exp0)
    rwalk.fisher = {A: torch.tensor([2.0]), W0: torch.tensor([[0.5]])}
    walk(rwalk, learner, [{A: (-1.0, 0.5)}, {A: (-0.5, 0.25)}])
    # one interval: gain 0.5 + 0.125 over a move of 0.75
    close(rwalk.path[A], [0.625 / (0.5 * 2 * 0.75 ** 2 + 0.1)])
    walk(rwalk, learner, [{A: (-0.5, 0.1)}])  # a last, shorter interval is closed by after_experience
    rwalk.after_experience(learner, exp0)
    close(rwalk.score[A], [0.625 / (0.5 * 2 * 0.75 ** 2 + 0.1) + 0.05 / (0.5 * 2 * 0.01 + 0.1)])


# ----- in a run -----------------------------------------------------------------------------
def run_metrics(tmp_path, strategy, seed: int = 0):
    """Task-IL Split-MNIST, 5 tasks of 80 images, Adam at a rate high enough to make fine-tuning forget."""
    stream = tiny_split("task", per_class=40, tasks=5)
    torch.manual_seed(seed)
    learner = ContinualLearner(build_encoder("mlp", in_channels=1, size=28, hidden=(32,)), stream)
    config = TrainerConfig(epochs=5, batch_size=8, optimizer="adam", lr=0.05, seed=seed, progress=False,
                           tensorboard=False)
    runner = StreamRunner(learner, strategy, config, tmp_path / strategy.name, run_config={"strategy": strategy.name})
    runner.run()
    return runner.results()["metrics"], runner.matrix.values


def test_ewc_with_a_large_strength_forgets_less_than_finetuning_on_task_il(tmp_path):
    finetune, _ = run_metrics(tmp_path, FineTune())
    ewc, values = run_metrics(tmp_path, EWC(strength=1e5))
    # seed 0: forgetting 0.25 vs 0.075; over seeds 0-9 EWC forgot 0.04-0.26 less (median 0.13)
    assert finetune["forgetting"] > 0.15, finetune
    assert ewc["forgetting"] < finetune["forgetting"] - 0.05, (ewc, finetune)
    assert min(values[i, i] for i in range(5)) > 0.75  # and it still learns each new task (chance: 0.5)


def small_runner(tmp_path, strategy) -> StreamRunner:
    """``make_runner`` of test_continual_runner.py (Class-IL, 3 experiences of 12 steps) for a strategy object."""
    stream = tiny_split("class")
    torch.manual_seed(0)
    learner = ContinualLearner(build_encoder("mlp", in_channels=1, size=28, hidden=(32,)), stream)
    config = TrainerConfig(epochs=2, batch_size=8, optimizer="sgd", lr=0.05, seed=0, progress=False,
                           tensorboard=False)
    return StreamRunner(learner, strategy, config, tmp_path / "run", run_config={"strategy": strategy.name})


@pytest.mark.parametrize("make", [lambda: EWCPlusPlus(strength=10.0, update_every=4),
                                  lambda: RWalk(strength=1.0, update_every=5), lambda: SI(strength=1.0)],
                         ids=["ewc_pp", "rwalk", "si"])
def test_a_run_killed_mid_experience_resumes_to_the_same_accuracy_matrix(tmp_path, monkeypatch, make):
    reference = small_runner(tmp_path / "a", make())
    reference.run()
    # step 18: in the middle of the second experience (12 steps per experience)
    resumed = crash_then_resume(lambda: small_runner(tmp_path / "b", make()), monkeypatch, 18)
    assert not run_differences(resumed, reference.matrix.values, reference.learner.model.state_dict())
    assert same(resumed.strategy.get_extra_state(), reference.strategy.get_extra_state())  # bit for bit


def same(a, b) -> bool:
    """Nested dicts / lists of tensors equal bit for bit."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return torch.equal(a, b)


# ----- bad input ------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [L2, EWC, OnlineEWC, SI, MAS, EWCPlusPlus, RWalk])
@pytest.mark.parametrize("strength", [0.0, -1.0, float("nan")])
def test_a_non_positive_strength_is_refused_by_every_penalty(cls, strength):
    with pytest.raises(ConfigError, match="strength must be > 0"):
        cls(strength=strength)


@pytest.mark.parametrize("make, message", [
    (lambda: EWCPlusPlus(alpha=0.0), r"alpha .* must be in \(0, 1\], got 0.0"),
    (lambda: EWCPlusPlus(alpha=1.5), r"alpha .* must be in \(0, 1\], got 1.5"),
    (lambda: RWalk(alpha=-0.1), r"alpha .* must be in \(0, 1\], got -0.1"),
    (lambda: EWCPlusPlus(update_every=0), "update_every must be a positive integer"),
    (lambda: RWalk(update_every=2.5), "update_every must be a positive integer"),
    (lambda: EWCPlusPlus(update_every=True), "update_every must be a positive integer"),
    (lambda: RWalk(epsilon=0.0), "epsilon .* must be > 0, got 0.0"),
    (lambda: OnlineEWC(gamma=0.0), r"gamma must be in \(0, 1\]"),
    (lambda: OnlineEWC(gamma=1.2), r"gamma must be in \(0, 1\]"),
    (lambda: SI(xi=-1.0), "xi must be > 0"),
])
def test_bad_options_are_refused_with_the_value_named(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


def test_alpha_one_keeps_only_the_last_batch_fisher():
    ewc_pp = EWCPlusPlus(alpha=1.0, update_every=1)
    learner = hand_learner()
    exp0 = learner.stream[0]
    set_weights(learner, w0=[0.8, -0.4])
    ewc_pp.before_experience(learner, exp0)
    for rows in ([0, 1], [2, 3]):
        online_step(ewc_pp, learner, exp0, rows)
    close(ewc_pp.fisher[W0], fisher_by_hand(1.0, [0.8, -0.4], X0[2:], Y0[2:])["w"])


def test_combined_quadratic_has_the_value_and_gradient_of_the_sum_over_anchors():
    """Three anchors of a growing head (2, 4 and 6 rows) and a shared weight, some importances zero."""
    from continual.strategies.regularisation import combine_quadratics

    gen = torch.Generator().manual_seed(0)
    anchors, importances = [], []
    for rows in (2, 4, 6):
        omega = torch.rand(rows, 3, generator=gen)
        omega[0, 0] = 0.0
        anchors.append({"head": torch.randn(rows, 3, generator=gen), "shared": torch.randn(5, generator=gen)})
        importances.append({"head": omega, "shared": torch.rand(5, generator=gen)})
    theta = {"head": torch.randn(8, 3, generator=gen, requires_grad=True),  # grown again since the last anchor
             "shared": torch.randn(5, generator=gen, requires_grad=True)}
    by_anchor = sum((omega[n] * (theta[n][: anchor[n].shape[0]] - anchor[n]) ** 2).sum()
                    for anchor, omega in zip(anchors, importances) for n in anchor)
    combined = combine_quadratics(anchors, importances)
    assert combined["head"][0].shape == (6, 3)
    one = sum((a * (theta[n][: m.shape[0]] - m) ** 2).sum() + c for n, (a, m, c) in combined.items())
    torch.testing.assert_close(one, by_anchor, rtol=1e-5, atol=1e-6)
    expected = torch.autograd.grad(by_anchor, list(theta.values()))
    for got, want in zip(torch.autograd.grad(one, list(theta.values())), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert float(expected[0][6:].abs().sum()) == 0.0  # rows no anchor covers are free
    single = combine_quadratics(anchors[:1], importances[:1])["head"]
    weighted = importances[0]["head"] > 0
    assert torch.equal(single[1][weighted], anchors[0]["head"][weighted]) and single[2] == 0.0  # m = theta*, c = 0


def test_flat_quadratic_is_the_sum_over_parameters_with_its_gradient():
    """The one-node penalty on two parameters, one of them a head grown since the anchor."""
    from continual.strategies.regularisation import FlatQuadratic

    gen = torch.Generator().manual_seed(1)
    combined = {"w": (torch.rand(2, 3, generator=gen), torch.randn(2, 3, generator=gen), 0.25),
                "b": (torch.rand(4, generator=gen), torch.randn(4, generator=gen), 0.0),
                "frozen": (torch.rand(1), torch.zeros(1), 5.0)}
    params = {"w": torch.randn(5, 3, generator=gen, requires_grad=True),
              "b": torch.randn(4, generator=gen, requires_grad=True)}
    quadratic = FlatQuadratic(combined, params)
    assert quadratic.names == ["w", "b"] and quadratic.fits(params) and not quadratic.fits({"w": params["w"]})
    got = quadratic(params)
    expected = sum((a * (params[n][: m.shape[0]] - m) ** 2).sum() + c for n, (a, m, c) in combined.items()
                   if n in params)
    torch.testing.assert_close(got, expected)
    for g, e in zip(torch.autograd.grad(got, list(params.values())),
                    torch.autograd.grad(expected, list(params.values()))):
        torch.testing.assert_close(g, e)
    one = {"t": (torch.rand(3, dtype=torch.float64, generator=gen), torch.randn(3, dtype=torch.float64, generator=gen),
                 0.0)}
    assert torch.autograd.gradcheck(lambda t: FlatQuadratic(one, {"t": t})({"t": t}),
                                    (torch.randn(3, dtype=torch.float64, generator=gen, requires_grad=True),))
