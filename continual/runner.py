"""The stream runner: one experience after another through the Trainer, resumable.

For every experience: the learner adds the experience's head or classes, the strategy
prepares (``before_experience``), a ``Trainer`` trains on the strategy's data with the
strategy's losses and weighting, the strategy stores what it needs
(``after_experience``), and every experience of the stream is evaluated: row ``i`` of
the accuracy matrix. Then the WHOLE run state is written atomically to
``run_dir/checkpoints/stream.pt``: model (every head), strategy state (Fisher,
importances, buffer contents), the experiences the model has heads for, the accuracy matrix, wall
times and the RNG states.

A run killed at any point and started again with ``resume=True`` reloads that file and
re-trains the interrupted experience from its start: everything a step depends on (the
model, the strategy's state, the RNGs, the Trainer's seed for that experience) is what
the uninterrupted run had there, so on the CPU the accuracy matrix comes out the same.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from pathlib import Path
from typing import Callable


from mtl import checkpoint as ckpt
from mtl.config import RESUMABLE_CHANGES, TrainerConfig
from mtl.errors import CheckpointError
from mtl.io import ensure_writable_dir, write_json
from mtl.trainer import Trainer

from .learner import ContinualLearner
from .metrics import AccuracyMatrix, summarize
from .strategies.base import ContinualObjective, Strategy

log = logging.getLogger(__name__)

STREAM_CHECKPOINT = "stream.pt"


class StreamRunner:
    def __init__(self, learner: ContinualLearner, strategy: Strategy, config: TrainerConfig, run_dir,
                 run_config: dict | None = None, overwrite: bool = False, report: Callable[[str], None] = log.info):
        """``report``: receives one progress line per experience (the logger by default; scripts print it)."""
        strategy.check(learner.stream)
        strategy.configure(learner)
        self.learner, self.strategy, self.config = learner, strategy, config
        self.run_dir = Path(run_dir)
        self.run_config = dict(run_config or {})
        self.path = self.run_dir / ckpt.CHECKPOINT_DIR / STREAM_CHECKPOINT
        self.overwrite, self.report = overwrite, report
        stream = learner.stream
        self.matrix = AccuracyMatrix(len(stream))
        # Class-IL runs also measure the same model with the task id given (Task-IL accuracy)
        self.task_matrix = AccuracyMatrix(len(stream)) if stream.setting == "class" else None
        self.wall_times: list[float] = []
        self.baseline_measured = False

    # ----- the run -------------------------------------------------------------------------
    def run(self, resume: bool = False) -> AccuracyMatrix:
        stream = self.learner.stream
        if resume:
            start = self.load()
        else:
            if self.path.exists() and not self.overwrite:
                raise CheckpointError(f"'{self.run_dir}' already holds a continual run; pass resume=True (--resume) "
                                      "to continue it or overwrite=True (--overwrite) to start over.")
            ensure_writable_dir(self.run_dir)
            write_json(self.run_dir / "config.json", {"trainer": self.config.to_dict(), "run": self.run_config})
            if stream.setting == "domain":
                self.measure_baseline()
            start = 0
        for i in range(start, len(stream)):
            self.train_experience(stream[i])
            self.save(done=i + 1)
        return self.matrix

    def measure_baseline(self) -> None:
        """Accuracy of the untrained model on every experience: FWT's reference.

        Only in Domain-IL is an experience measurable before it is trained (R[j-1][j]): Task-IL
        has no head for it yet and Class-IL no outputs for its classes, so FWT is left out there.
        """
        untrained = copy.deepcopy(self.learner)
        for experience in untrained.stream:
            untrained.prepare(experience)
        for experience in untrained.stream:
            self.matrix.record_baseline(experience.index, untrained.accuracy(untrained.model, experience))

    def train_experience(self, experience) -> None:
        learner, strategy = self.learner, self.strategy
        started = time.perf_counter()
        learner.prepare(experience)
        strategy.before_experience(learner, experience)
        objective = ContinualObjective(strategy, learner)
        # no checkpoints inside an experience: an interrupted one is trained again from its start
        config = dataclasses.replace(self.config, seed=self.config.seed + experience.index, checkpoint_epochs=False)
        trainer = Trainer(learner.model, [], strategy.weighting(learner, objective.loss_names),
                          strategy.train_data(learner, experience), None, config,
                          self.run_dir / "experiences" / str(experience.index),
                          run_config={**self.run_config, "experience": experience.index}, overwrite=True,
                          objective=objective)
        trainer.fit()
        learner.model = trainer.accelerator.unwrap_model(trainer.model)
        strategy.after_experience(learner, experience)
        self.wall_times.append(time.perf_counter() - started)
        row = self.measure(self.matrix, experience.index)
        if self.task_matrix is not None:
            self.measure(self.task_matrix, experience.index, task_aware=True)
        self.log_row(experience.index, row)
        seen = ", ".join(f"{100 * a:.1f}" for a in row[: experience.index + 1])
        self.report(f"experience {experience.index + 1}/{len(learner.stream)} ({strategy.name}): accuracy on seen "
                    f"experiences [{seen}] %, {self.wall_times[-1]:.1f} s")

    def log_row(self, after: int, row: list[float]) -> None:
        """Row ``after`` of the accuracy matrix and the running ACC to TensorBoard (``run_dir/tensorboard``)."""
        if not self.config.tensorboard:
            return
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(str(self.run_dir / "tensorboard")) as writer:
            for j, accuracy in enumerate(row):
                if accuracy == accuracy:  # not NaN
                    writer.add_scalar(f"accuracy/experience_{j}", accuracy, global_step=after)
            writer.add_scalar("accuracy/ACC", summarize(self.matrix)["acc"], global_step=after)

    def measure(self, matrix: AccuracyMatrix, after: int, task_aware: bool = False) -> list[float]:
        """Row ``after`` of ``matrix``: the accuracy on every experience (NaN where not measurable)."""
        learner = self.learner

        def scores(model, x, task_ids):
            return self.strategy.scores(learner, model, x, task_ids)

        row = [learner.accuracy(learner.model, e, task_aware=task_aware, scores=scores) for e in learner.stream]
        for j, accuracy in enumerate(row):
            if accuracy == accuracy:  # not NaN
                matrix.record(after, j, accuracy)
        return row

    # ----- whole-run checkpoints --------------------------------------------------------------
    def fingerprint(self) -> dict:
        stream = self.learner.stream
        cfg = {k: v for k, v in self.config.to_dict().items() if k not in RESUMABLE_CHANGES}
        return {"stream": {"name": stream.name, "setting": stream.setting, "experiences": len(stream)},
                "strategy": {"name": self.strategy.name}, "config": cfg, "run": self.run_config}

    def save(self, done: int) -> None:
        ckpt.save_checkpoint(self.path, {
            "fingerprint": self.fingerprint(),
            "done": done,
            "model": self.learner.model.state_dict(),
            "prepared": self.learner.prepared,
            "strategy": self.strategy.state_dict(),
            "matrix": self.matrix.to_dict(),
            "task_matrix": self.task_matrix.to_dict() if self.task_matrix is not None else None,
            "wall_times": list(self.wall_times),
            "rng": ckpt.capture_rng(),
        })
        write_json(self.run_dir / "accuracy_matrix.json", self.results(done))

    def results(self, done: int | None = None) -> dict:
        """The run's figures: accuracy matrices, ACC / BWT / FWT / forgetting, wall times."""
        done = self.matrix.completed if done is None else done
        out = {"done": done, "matrix": self.matrix.to_dict(), "wall_times": list(self.wall_times),
               "metrics": summarize(self.matrix) if done else None}
        if self.task_matrix is not None:
            out["task_matrix"] = self.task_matrix.to_dict()
            out["task_metrics"] = summarize(self.task_matrix) if done else None
        return out

    def load(self) -> int:
        """Restore the state after the last finished experience; returns the next experience's index."""
        if not self.path.exists():
            raise CheckpointError(f"no continual run to resume in '{self.run_dir}' (expected {self.path}); "
                                  "start a new run without --resume.")
        data = ckpt.load_checkpoint(self.path)
        ckpt.compare_fingerprints(data["fingerprint"], self.fingerprint(), self.path)
        try:
            done = int(data["done"])
            for experience in list(self.learner.stream)[:done]:
                self.learner.prepare(experience)  # the heads and classes the saved model has
            if self.learner.prepared != int(data["prepared"]):
                raise ValueError(f"the model has the heads of {self.learner.prepared + 1} experiences, the "
                                 f"checkpoint {int(data['prepared']) + 1}")
            self.learner.model.load_state_dict(data["model"])
            self.strategy.load_state_dict(data["strategy"])
            self.matrix = AccuracyMatrix.from_dict(data["matrix"])
            if self.task_matrix is not None:
                self.task_matrix = AccuracyMatrix.from_dict(data["task_matrix"])
            self.wall_times = list(data["wall_times"])
            ckpt.restore_rng(data["rng"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"continual checkpoint '{self.path}' is incomplete or damaged ({e}); "
                                  "start a new run.") from None
        if done >= len(self.learner.stream):
            log.info("the run in %s is complete", self.run_dir)
        return done

