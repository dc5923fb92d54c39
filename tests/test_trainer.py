"""The Trainer: learning, history, logging, non-finite losses, checkpoints and bad input."""

from __future__ import annotations

import json
import math
import pickle

import pytest
import torch

from mtl import checkpoint as ckpt
from mtl.config import TrainerConfig
from mtl.errors import CheckpointError, ConfigError, DataError, NonFiniteLossError
from mtl.trainer import Trainer

from conftest import TwoTaskDigits, make_trainer


def test_training_learns_both_tasks_and_keeps_a_history(tmp_path):
    t = make_trainer(tmp_path, train=TwoTaskDigits(320, seed=1), test=TwoTaskDigits(100, seed=2), epochs=4,
                     tensorboard=True, log_every=5)
    history = t.fit()
    last = history["epochs"][-1]
    # 10 classes: chance is 10%; the labels are written into the image, so both tasks must be learned.
    assert last["eval"]["a"]["accuracy"] >= 0.6 and last["eval"]["b"]["accuracy"] >= 0.6
    first = history["epochs"][0]["train_loss"]
    assert last["train_loss"]["a"] < first["a"] and last["train_loss"]["b"] < first["b"]
    assert [e["epoch"] for e in history["epochs"]] == [1, 2, 3, 4]
    assert last["step"] == 4 * 20 and [s["step"] for s in history["steps"]] == list(range(5, 81, 5))
    assert all(e["weights"] == {"a": 1.0, "b": 1.0} for e in history["epochs"])
    on_disk = json.loads((tmp_path / "history.json").read_text())
    assert on_disk["epochs"][-1]["eval"] == last["eval"]
    assert json.loads((tmp_path / "config.json").read_text())["trainer"]["epochs"] == 4
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 200


def test_tensorboard_events_hold_the_logged_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    make_trainer(tmp_path, epochs=2, tensorboard=True, log_every=2).fit()
    acc = EventAccumulator(str(next((tmp_path / "tensorboard").iterdir()).parent))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss/a", "weight/b", "train_loss/a", "eval/b/accuracy"} <= tags
    assert [e.step for e in acc.Scalars("eval/a/accuracy")] == [6, 12]


def test_uncertainty_weights_are_learned_and_recorded(tmp_path):
    t = make_trainer(tmp_path, weighting="uncertainty", epochs=2, log_every=1)
    history = t.fit()
    log_vars = t.weighting.log_vars.detach()
    assert not torch.allclose(log_vars, torch.zeros(2)), "log-variances must be optimised with the model"
    last_weights = history["steps"][-1]["weights"]
    assert last_weights["a"] == pytest.approx(math.exp(-float(log_vars[0])), rel=0.05)
    saved = ckpt.load_checkpoint(tmp_path)
    assert torch.equal(saved["weighting"]["log_vars"], log_vars)


def test_step_schedule_and_gradient_clipping(tmp_path):
    t = make_trainer(tmp_path, epochs=3, scheduler="step", step_size=1, gamma=0.5, grad_clip=1e-3, lr=0.1)
    history = t.fit()
    assert [e["lr"] for e in history["epochs"]] == pytest.approx([0.1, 0.05, 0.025])


def test_grad_clip_bounds_the_update(tmp_path):
    t = make_trainer(tmp_path, epochs=1, optimizer="sgd", momentum=0.0, lr=1.0, grad_clip=1e-3,
                     train=TwoTaskDigits(16, seed=1), batch_size=16)
    before = torch.cat([p.detach().flatten().clone() for p in t.optimizer.param_groups[0]["params"]])
    t.fit()
    after = torch.cat([p.detach().flatten() for p in t.optimizer.param_groups[0]["params"]])
    assert float((after - before).norm()) == pytest.approx(1e-3, rel=1e-3)  # one SGD step of lr * clipped grad


def test_bf16_mixed_precision_trains_on_cpu(tmp_path):
    history = make_trainer(tmp_path, epochs=2, mixed_precision="bf16").fit()
    assert all(math.isfinite(v) for v in history["epochs"][-1]["train_loss"].values())


def test_fp16_without_a_gpu_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="fp16 .* needs a CUDA GPU"):
        make_trainer(tmp_path, mixed_precision="fp16", cpu=True)


# ----- non-finite losses ----------------------------------------------------------------------
class NaNAt(Trainer):
    nan_steps: set = set()

    def compute_losses(self, batch):
        losses, rep = super().compute_losses(batch)
        if self.progress.step + 1 in self.nan_steps:
            losses["b"] = losses["b"] * float("nan")
        return losses, rep


def test_nonfinite_loss_stops_naming_task_and_step_and_keeps_last_checkpoint(tmp_path):
    NaNAt.nan_steps = {9}
    t = make_trainer(tmp_path, trainer_cls=NaNAt, checkpoint_every=4)
    with pytest.raises(NonFiniteLossError, match=r"task 'b' is nan at step 9") as err:
        t.fit()
    assert "last.pt" in str(err.value)
    saved = ckpt.load_checkpoint(tmp_path)
    assert saved["progress"]["step"] == 8
    assert all(torch.isfinite(v).all() for v in saved["model"].values())


def test_nonfinite_loss_can_be_skipped_and_counted(tmp_path):
    NaNAt.nan_steps = {2, 7, 8}
    t = make_trainer(tmp_path, trainer_cls=NaNAt, on_nonfinite="skip", log_every=1)
    history = t.fit()
    assert history["skipped_steps"] == 3
    assert [s["step"] for s in history["steps"]] == [s for s in range(1, 19) if s not in {2, 7, 8}]
    assert all(torch.isfinite(p).all() for p in t.model.parameters())


