"""A run killed at any point and resumed ends exactly like an uninterrupted run."""

from __future__ import annotations

import pytest
import torch

from mtl import checkpoint as ckpt
from mtl.trainer import Trainer

from conftest import make_trainer


class Killed(Exception):
    """Stands in for the process dying (SIGKILL, power loss) at a chosen point."""


def killing_trainer(kill_at_step=None, kill_in_eval_of_epoch=None):
    class KillingTrainer(Trainer):
        def train_step(self, batch):
            if kill_at_step is not None and self.progress.step + 1 == kill_at_step:
                raise Killed
            return super().train_step(batch)

        def evaluate(self, loader=None):
            if kill_in_eval_of_epoch is not None and self.progress.epoch + 1 == kill_in_eval_of_epoch:
                raise Killed
            return super().evaluate(loader)

    return KillingTrainer


def final_state(trainer):
    model = trainer.accelerator.unwrap_model(trainer.model)
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {k: v.clone() for k, v in trainer.weighting.state_dict().items() if torch.is_tensor(v)})


def assert_same_run(h1, s1, h2, s2):
    for k in s1[0]:
        assert torch.equal(s1[0][k], s2[0][k]), f"model tensor {k} differs after resume"
    for k in s1[1]:
        assert torch.equal(s1[1][k], s2[1][k]), f"weighting tensor {k} differs after resume"
    assert [e["eval"] for e in h1["epochs"]] == [e["eval"] for e in h2["epochs"]]
    assert [e["train_loss"] for e in h1["epochs"]] == [e["train_loss"] for e in h2["epochs"]]
    assert h1["steps"] == h2["steps"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run: 3 epochs x 6 steps, uncertainty weighting (learned weights must resume too)."""
    run = tmp_path_factory.mktemp("reference")
    t = make_trainer(run, weighting="uncertainty", checkpoint_every=4, log_every=1)
    history = t.fit()
    return history, final_state(t)


@pytest.mark.parametrize("kill", [
    {"kill_at_step": 3},   # before the first checkpoint: the run restarts from scratch
    {"kill_at_step": 6},   # mid-epoch, two steps after a checkpoint
    {"kill_at_step": 9},   # one step after a step checkpoint in epoch 2
    {"kill_at_step": 13},  # first step of the last epoch
    {"kill_in_eval_of_epoch": 2},  # after the last batch of an epoch, during evaluation
])
def test_killed_and_resumed_run_matches_uninterrupted_run(tmp_path, reference, kill):
    ref_history, ref_state = reference
    first = make_trainer(tmp_path, weighting="uncertainty", checkpoint_every=4, log_every=1,
                         trainer_cls=killing_trainer(**kill))
    with pytest.raises(Killed):
        first.fit()
    has_checkpoint = ckpt.checkpoint_path(tmp_path).exists()
    torch.manual_seed(12345)  # the crashed process's RNG must not matter
    second = make_trainer(tmp_path, weighting="uncertainty", checkpoint_every=4, log_every=1,
                          overwrite=not has_checkpoint)
    history = second.fit(resume=tmp_path if has_checkpoint else None)
    assert_same_run(ref_history, ref_state, history, final_state(second))


def test_resume_twice_across_a_crash_during_checkpoint_write(tmp_path, reference, monkeypatch):
    """A crash inside torch.save leaves the previous checkpoint loadable; resuming from it still matches."""
    ref_history, ref_state = reference
    first = make_trainer(tmp_path, weighting="uncertainty", checkpoint_every=4, log_every=1)
    real_save = torch.save
    calls = {"n": 0}

    def dying_save(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # the third checkpoint write dies half-way through
            f.write(b"PK\x03\x04 half a zip file")
            raise Killed
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(ckpt.torch, "save", dying_save)
    with pytest.raises(Killed):
        first.fit()
    monkeypatch.setattr(ckpt.torch, "save", real_save)
    leftovers = [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name != "last.pt"]
    assert leftovers == [], f"temporary files left behind: {leftovers}"
    saved = ckpt.load_checkpoint(tmp_path)
    assert saved["progress"]["step"] == 6  # the second write: end of epoch 1
    second = make_trainer(tmp_path, weighting="uncertainty", checkpoint_every=4, log_every=1)
    history = second.fit(resume=tmp_path)
    assert_same_run(ref_history, ref_state, history, final_state(second))


def test_resuming_a_finished_run_changes_nothing(tmp_path, reference):
    ref_history, ref_state = reference
    make_trainer(tmp_path, weighting="uncertainty", checkpoint_every=4, log_every=1).fit()
    again = make_trainer(tmp_path, weighting="uncertainty", checkpoint_every=4, log_every=1)
    history = again.fit(resume=tmp_path)
    assert_same_run(ref_history, ref_state, history, final_state(again))
    assert len(history["epochs"]) == 3


def test_gradnorm_run_resumes_with_its_weights_and_optimizer(tmp_path):
    """GradNorm's weights, initial losses and its own Adam state live in the checkpoint."""
    reference_dir, crash_dir = tmp_path / "ref", tmp_path / "crash"
    ref = make_trainer(reference_dir, weighting="gradnorm", checkpoint_every=4, log_every=1)
    ref_history = ref.fit()
    first = make_trainer(crash_dir, weighting="gradnorm", checkpoint_every=4, log_every=1,
                         trainer_cls=killing_trainer(kill_at_step=11))
    with pytest.raises(Killed):
        first.fit()
    second = make_trainer(crash_dir, weighting="gradnorm", checkpoint_every=4, log_every=1)
    history = second.fit(resume=crash_dir)
    assert_same_run(ref_history, final_state(ref), history, final_state(second))
    weights = [s["weights"] for s in history["steps"]]
    assert weights[0] == {"a": 1.0, "b": 1.0} and weights[-1] != weights[0]
