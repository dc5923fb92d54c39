"""The stream runner: accuracy matrix per setting, whole-run checkpoints, exact resume, bad input."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from continual.learner import ContinualLearner
from continual.runner import StreamRunner
from continual.scenarios import split_stream
from continual.strategies import build_strategy
from mtl.config import TrainerConfig
from mtl.data.mnist import load_mnist
from mtl.encoders import build_encoder
from mtl.errors import CheckpointError, ConfigError


def tiny_split(setting: str, per_class: int = 24, tasks: int = 3):
    """Split-MNIST on the first ``tasks`` pairs of classes, ``per_class`` train images each (quarter as many test)."""
    streams = []
    for split, count in (("train", per_class), ("test", per_class // 4)):
        images, labels = load_mnist(split)
        keep = torch.cat([(labels == c).nonzero().flatten()[:count] for c in range(2 * tasks)])
        streams += [images[keep], labels[keep]]
    return split_stream(*streams, classes_per_task=2, setting=setting, name="tiny_split")


def make_runner(tmp_path, setting="class", strategy="finetune", seed=0, overwrite=False, **options):
    stream = tiny_split(setting)
    torch.manual_seed(seed)
    learner = ContinualLearner(build_encoder("mlp", in_channels=1, size=28, hidden=(32,)), stream)
    config = TrainerConfig(epochs=2, batch_size=8, optimizer="sgd", lr=0.05, seed=seed, progress=False,
                           tensorboard=False)
    return StreamRunner(learner, build_strategy(strategy, **options), config, tmp_path / "run",
                        run_config={"strategy": strategy}, overwrite=overwrite)


@pytest.mark.parametrize("setting", ["task", "class", "domain"])
def test_accuracy_matrix_fills_the_lower_triangle_and_the_model_learns(tmp_path, setting):
    runner = make_runner(tmp_path, setting)
    matrix = runner.run()
    values = matrix.values
    for i in range(3):
        assert values[i, i] > 0.75, f"experience {i} barely learnt: {values}"  # 2 classes: chance is 0.5
        assert all(values[i, j] == values[i, j] for j in range(i + 1))  # measured: seen experiences
    if setting == "domain":  # the shared head measures unseen experiences too, and the baseline exists
        assert not torch.isnan(torch.tensor(values)).any() and matrix.baseline is not None
    else:
        assert torch.isnan(torch.tensor(values[0, 1:])).all()
    results = runner.results()
    assert results["metrics"]["acc"] == pytest.approx(values[2].mean())
    assert ("task_matrix" in results) == (setting == "class")
    assert (tmp_path / "run" / "accuracy_matrix.json").is_file()


def test_class_il_finetune_forgets_and_its_task_il_view_does_not_collapse(tmp_path):
    runner = make_runner(tmp_path, "class")
    runner.run()
    results = runner.results()
    # fine-tuning in Class-IL predicts the newest classes only: old experiences fall to ~0
    assert results["metrics"]["forgetting"] > 0.5
    assert results["task_metrics"]["acc"] > results["metrics"]["acc"] + 0.2


class Crash(Exception):
    pass


def crash_then_resume(build, monkeypatch, crash_at: int):
    """Run ``build()`` until its strategy's ``crash_at``-th optimizer step raises, then resume a
    fresh ``build()`` in the same folder (``build`` must give runners of one run folder)."""
    crashing = build()
    cls = type(crashing.strategy)
    original, steps = cls.after_step, {"n": 0}

    def after_step(self, learner, model):
        original(self, learner, model)
        steps["n"] += 1
        if steps["n"] == crash_at:
            raise Crash()

    monkeypatch.setattr(cls, "after_step", after_step)
    with pytest.raises(Crash):
        crashing.run()
    monkeypatch.setattr(cls, "after_step", original)
    resumed = build()
    resumed.run(resume=True)
    return resumed


def run_differences(runner, matrix, weights) -> list[str]:
    """What differs between ``runner``'s accuracy matrix and model weights and ``matrix`` (values) and
    ``weights``, bit for bit; empty when the two runs are the same."""
    differences = []
    if not torch.equal(torch.tensor(runner.matrix.values).nan_to_num(-1), torch.tensor(matrix).nan_to_num(-1)):
        differences.append("accuracy matrix")
    state = runner.learner.model.state_dict()
    if state.keys() != weights.keys():
        return differences + ["parameter names"]
    return differences + [name for name, value in state.items() if not torch.equal(value, weights[name])]


@pytest.mark.parametrize("strategy, options", [("finetune", {}), ("er", {"buffer_size": 16}),
                                               ("ewc", {"strength": 10.0}), ("lwf", {})])
def test_a_run_killed_mid_experience_resumes_to_the_same_accuracy_matrix(tmp_path, monkeypatch, strategy, options):
    reference = make_runner(tmp_path / "a", strategy=strategy, **options)
    reference.run()
    # 12 steps per experience: step 18 is in the middle of the second one
    resumed = crash_then_resume(lambda: make_runner(tmp_path / "b", strategy=strategy, **options), monkeypatch, 18)
    assert not run_differences(resumed, reference.matrix.values, reference.learner.model.state_dict())


def test_resume_with_another_strategy_is_refused(tmp_path):
    make_runner(tmp_path, strategy="finetune").run()
    with pytest.raises(CheckpointError, match="strategy"):
        make_runner(tmp_path, strategy="l2").run(resume=True)


def test_a_corrupt_checkpoint_is_a_clear_error_and_is_left_alone(tmp_path):
    runner = make_runner(tmp_path)
    runner.run()
    runner.path.write_bytes(runner.path.read_bytes()[:100])
    damaged = runner.path.read_bytes()
    with pytest.raises(CheckpointError, match="corrupt"):
        make_runner(tmp_path).run(resume=True)
    assert runner.path.read_bytes() == damaged


def test_a_finished_run_is_not_overwritten_without_asking(tmp_path):
    make_runner(tmp_path).run()
    with pytest.raises(CheckpointError, match="--overwrite"):
        make_runner(tmp_path).run()


def test_a_strategy_refuses_a_setting_it_cannot_run_in():
    from continual.strategies.base import Strategy

    class TaskOnly(Strategy):
        name = "task_only"
        settings = ("task",)

    with pytest.raises(ConfigError, match="cannot run in the class-incremental setting"):
        TaskOnly().check(tiny_split("class"))


def test_each_row_of_the_matrix_goes_to_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runner = make_runner(tmp_path, "domain")
    runner.config = dataclasses.replace(runner.config, tensorboard=True)
    matrix = runner.run()
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    acc = [e.value for e in events.Scalars("accuracy/ACC")]
    first = [e.value for e in events.Scalars("accuracy/experience_0")]
    assert len(acc) == 3 and acc[-1] == pytest.approx(matrix.values[2].mean(), abs=1e-6)
    assert first == pytest.approx(list(matrix.values[:, 0]), abs=1e-6)