# ----- bad input --------------------------------------------------------------------------------
def test_label_outside_head_range_is_a_clear_error(tmp_path):
    bad = TwoTaskDigits(32, seed=1, label_a=torch.full((32,), 12))
    with pytest.raises(DataError, match=r"task 'a' got label 12, outside its head's range 0..9"):
        make_trainer(tmp_path, train=bad).fit()


def test_empty_dataset_and_oversized_batch_are_refused_before_writing(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(DataError, match="training set is empty"):
        make_trainer(out, train=TwoTaskDigits(0))
    with pytest.raises(DataError, match=r"batch size 64 is larger than the training set \(20 samples\)"):
        make_trainer(out, train=TwoTaskDigits(20), batch_size=64)
    with pytest.raises(DataError, match="evaluation set is empty"):
        make_trainer(out, test=TwoTaskDigits(0))
    assert not out.exists()


def test_unwritable_output_folder(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match="not writable"):
        make_trainer(blocker / "run")


@pytest.mark.parametrize("options, message", [
    (dict(optimizer="lbfgs"), "unknown optimizer 'lbfgs'"),
    (dict(mixed_precision="fp8"), "unknown mixed_precision"),
    (dict(lr=-1.0), "learning rate must be a positive"),
    (dict(epochs=0), "epochs must be a positive integer"),
    (dict(on_nonfinite="ignore"), "unknown on_nonfinite"),
])
def test_bad_trainer_options(options, message):
    with pytest.raises(ConfigError, match=message):
        TrainerConfig(**options)


def test_existing_run_is_not_overwritten_by_accident(tmp_path):
    make_trainer(tmp_path, epochs=1).fit()
    before = (tmp_path / "checkpoints" / "last.pt").read_bytes()
    with pytest.raises(ConfigError, match="already holds a run.*--resume.*--overwrite"):
        make_trainer(tmp_path, epochs=1).fit()
    assert (tmp_path / "checkpoints" / "last.pt").read_bytes() == before


def test_resume_from_empty_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        make_trainer(tmp_path / "new", epochs=1).fit(resume=tmp_path / "new")


@pytest.mark.parametrize("damage", ["garbage", "truncated", "pickle_code"])
def test_resume_from_corrupt_or_unsafe_checkpoint(tmp_path, damage):
    make_trainer(tmp_path, epochs=1).fit()
    path = tmp_path / "checkpoints" / "last.pt"
    if damage == "garbage":
        path.write_bytes(b"\x00\x01 definitely not a checkpoint")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:5000])
    else:  # a pickle that would run code when loaded unsafely
        torch.save({"format": ckpt.FORMAT, "payload": Exploit(tmp_path / "pwned")}, path)
    damaged = path.read_bytes()
    with pytest.raises(CheckpointError, match="corrupt or not a safe checkpoint"):
        make_trainer(tmp_path, epochs=1).fit(resume=tmp_path)
    assert path.read_bytes() == damaged, "a failed resume must not touch the file"
    assert not (tmp_path / "pwned").exists()


class Exploit:
    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_resume_with_a_different_model_or_config_is_refused(tmp_path):
    make_trainer(tmp_path, epochs=1).fit()
    before = (tmp_path / "checkpoints" / "last.pt").read_bytes()
    with pytest.raises(CheckpointError, match=r"different model or configuration: .*heads.a.net.0.weight"):
        make_trainer(tmp_path, epochs=1, hidden=20).fit(resume=tmp_path)
    with pytest.raises(CheckpointError, match=r"config.lr: checkpoint has 0.003, this run has 0.01"):
        make_trainer(tmp_path, epochs=1, lr=0.01).fit(resume=tmp_path)
    with pytest.raises(CheckpointError, match=r"weighting.type: checkpoint has 'EqualWeighting'"):
        make_trainer(tmp_path, epochs=1, weighting="uncertainty").fit(resume=tmp_path)
    assert (tmp_path / "checkpoints" / "last.pt").read_bytes() == before


def test_checkpoint_loads_with_weights_only(tmp_path):
    make_trainer(tmp_path, epochs=1).fit()
    data = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert data["progress"] == {"epoch": 1, "batch": 0, "step": 6}
    assert pickle.loads(pickle.dumps(data["history"])) == data["history"]


def test_datasets_with_set_epoch_are_told_the_epoch(tmp_path):
    class Recording(TwoTaskDigits):
        def set_epoch(self, epoch):
            self.seen = getattr(self, "seen", []) + [epoch]

    data = Recording(32, seed=1)
    make_trainer(tmp_path, train=data, epochs=3).fit()
    changes = [e for i, e in enumerate(data.seen) if i == 0 or data.seen[i - 1] != e]
    assert changes == [0, 1, 2]


def test_epoch_hooks_add_their_results_to_every_epoch_record(tmp_path):
    trainer = make_trainer(tmp_path, epochs=2)
    trainer.add_epoch_hook("validation", lambda t: {"epoch_seen": t.progress.epoch + 1})
    history = trainer.fit()
    assert [r["validation"] for r in history["epochs"]] == [{"epoch_seen": 1}, {"epoch_seen": 2}]
    with pytest.raises(ConfigError, match="'eval' is a field of the epoch record"):
        trainer.add_epoch_hook("eval", lambda t: {})


def test_without_epoch_checkpoints_the_run_writes_its_history_but_no_checkpoint(tmp_path):
    trainer = make_trainer(tmp_path / "run", epochs=2, checkpoint_epochs=False)
    history = trainer.fit()
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()
    assert json.loads((tmp_path / "run" / "history.json").read_text())["epochs"] == history["epochs"]
    with_checkpoints = make_trainer(tmp_path / "other", epochs=2)
    assert with_checkpoints.fit()["epochs"][-1]["eval"] == history["epochs"][-1]["eval"]  # same training
