"""Progressive Neural Networks: the lateral equation by hand, frozen columns (zero forgetting), growth, resume."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from continual.learner import ContinualLearner
from continual.runner import StreamRunner
from continual.strategies.progressive import PNN, ProgressiveEncoder
from mtl.config import TrainerConfig
from mtl.encoders import build_encoder
from mtl.errors import ConfigError

from test_continual_runner import crash_then_resume, run_differences, tiny_split

HIDDEN = (16, 8)
IN = 28 * 28


class Recording(PNN):
    """PNN that keeps a copy of the model's weights after every experience."""

    def __init__(self, **options):
        super().__init__(**options)
        self.snapshots = []

    def after_experience(self, learner, experience):
        self.snapshots.append({k: v.clone() for k, v in learner.model.state_dict().items()})


def pnn_runner(run_dir, strategy=None, setting="task"):
    stream = tiny_split(setting)
    torch.manual_seed(0)
    learner = ContinualLearner(build_encoder("mlp", in_channels=1, size=28, hidden=(32,)), stream)
    # momentum and weight decay: frozen weights must stay put even with an optimizer that has state
    config = TrainerConfig(epochs=2, batch_size=8, optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=1e-3,
                           seed=0, progress=False, tensorboard=False)
    return StreamRunner(learner, strategy or PNN(hidden=HIDDEN), config, run_dir, run_config={"strategy": "pnn"})


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    runner = pnn_runner(tmp_path_factory.mktemp("pnn") / "run", Recording(hidden=HIDDEN))
    runner.run()
    return runner


def test_old_columns_are_bit_identical_and_old_accuracy_never_changes(reference):
    values = reference.matrix.values
    for i in range(3):
        assert values[i, i] > 0.75, f"experience {i} barely learnt: {values}"  # 2 classes: chance is 0.5
    assert values[0, 0] == values[1, 0] == values[2, 0]  # zero forgetting
    assert values[1, 1] == values[2, 1]
    final = reference.learner.model.state_dict()
    snapshots = reference.strategy.snapshots
    for k, task in ((0, "task0"), (1, "task1")):
        frozen = [n for n in snapshots[k] if f"columns.{task}." in n or f"heads.{task}." in n]
        assert len(frozen) >= 4
        for name in frozen:
            assert torch.equal(snapshots[k][name], final[name]), name
    # the newest column did train
    assert not torch.equal(snapshots[2]["encoder.columns.task2.layers.0.weight"],
                           snapshots[1]["encoder.columns.task1.layers.0.weight"])


def test_configure_replaces_the_encoder_and_resizes_the_first_head(reference):
    model = reference.learner.model
    assert isinstance(model.encoder, ProgressiveEncoder) and model.encoder.tasks == ["task0", "task1", "task2"]
    assert all(head.in_features == HIDDEN[-1] for head in model.heads.values())
    # hidden=None takes the widths of the learner's mlp encoder
    runner = pnn_runner(reference.run_dir.parent / "default", PNN())
    assert runner.learner.model.encoder.hidden == (32,)


def test_the_lateral_equation_by_hand():
    torch.manual_seed(0)
    encoder = ProgressiveEncoder((1, 2, 2), hidden=(3, 2))
    encoder.add_task("task0")
    encoder.add_task("task1")
    x = torch.randn(5, 1, 2, 2)
    out = encoder(x, ["task1", "task0"])
    assert list(out) == ["task1", "task0"]
    c0, c1 = encoder.columns["task0"], encoder.columns["task1"]
    flat = x.flatten(1)
    h0 = F.relu(F.linear(flat, c0.layers[0].weight, c0.layers[0].bias))
    h1 = F.relu(F.linear(flat, c1.layers[0].weight, c1.layers[0].bias))
    expected0 = F.relu(F.linear(h0, c0.layers[1].weight, c0.layers[1].bias))
    expected1 = F.relu(F.linear(h1, c1.layers[1].weight, c1.layers[1].bias) + h0 @ c1.laterals[0][0].weight.T)
    torch.testing.assert_close(out["task0"], expected0)
    torch.testing.assert_close(out["task1"], expected1)
    assert len(c0.laterals[0]) == 0  # the first column reads no one


def test_lateral_connections_carry_gradient_and_old_columns_and_heads_get_none(tmp_path):
    runner = pnn_runner(tmp_path / "run")
    learner = runner.learner
    for experience in learner.stream:
        learner.prepare(experience)
        runner.strategy.before_experience(learner, experience)
    model = learner.model
    x = torch.rand(6, 1, 28, 28)
    y, t = torch.tensor([0, 1, 0, 1, 0, 1]), torch.full((6,), 2)
    learner.loss(learner.logits(model, learner.encode(model, x, t), t), y).backward()
    new = model.encoder.columns["task2"]
    for j in range(2):  # laterals from both earlier columns
        grad = new.laterals[0][j].weight.grad
        assert grad is not None and grad.abs().sum() > 0
    for task in ("task0", "task1"):
        old = [*model.encoder.columns[task].parameters(), *model.heads[task].parameters()]
        assert all(not p.requires_grad and p.grad is None for p in old)
    assert all(p.requires_grad for p in [*new.parameters(), *model.heads["task2"].parameters()])


def test_parameter_count_grows_by_a_column_its_laterals_and_a_head_per_task(tmp_path):
    runner = pnn_runner(tmp_path / "run")
    learner = runner.learner

    def count():
        return sum(p.numel() for p in learner.model.parameters())

    column = IN * 16 + 16 + 16 * 8 + 8
    head = 8 * 2 + 2
    for k, experience in enumerate(learner.stream):
        learner.prepare(experience)
        runner.strategy.before_experience(learner, experience)
        expected = sum(column + j * 16 * 8 + head for j in range(k + 1))  # column j reads the j before it
        assert count() == expected
        trainable = sum(p.numel() for p in learner.model.parameters() if p.requires_grad)
        assert trainable == column + k * 16 * 8 + head


@pytest.mark.parametrize("setting", ["class", "domain"])
def test_pnn_refuses_class_and_domain_incremental_streams(tmp_path, setting):
    with pytest.raises(ConfigError, match="task id at test time"):
        pnn_runner(tmp_path / "run", setting=setting)


def test_bad_hidden_widths_are_refused():
    with pytest.raises(ConfigError, match="positive integers"):
        PNN(hidden=(100, 0))


def test_a_pnn_run_killed_mid_experience_resumes_to_the_same_matrix_and_weights(reference, tmp_path, monkeypatch):
    # step 18: in the middle of the second experience (12 steps per experience)
    resumed = crash_then_resume(lambda: pnn_runner(tmp_path / "run"), monkeypatch, 18)
    assert not run_differences(resumed, reference.matrix.values, reference.learner.model.state_dict())
