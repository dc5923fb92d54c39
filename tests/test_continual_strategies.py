"""Replay and distillation strategies: their defining behaviour on tiny streams."""

from __future__ import annotations

import pytest
import torch

from continual.strategies import build_strategy
from continual.strategies.distillation import soft_cross_entropy
from mtl.errors import ConfigError

from test_continual_runner import make_runner


def test_er_keeps_a_bounded_memory_and_forgets_less_than_finetune_in_class_il(tmp_path):
    finetune = make_runner(tmp_path / "ft", "class")
    finetune.run()
    replay = make_runner(tmp_path / "er", "class", strategy="er", buffer_size=30)
    replay.run()
    buffer = replay.strategy.buffer
    assert len(buffer) == 30 and buffer.seen == 3 * 2 * 24 * 2  # every sample offered once per epoch (2 epochs)
    assert set(buffer.classes()) == set(range(6))  # head targets of all three experiences
    assert replay.results()["metrics"]["acc"] > finetune.results()["metrics"]["acc"] + 0.15


@pytest.mark.parametrize("setting", ["task", "class"])
def test_er_steps_on_the_current_and_a_memory_batch_as_one_batch(tmp_path, setting):
    """Chaudhry et al. 2019, Algorithm 1: one SGD step on B u B_M, the mean cross-entropy over both; the batch
    enters the memory after the step's draw, and the strategy's own losses see the current rows only."""
    from continual.strategies.base import ContinualObjective

    runner = make_runner(tmp_path, setting, strategy="er", buffer_size=8)
    learner, strategy = runner.learner, runner.strategy
    learner.prepare(learner.stream[0])
    objective = ContinualObjective(strategy, learner)
    assert objective.loss_names == ["current"]
    torch.manual_seed(0)
    first = (torch.rand(6, 1, 28, 28), torch.tensor([0, 1, 1, 0, 1, 0]), torch.zeros(6, dtype=torch.long))
    losses, rep = objective.losses(learner.model, first)  # empty memory: the current batch alone
    plain = learner.loss(learner.logits(learner.model, learner.encode(learner.model, first[0], first[2]), first[2]),
                         first[1])
    torch.testing.assert_close(losses["current"], plain)
    assert len(rep) == 6 and len(strategy.buffer) == 6
    second = (torch.rand(4, 1, 28, 28), torch.tensor([1, 0, 0, 1]), torch.zeros(4, dtype=torch.long))
    draw = strategy.buffer.generator.get_state()
    memory = strategy.buffer.sample(4)
    strategy.buffer.generator.set_state(draw)  # the objective draws the same memory batch
    losses, rep = objective.losses(learner.model, second)
    x, y, t = (torch.cat(pair) for pair in zip(second, (memory.inputs, memory.labels, memory.task_ids)))
    union = learner.loss(learner.logits(learner.model, learner.encode(learner.model, x, t), t), y)
    torch.testing.assert_close(losses["current"], union)
    assert len(rep) == 8 and strategy.buffer.seen == 10


def test_der_stores_the_logits_the_model_gave_when_it_saw_the_sample(tmp_path):
    runner = make_runner(tmp_path, "task", strategy="der", buffer_size=8)
    learner, strategy = runner.learner, runner.strategy
    learner.prepare(learner.stream[0])
    x = torch.rand(4, 1, 28, 28)
    y, t = torch.tensor([0, 1, 0, 1]), torch.zeros(4, dtype=torch.long)
    z = learner.encode(learner.model, x, t)
    logits = learner.logits(learner.model, z, t)
    losses = strategy.extra_losses(learner, learner.model, (x, y, t), z, logits)
    assert losses["logits"].item() == 0.0  # empty memory before this batch
    stored = strategy.buffer.contents()
    assert torch.equal(stored.logits, logits.detach())
    # the same model replaying its own stored logits has nothing to match
    again = strategy.memory_losses(learner, learner.model, 4, z)
    assert again["logits"].item() == pytest.approx(0.0, abs=1e-12)


def test_derpp_adds_a_label_loss_on_a_second_memory_batch():
    strategy = build_strategy("derpp", buffer_size=10)
    assert strategy.extra_loss_names == ("logits", "labels")
    assert strategy.loss_weights() == {"logits": 0.1, "labels": 0.5}  # the paper's Split-MNIST values


def test_agem_projection_never_increases_the_memory_loss_to_first_order(tmp_path):
    runner = make_runner(tmp_path, "task", strategy="agem", buffer_size=24)
    seen = []
    from continual.projection import AGEMWeighting

    backward = AGEMWeighting.backward

    def spy(self, losses, shared_params=None, rep=None):
        weights = backward(self, losses, shared_params, rep)
        seen.append(self.last_projection)
        return weights

    AGEMWeighting.backward = spy
    try:
        runner.run()
    finally:
        AGEMWeighting.backward = backward
    projected = [p for p in seen if p.projected]
    assert projected, "no step conflicted with the memory: the test would not test anything"
    assert all(min(p.dots_after) >= -1e-6 * max(1.0, abs(min(p.dots_before))) for p in projected)


def test_gem_holds_one_constraint_per_past_experience(tmp_path):
    runner = make_runner(tmp_path, "task", strategy="gem", buffer_size=48)
    from continual.projection import GEMWeighting

    seen = []
    backward = GEMWeighting.backward

    def spy(self, losses, shared_params=None, rep=None):
        seen.append((losses["memory"].numel(), backward(self, losses, shared_params, rep), self.last_projection))
        return seen[-1][1]

    GEMWeighting.backward = spy
    try:
        runner.run()
    finally:
        GEMWeighting.backward = backward
    counts = [n for n, _, _ in seen]
    assert counts[0] == 0 and max(counts) == 2  # experience 0: no past; experience 2: two past experiences
    for n, _, projection in seen:
        if n and projection.projected:
            assert len(projection.dots_after) == n and min(projection.dots_after) >= -1e-6


