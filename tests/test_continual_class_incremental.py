"""iCaRL and LUCIR: herding, nearest-mean classification and losses on hand-checked cases; runs and resume."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import default_collate

from continual.learner import ContinualLearner
from continual.runner import StreamRunner
from continual.scenarios import split_stream
from continual.strategies import build_strategy
from continual.strategies.class_incremental import LUCIR, CosineClassifier, ICaRL, margin_ranking_loss
from mtl.config import TrainerConfig
from mtl.encoders import build_encoder
from mtl.errors import ConfigError

from test_continual_runner import crash_then_resume, run_differences, tiny_split


class Flatten(nn.Module):
    """The identity feature map on 1x1x2 'images': phi(x) is the point itself (before normalisation)."""

    out_features = 2

    def forward(self, x):
        return x.flatten(1)


# class 0 normalises to (1,0), (0,1), (.8,.6), (.28,.96); class 1 is its mirror image, at other lengths
CLASS0 = [(1.0, 0.0), (0.0, 1.0), (0.8, 0.6), (0.28, 0.96)]
CLASS1 = [(0.0, 0.5), (0.2, 0.0), (0.3, 0.4), (0.48, 0.14)]
CLASS2 = [(0.5, 0.5), (0.9, 0.9), (0.2, 0.1), (0.1, 0.2)]
CLASS3 = [(0.1, 0.9), (0.2, 0.7), (0.3, 0.9), (0.0, 0.6)]


def points_stream():
    """Two experiences, classes (0, 1) then (2, 3), four 2-d points per class."""
    points = CLASS0 + CLASS1 + CLASS2 + CLASS3
    images = torch.tensor(points).view(-1, 1, 1, 2)
    labels = torch.arange(4).repeat_interleave(4)
    return split_stream(images, labels, images, labels, classes_per_task=2, setting="class", name="points")


def point_learner():
    torch.manual_seed(0)
    return ContinualLearner(Flatten(), points_stream())


def start(learner, strategy, index):
    """What the runner does before training experience ``index``."""
    experience = learner.stream[index]
    learner.prepare(experience)
    strategy.before_experience(learner, experience)
    return experience


def image(point):
    return torch.tensor(point).view(1, 1, 2)


# ----- iCaRL -------------------------------------------------------------------------------------


def test_icarl_herds_exemplars_on_normalised_features_and_reduces_old_sets_to_their_first_m():
    learner, icarl = point_learner(), ICaRL(memory_size=4)
    icarl.after_experience(learner, start(learner, icarl, 0))
    memory = icarl.memory
    # herding by hand on the normalised points of class 0: mu = (.52, .64); k=1 picks (.8,.6) (distance .28),
    # k=2 picks (.28,.96) (mean (.54,.78), distance .14). Class 1 mirrors it: (.3,.4) then (.48,.14);
    # unnormalised features would pick (.2, 0) second instead.
    assert memory.labels.tolist() == [0, 0, 1, 1]
    expected = torch.stack([image(p) for p in (CLASS0[2], CLASS0[3], CLASS1[2], CLASS1[3])])
    assert torch.equal(memory.inputs, expected)

    icarl.after_experience(learner, start(learner, icarl, 1))
    # m = 4 // 4 classes = 1: the old classes keep their first exemplar; class 2's mean is nearest (.5,.5)
    assert memory.labels.tolist() == [0, 1, 2, 3] and len(memory) <= 4
    assert torch.equal(memory.inputs[:3], torch.stack([image(CLASS0[2]), image(CLASS1[2]), image(CLASS2[0])]))


def test_icarl_classifies_by_the_nearest_mean_of_exemplars():
    learner, icarl = point_learner(), ICaRL(memory_size=4)
    icarl.after_experience(learner, start(learner, icarl, 0))
    # means of the normalised exemplars, renormalised: class 0 (.54, .78), class 1 (.78, .54), over |.| = sqrt(.9)
    norm = math.sqrt(0.9)
    means = [(0.54 / norm, 0.78 / norm), (0.78 / norm, 0.54 / norm)]
    assert torch.allclose(icarl.means, torch.tensor(means), atol=1e-6)
    points = [(0.9, 0.1), (0.1, 0.3), (0.4, 0.6)]
    x = torch.stack([image(p) for p in points])
    scores = icarl.scores(learner, learner.model, x, torch.zeros(3, dtype=torch.long))
    for row, (a, b) in enumerate(points):
        phi = (a / math.hypot(a, b), b / math.hypot(a, b))
        expected = [-math.dist(phi, mu) for mu in means]
        assert scores[row].tolist() == pytest.approx(expected, abs=1e-6)
    assert scores.argmax(1).tolist() == [1, 0, 0]


def sigmoid(a):
    return 1.0 / (1.0 + math.exp(-a))


def bce(a, t):
    return -(t * math.log(sigmoid(a)) + (1 - t) * math.log(1 - sigmoid(a)))


def test_icarl_loss_is_bce_with_one_hot_new_targets_and_the_old_models_outputs_as_old_targets():
    learner, icarl = point_learner(), ICaRL(memory_size=4)
    start(learner, icarl, 0)
    head = learner.model.heads["classifier"].linear
    with torch.no_grad():  # the old model: logits = x
        head.weight.copy_(torch.eye(2))
        head.bias.zero_()
    start(learner, icarl, 1)  # snapshot of the old model, head grown to 4 outputs
    head = learner.model.heads["classifier"].linear
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 2.0], [1.0, 1.0], [-1.0, 1.0]]))
        head.bias.zero_()
    x = torch.stack([image((1.0, 0.0)), image((0.5, 0.5))])
    y, t = torch.tensor([2, 0]), torch.tensor([1, 0])  # a new-class sample, an exemplar of old class 0
    z = learner.encode(learner.model, x, t)
    loss = icarl.extra_losses(learner, learner.model, (x, y, t), z, learner.logits(learner.model, z, t))["bce"]
    # sample 1: logits (2, 0, 1, -1), old logits (1, 0); sample 2: logits (1, 1, 1, 0), old logits (.5, .5)
    first = bce(2, sigmoid(1)) + bce(0, sigmoid(0)) + bce(1, 1) + bce(-1, 0)
    second = bce(1, sigmoid(0.5)) + bce(1, sigmoid(0.5)) + bce(1, 0) + bce(0, 0)  # no one-hot on old classes
    assert loss.item() == pytest.approx((first + second) / 2, rel=1e-6)
    # the softmax cross-entropy is replaced, not added to
    weighting = icarl.weighting(learner, ["current", "bce"])
    assert weighting.weights() == {"current": 0.0, "bce": 1.0}


# ----- LUCIR -------------------------------------------------------------------------------------


def test_cosine_classifier_outputs_eta_times_cosine_and_grows_keeping_old_weights():
    head = CosineClassifier(2, 2, eta=2.0)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[3.0, 4.0], [0.0, -2.0]]))
    out = head(torch.tensor([[1.0, 1.0]]))
    assert out[0].tolist() == pytest.approx([2 * 7 / (5 * math.sqrt(2)), 2 * -2 / (2 * math.sqrt(2))], rel=1e-6)
    old = head.weight.detach().clone()
    head.grow(4)
    assert head(torch.ones(3, 2)).shape == (3, 4) and torch.equal(head.weight[:2], old)
    assert head.eta.item() == 2.0 and head.eta.requires_grad  # eta is learnt
    head(torch.ones(1, 2)).sum().backward()
    assert head.eta.grad is not None


def test_margin_ranking_loss_by_hand():
    cosine = torch.tensor([[0.9, 0.1, 0.5, 0.6, -0.2],   # old class 0: hinge .5-.9+.6 = .2 and .5-.9+.5 = .1
                           [0.0, 0.2, 0.3, 0.1, 0.4],    # old class 1: .5-.2+.4 = .7 and .5-.2+.3 = .6
                           [0.1, 0.1, 0.9, 0.0, 0.0]])   # a new class: not in the loss
    targets = torch.tensor([0, 1, 2])
    loss = margin_ranking_loss(cosine, targets, old_classes=2, margin=0.5, top_k=2)
    assert loss.item() == pytest.approx((0.3 + 1.3) / 2, rel=1e-6)
    assert margin_ranking_loss(cosine, torch.tensor([2, 3, 4]), 2, 0.5, 2).item() == 0.0  # no exemplar in batch


def test_lucir_less_forget_is_zero_for_an_unchanged_model_its_weight_follows_eq7_and_old_embeddings_stay():
    stream = tiny_split("class")
    torch.manual_seed(0)
    learner = ContinualLearner(build_encoder("mlp", in_channels=1, size=28, hidden=(32,)), stream)
    lucir = LUCIR(memory_size=12)
    lucir.configure(learner)
    assert isinstance(learner.model.heads["classifier"], CosineClassifier)
    lucir.after_experience(learner, start(learner, lucir, 0))
    assert lucir.loss_weights()["less_forget"] == 0.0  # no old classes yet
    experience = start(learner, lucir, 1)
    assert lucir.loss_weights() == {"less_forget": pytest.approx(5.0), "margin": 1.0}  # 5 sqrt(2 / 2)

    data = lucir.train_data(learner, experience)
    assert len(data) == 2 * 24 + 12  # the new data and the exemplars
    x, y, t = default_collate([data[i] for i in range(40, 60)])  # 8 new samples, 12 exemplars
    model = learner.model
    z = learner.encode(model, x, t)
    losses = lucir.extra_losses(learner, model, (x, y, t), z, learner.logits(model, z, t))
    assert losses["less_forget"].item() == pytest.approx(0.0, abs=1e-6)  # new model == old model
    assert losses["margin"].item() > 0.0  # margin 0.5 exceeds the cosine gaps of an untrained model

    head = model.heads["classifier"]
    old_rows = head.weight[:2].detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=0.1)
    for _ in range(2):
        z = learner.encode(model, x, t)
        logits = learner.logits(model, z, t)
        extra = lucir.extra_losses(learner, model, (x, y, t), z, logits)
        (learner.loss(logits, y) + 5.0 * extra["less_forget"] + extra["margin"]).backward()
        optimizer.step()
        lucir.after_step(learner, model)
        optimizer.zero_grad()
    assert torch.equal(head.weight[:2], old_rows)  # old class embeddings fixed
    z = learner.encode(model, x, t)
    assert lucir.extra_losses(learner, model, (x, y, t), z, learner.logits(model, z, t))["less_forget"] > 1e-4

    lucir.after_experience(learner, experience)
    start(learner, lucir, 2)
    assert lucir.loss_weights()["less_forget"] == pytest.approx(5.0 * math.sqrt(4 / 2))


# ----- settings and options ------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", [ICaRL, LUCIR])
def test_class_il_strategies_refuse_other_settings_and_too_small_memories(strategy):
    with pytest.raises(ConfigError, match="cannot run in the task-incremental setting"):
        strategy().check(tiny_split("task"))
    with pytest.raises(ConfigError, match="memory_size=4 leaves no exemplar .* give memory_size >= 6"):
        strategy(memory_size=4).check(tiny_split("class"))
    with pytest.raises(ConfigError, match="memory_size must be a whole number"):
        strategy(memory_size=0)


# ----- runs ---------------------------------------------------------------------------------------


def make_runner(tmp_path, strategy, seed=0):
    stream = tiny_split("class")
    torch.manual_seed(seed)
    learner = ContinualLearner(build_encoder("mlp", in_channels=1, size=28, hidden=(32,)), stream)
    config = TrainerConfig(epochs=2, batch_size=8, optimizer="sgd", lr=0.05, seed=seed, progress=False,
                           tensorboard=False)
    return StreamRunner(learner, strategy, config, tmp_path / "run", run_config={"strategy": strategy.name})


STRATEGIES = {"icarl": lambda: ICaRL(memory_size=12), "lucir": lambda: LUCIR(memory_size=12)}


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_class_il_strategies_beat_finetune_on_split_mnist(tmp_path, name):
    finetune = make_runner(tmp_path / "ft", build_strategy("finetune"))
    finetune.run()
    runner = make_runner(tmp_path / name, STRATEGIES[name]())
    runner.run()
    # 12 exemplars for 6 classes: 2 each at the end
    assert runner.strategy.memory.class_counts() == dict.fromkeys(range(6), 2)
    # fine-tuning predicts the last two classes only (ACC ~ 1/3); seed 0 gives icarl 0.81, lucir 0.75
    acc, baseline = runner.results()["metrics"]["acc"], finetune.results()["metrics"]["acc"]
    assert acc > baseline + 0.2, (acc, baseline)


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_a_run_killed_mid_experience_resumes_to_the_same_result(tmp_path, monkeypatch, name):
    reference = make_runner(tmp_path / "a", STRATEGIES[name]())
    reference.run()
    # step 18: in the middle of the second experience (12 steps in the first)
    resumed = crash_then_resume(lambda: make_runner(tmp_path / "b", STRATEGIES[name]()), monkeypatch, 18)
    assert not run_differences(resumed, reference.matrix.values, reference.learner.model.state_dict())
    for key, value in resumed.strategy.get_extra_state()["memory"].items():
        assert torch.equal(value, reference.strategy.memory.state_dict()[key]), key
    if name == "icarl":
        assert torch.equal(resumed.strategy.means, reference.strategy.means)