def test_lwf_distillation_has_no_gradient_when_the_model_equals_its_teacher():
    logits = torch.randn(5, 3, requires_grad=True)
    loss = soft_cross_entropy(logits, logits.detach(), temperature=2.0)
    (grad,) = torch.autograd.grad(loss, logits)
    assert grad.abs().max() < 1e-7
    # and it pulls towards the teacher otherwise: the loss is the teacher's entropy plus KL >= 0
    teacher = torch.randn(5, 3)
    p = torch.softmax(teacher / 2, 1)
    entropy = -(p * p.log()).sum(1).mean()
    assert soft_cross_entropy(torch.randn(5, 3), teacher, 2.0) >= entropy - 1e-6


def test_lwf_keeps_old_task_heads_closer_than_finetune(tmp_path):
    finetune = make_runner(tmp_path / "ft", "task")
    finetune.run()
    lwf = make_runner(tmp_path / "lwf", "task", strategy="lwf", alpha=5.0)
    lwf.run()
    assert lwf.results()["metrics"]["forgetting"] <= finetune.results()["metrics"]["forgetting"]


def test_joint_trains_on_every_experience_seen_so_far(tmp_path):
    runner = make_runner(tmp_path, "class", strategy="joint")
    data = runner.strategy.train_data(runner.learner, runner.learner.stream[2])
    assert len(data) == 3 * 2 * 24
    runner.run()
    assert runner.results()["metrics"]["forgetting"] < 0.2


@pytest.mark.parametrize("name, options, message", [
    ("er", {"buffer_size": 0}, "buffer size 0 cannot replay anything"),
    ("der", {"alpha": -1.0}, "alpha and beta must be >= 0"),
    ("lwf", {"temperature": 0.0}, "temperature must be > 0"),
    ("ewc", {"strength": 0.0}, "must be > 0"),
    ("online_ewc", {"gamma": 1.5}, "gamma must be in"),
    ("finetune", {"buffer_size": 10}, "takes no option"),
    ("sgd", {}, "unknown continual strategy 'sgd'"),
])
def test_bad_strategy_options_are_clear_errors(name, options, message):
    with pytest.raises(ConfigError, match=message):
        build_strategy(name, **options)


def test_der_gives_the_class_il_head_every_class_of_the_stream_from_the_start(tmp_path):
    runner = make_runner(tmp_path, "class", strategy="der", buffer_size=8)
    assert runner.learner.model.heads["classifier"].num_classes == 6  # 3 experiences x 2 classes, before any
    plain = make_runner(tmp_path / "plain", "class", strategy="er", buffer_size=8)
    assert plain.learner.model.heads["classifier"].num_classes == 0  # grows as experiences come


@pytest.mark.parametrize("setting", ["task", "class", "domain"])
def test_lwf_records_the_old_models_outputs_once_as_a_teacher_pass_would_give_them(setting):
    """LwF's Algorithm 1 records Y_o before training: the recorded rows are the old model's softened outputs on
    each sample (its old heads side by side, the old classes only in Class-IL), and the loss from them is the
    soft cross-entropy against a teacher pass on the batch."""
    from continual.learner import ContinualLearner
    from continual.strategies.distillation import WithRecorded
    from mtl.encoders import build_encoder
    from test_continual_runner import tiny_split

    stream = tiny_split(setting)
    torch.manual_seed(0)
    learner = ContinualLearner(build_encoder("mlp", in_channels=1, size=28, hidden=(16,)), stream)
    lwf = build_strategy("lwf", temperature=3.0)
    for experience in stream:  # the third experience, after two
        with torch.no_grad():  # the model moves on between experiences
            for p in learner.model.parameters():
                p.add_(0.1 * torch.randn_like(p))
        learner.prepare(experience)
        lwf.before_experience(learner, experience)
    data = lwf.train_data(learner, stream[2])
    assert isinstance(data, WithRecorded)
    teacher = lwf.teacher[0]
    x, y, t = data.data.batch(range(len(data)))
    z_old = learner.encode(teacher, x, t)
    expected = torch.cat([torch.softmax(lwf.old_part(learner, teacher.heads[h](z_old)) / 3.0, dim=1)
                          for h in lwf.old_heads], dim=1)
    torch.testing.assert_close(data.recorded, expected)
    widths = {"task": 2 * learner.width, "class": 4, "domain": learner.width}
    assert data.recorded.shape == (len(data), widths[setting])
    batch = data.__getitems__([3, 0, 7])
    for field, one in zip(batch.fields, data[7]):
        assert torch.equal(field[2], torch.as_tensor(one))
    batch = list(batch.fields)
    model = learner.model
    z = learner.encode(model, batch[0], batch[2])
    logits = learner.logits(model, z, batch[2])
    loss = lwf.extra_losses(learner, model, batch, z, logits)["distillation"]
    by_hand = sum(soft_cross_entropy(lwf.old_part(learner, model.heads[h](z)),
                                     lwf.old_part(learner, teacher.heads[h](learner.encode(teacher, batch[0], batch[2]))),
                                     3.0) for h in lwf.old_heads)
    torch.testing.assert_close(loss, by_hand)
