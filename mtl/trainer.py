"""The one training loop, on ``accelerate.Accelerator``.

A ``Trainer`` owns the accelerator, optimizer, schedule, data loaders, history and
checkpoints. What a step computes comes from its ``Objective`` (named losses, plus
the shared representation when the weighting asks for it; by default one loss per
task, ``TaskLosses``); how those losses become a gradient comes from the
``Weighting``. The ``tasks`` are what evaluation measures. Subclasses override
``train_step`` for methods that alternate optimizers instead of writing another loop.

Exact resume: the data order depends only on (seed, epoch), and a checkpoint holds
the model, weighting, optimizer, schedule, RNG states, loss accumulators of the
current epoch and the history, so a run killed at any point and resumed from its
last checkpoint recomputes exactly what the uninterrupted run computed.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from .batches import InProcessLoader, collate
from .config import RESUMABLE_CHANGES, TrainerConfig
from .errors import CheckpointError, ConfigError, DataError, NonFiniteLossError
from .io import ensure_writable_dir, write_json
from .model import MultiTaskModel
from .objective import Objective, TaskLosses
from .optim import build_optimizer, build_scheduler, clear_grads, direct_step
from .sampling import EpochShuffleSampler
from .tasks import Task
from .weighting import Weighting

log = logging.getLogger(__name__)


@dataclass
class Progress:
    epoch: int = 0  # the epoch being trained (0-based)
    batch: int = 0  # batches of that epoch already done
    step: int = 0  # optimizer steps done over the whole run (skipped ones included)


class Trainer:
    def __init__(self, model: MultiTaskModel, tasks: list[Task], weighting: Weighting,
                 train_data: Dataset, eval_data: Dataset | None, config: TrainerConfig, run_dir,
                 run_config: dict | None = None, overwrite: bool = False, objective: Objective | None = None):
        config.validate()
        if config.mixed_precision == "fp16" and (config.cpu or not torch.cuda.is_available()):
            raise ConfigError("fp16 mixed precision needs a CUDA GPU; on the CPU use mixed_precision='bf16' or 'no'.")
        self.config, self.tasks, self.run_config = config, list(tasks), dict(run_config or {})
        self.objective = objective if objective is not None else TaskLosses(self.tasks)
        self._check_tasks(model, weighting, own_objective=objective is not None)
        self._check_data(train_data, eval_data)
        self.run_dir = Path(run_dir)
        existing = ckpt.checkpoint_path(self.run_dir)
        if existing.exists() and not overwrite:
            self._existing_run = existing
        else:
            self._existing_run = None
        ensure_writable_dir(self.run_dir)

        from accelerate import Accelerator
        from accelerate.utils import set_seed

        _reset_accelerate_state()
        self.accelerator = Accelerator(
            cpu=config.cpu, mixed_precision=config.mixed_precision,
            log_with="tensorboard" if config.tensorboard else None, project_dir=str(self.run_dir),
        )
        if config.deterministic:
            torch.use_deterministic_algorithms(True)
        set_seed(config.seed)

        self.sampler = EpochShuffleSampler(len(train_data), seed=config.seed)
        # Each loader gets its own generator: starting an iterator draws worker seeds from it,
        # and drawing them from the global RNG instead would shift dropout masks after a resume.
        self.loader_generator = torch.Generator()
        # One process without workers: the same batches without a DataLoader's per-batch bookkeeping.
        in_process = config.num_workers == 0 and self.accelerator.distributed_type == "NO"
        if in_process:
            train_loader = InProcessLoader(train_data, self.sampler, config.batch_size, config.drop_last,
                                           self.accelerator.device)
        else:
            train_loader = DataLoader(train_data, batch_size=config.batch_size, sampler=self.sampler,
                                      drop_last=config.drop_last, num_workers=config.num_workers,
                                      generator=self.loader_generator, collate_fn=collate)
        eval_loader = None
        if eval_data is not None:
            eval_loader = DataLoader(eval_data, batch_size=config.eval_batch_size or config.batch_size,
                                     shuffle=False, num_workers=config.num_workers, collate_fn=collate,
                                     generator=torch.Generator().manual_seed(config.seed))
        self.weighting = weighting.to(self.accelerator.device)
        self.weighting.bind(self.accelerator)
        self.objective.to(self.accelerator.device)
        self.shared_params = list(model.shared_parameters())
        groups = model.parameter_groups()
        if not weighting.own_optimizer and list(weighting.parameters()):
            groups.append({"params": list(weighting.parameters()), "lr_scale": 1.0})
        if not self.objective.own_optimizer and list(self.objective.parameters()):
            groups.append({"params": list(self.objective.parameters()), "lr_scale": 1.0})
        optimizer = build_optimizer(groups, config, device=self.accelerator.device)
        if in_process:
            self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
            self.train_loader = train_loader
        else:
            self.model, self.optimizer, self.train_loader = self.accelerator.prepare(model, optimizer, train_loader)
        self.eval_loader = self.accelerator.prepare(eval_loader) if eval_loader is not None else None
        # Per-epoch schedule, deliberately not prepared: Accelerate would step it once per process.
        self.scheduler = build_scheduler(optimizer, config)
        # Accelerate's optimizer wrapper probes the file system for an optional package on every
        # step and inspects zero_grad's signature on every call; without a loss scaler (fp16) or
        # XLA it only forwards both calls, so the step calls the torch optimizer itself, through
        # direct_step (the same update without Optimizer.step's per-call bookkeeping).
        direct = getattr(self.accelerator, "scaler", None) is None and self.accelerator.distributed_type != "XLA"
        if direct:
            self._optimizer_step, self._zero_grad = direct_step(optimizer), lambda: clear_grads(optimizer)
        else:
            self._optimizer_step, self._zero_grad = self.optimizer.step, lambda: self.optimizer.zero_grad(set_to_none=True)
        self._base_lrs = [g["lr"] for g in optimizer.param_groups]
        kind = type(self.objective)  # an objective without a schedule has nothing to hear before each step
        self._scheduled = kind.set_progress is not Objective.set_progress or kind.lr_factor is not Objective.lr_factor
        if self.objective.lr_factor(0.0) is not None and self.scheduler is not None:
            raise ConfigError(f"{type(self.objective).__name__} anneals the learning rate itself; use scheduler='none' "
                              f"(got '{config.scheduler}').")

        self.progress = Progress()
        self.history: dict = {"tasks": [t.name for t in self.tasks], "losses": list(self.objective.loss_names),
                              "epochs": [], "steps": [], "skipped_steps": 0}
        self._epoch_sums = self._zero_sums()
        self.last_checkpoint: Path | None = None
        self.epoch_hooks: dict[str, Callable] = {}

    def add_epoch_hook(self, name: str, hook: Callable[["Trainer"], dict]) -> None:
        """Run ``hook(trainer)`` after every epoch's evaluation and store its result as ``record[name]``.

        For measurements beside the tasks' metrics, such as unsupervised validation scores.
        The hook must depend on the model only, so that a resumed run records the same values.
        """
        if name in ("epoch", "step", "lr", "train_loss", "weights", "eval"):
            raise ConfigError(f"'{name}' is a field of the epoch record already; name the hook differently.")
        self.epoch_hooks[name] = hook

    # ----- set-up checks -------------------------------------------------------------------
    def _check_tasks(self, model, weighting, own_objective: bool):
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ConfigError(f"task names must be unique, got {names}.")
        if not own_objective and sorted(names) != sorted(model.task_names):
            raise ConfigError(f"tasks {names} do not match the model's heads {model.task_names}; give one head per task.")
        missing = [t for t in names if t not in model.task_names]
        if missing:
            raise ConfigError(f"evaluated task(s) {missing} have no head in the model (heads: {model.task_names}).")
        losses = list(self.objective.loss_names)
        if sorted(weighting.task_names) != sorted(losses):
            what = "tasks" if not own_objective else f"{type(self.objective).__name__}'s losses"
            raise ConfigError(f"the weighting was built for {weighting.task_names}, the {what} are {losses}.")

    def _check_data(self, train_data, eval_data):
        if len(train_data) == 0:
            raise DataError("the training set is empty; check the data folder or the data set size options.")
        if self.config.batch_size > len(train_data):
            raise DataError(
                f"batch size {self.config.batch_size} is larger than the training set ({len(train_data)} samples); "
                "lower --batch-size or use more training data."
            )
        if eval_data is not None and len(eval_data) == 0:
            raise DataError("the evaluation set is empty; check the data folder or the data set size options.")

    # ----- the step ------------------------------------------------------------------------
    def compute_losses(self, batch) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """Named losses for one batch, and the shared representation when the weighting needs it."""
        losses, rep = self.objective.losses(self.model, batch)
        return losses, (rep if self.weighting.needs_rep else None)

    def train_step(self, batch) -> tuple[dict[str, float], dict[str, float]] | None:
        """One optimizer step; returns (losses, weights) as floats, or None for a skipped step."""
        if self.objective.custom_step:
            return self.objective.train_step(self, batch)
        losses, rep = self.compute_losses(batch)
        values = self._loss_values(losses)
        bad = [t for t, v in values.items() if not math.isfinite(v)]
        if bad:
            if self.config.on_nonfinite == "error":
                raise NonFiniteLossError(bad[0], self.progress.step + 1, values[bad[0]],
                                         str(self.last_checkpoint) if self.last_checkpoint else None)
            self.optimizer.zero_grad(set_to_none=True)
            self.history["skipped_steps"] += 1
            return None
        weights = self.weighting.backward(losses, shared_params=self.shared_params, rep=rep)
        self._sync_unwrapped_grads()
        if self.config.grad_clip is not None:
            self.accelerator.clip_grad_norm_(self._trainable_parameters(), self.config.grad_clip)
        self._optimizer_step()
        self.objective.after_step(self.model)
        self._zero_grad()
        return values, weights

    def _loss_values(self, losses: dict[str, torch.Tensor]) -> dict[str, float]:
        """The losses as floats, averaged over processes: every rank must agree on skipping a step.

        A loss may be a vector (GEM: one per past experience): the history keeps its sum.
        """
        if len(losses) == 1 and self.accelerator.num_processes == 1:  # one read-back, no stacking
            (name, loss), = losses.items()
            return {name: loss.detach().float().sum().item() if loss.ndim else loss.item()}
        values = torch.stack([loss.detach().float().sum() for loss in losses.values()])
        if self.accelerator.num_processes > 1:
            values = self.accelerator.reduce(values, reduction="mean")
        return dict(zip(losses, values.tolist()))

    def _trainable_parameters(self):
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def _sync_unwrapped_grads(self):
        # The weighting and the objective are not wrapped by DDP, so their parameters' gradients are averaged here.
        if self.accelerator.num_processes == 1:
            return
        params = [] if self.objective.own_optimizer else list(self.objective.parameters())
        if not self.weighting.own_optimizer:
            params += list(self.weighting.parameters())
        self.all_mean_grads(params)

    def all_mean_grads(self, params) -> None:
        """Average the gradients of parameters outside the DDP-wrapped model across processes."""
        if self.accelerator.num_processes == 1:
            return
        for p in params:
            if p.grad is not None:
                p.grad = self.accelerator.reduce(p.grad, reduction="mean")

    def _apply_schedule(self):
        """Tell the objective how far the run is, and apply its learning-rate factor."""
        total = self.config.epochs * len(self.train_loader)
        progress = min(self.progress.step / max(total - 1, 1), 1.0)
        self.objective.set_progress(progress)
        factor = self.objective.lr_factor(progress)
        if factor is not None:
            for group, base in zip(self.optimizer.param_groups, self._base_lrs):
                group["lr"] = base * factor

    # ----- the loop ------------------------------------------------------------------------
    def fit(self, resume=None) -> dict:
        """Train for ``config.epochs``; ``resume``: a run folder or checkpoint file to continue."""
        if resume is not None:
            self.load(resume)
        elif self._existing_run is not None:
            raise ConfigError(
                f"'{self.run_dir}' already holds a run ({self._existing_run}). Resume it with --resume "
                f"{self.run_dir}, choose another --out folder, or pass --overwrite to start over."
            )
        self._write_config()
        if self.config.tensorboard:
            self.accelerator.init_trackers("tensorboard")
        try:
            while self.progress.epoch < self.config.epochs:
                self._train_epoch()
                self._end_epoch()
        finally:
            # Not accelerator.end_training(): it also destroys the process group, and a
            # process may go on to train another model (baselines, comparisons).
            for tracker in self.accelerator.trackers:
                tracker.finish()
        return self.history

    def _train_epoch(self):
        cfg, acc = self.config, self.accelerator
        self.model.train()
        self.weighting.train()
        # Accelerate's loaders reset the sampler's epoch from their own counter on each pass,
        # so the epoch is set through the loader that is about to be iterated; it also passes
        # the epoch on to a data set with set_epoch (augmentation drawn from (seed, epoch, index)).
        self.sampler.set_epoch(self.progress.epoch)
        self.loader_generator.manual_seed(cfg.seed * 1_000_003 + self.progress.epoch)  # worker seeds per epoch
        if isinstance(self.train_loader, InProcessLoader):
            self.train_loader.set_epoch(self.progress.epoch)
            loader = self.train_loader.batches(skip=self.progress.batch)
        else:
            loader = self.train_loader
            if self.progress.batch:
                loader = acc.skip_first_batches(self.train_loader, self.progress.batch)
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(self.progress.epoch)
        bar = tqdm(loader, total=len(self.train_loader), initial=self.progress.batch, leave=False,
                   desc=f"epoch {self.progress.epoch + 1}/{cfg.epochs}",
                   disable=not (cfg.progress and acc.is_local_main_process))
        for batch in bar:
            if self._scheduled:
                self._apply_schedule()
            result = self.train_step(batch)
            self.progress.batch += 1
            self.progress.step += 1
            if result is not None:
                self._record_step(*result)
                if not bar.disable:
                    bar.set_postfix(loss=f"{sum(result[0].values()):.4f}", refresh=False)
            if cfg.checkpoint_every and self.progress.step % cfg.checkpoint_every == 0:
                self.save()
        bar.close()

    def _end_epoch(self):
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this epoch trained with
        if self.scheduler is not None:
            self.scheduler.step()
        sums = self._epoch_sums
        n = max(sums["count"], 1)
        record = {
            "epoch": self.progress.epoch + 1,
            "step": self.progress.step,
            "lr": lr,
            "train_loss": {t: v / n for t, v in sums["loss"].items()},
            "weights": {t: v / n for t, v in sums["weights"].items()},
        }
        if self.eval_loader is not None:
            record["eval"] = self.evaluate()
        for name, hook in self.epoch_hooks.items():
            record[name] = hook(self)
        self.history["epochs"].append(record)
        self.accelerator.log(_flatten({"train_loss": record["train_loss"], "eval": record.get("eval", {})}),
                             step=self.progress.step)
        self.progress = Progress(epoch=self.progress.epoch + 1, batch=0, step=self.progress.step)
        self._epoch_sums = self._zero_sums()
        if self.config.checkpoint_epochs:
            self.save()
        elif self.progress.epoch == self.config.epochs and self.accelerator.is_main_process:
            write_json(self.run_dir / "history.json", self.history)
        log.info("epoch %d: %s", record["epoch"], record.get("eval", record["train_loss"]))

    def _record_step(self, losses: dict[str, float], weights: dict[str, float]):
        sums = self._epoch_sums
        sums["count"] += 1
        for t in losses:
            sums["loss"][t] += losses[t]
            sums["weights"][t] += weights[t]
        if self.progress.step % self.config.log_every == 0:
            self.history["steps"].append({"step": self.progress.step, "loss": losses, "weights": weights})
            self.accelerator.log(_flatten({"loss": losses, "weight": weights}), step=self.progress.step)

    def _zero_sums(self) -> dict:
        names = list(self.objective.loss_names)
        return {"count": 0, "loss": dict.fromkeys(names, 0.0), "weights": dict.fromkeys(names, 0.0)}

    # ----- evaluation ----------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, loader=None) -> dict[str, dict[str, float]]:
        """Every task's metrics over the whole split (all processes), ``{task: {metric: value}}``."""
        loader = loader if loader is not None else self.eval_loader
        self.model.eval()
        totals: dict[tuple[str, str], torch.Tensor] = {}
        for inputs, targets in loader:
            outputs = self.model(inputs)
            for task in self.tasks:
                target = task.target(targets)
                for metric in task.metrics:
                    stats = self.accelerator.gather_for_metrics(metric.statistics(outputs[task.name].float(), target))
                    key = (task.name, metric.name)
                    totals[key] = totals.get(key, 0) + stats.sum(0).double().cpu()
        self.model.train()
        return {task.name: {m.name: m.compute(totals[(task.name, m.name)]) for m in task.metrics}
                for task in self.tasks}

    # ----- checkpoints ---------------------------------------------------------------------
    def fingerprint(self) -> dict:
        cfg = {k: v for k, v in self.config.to_dict().items() if k not in RESUMABLE_CHANGES}
        model = self.accelerator.unwrap_model(self.model)
        return {
            "config": cfg,
            "run": self.run_config,
            "model": ckpt.shapes(model),
            "weighting": {"type": type(self.weighting).__name__, "tasks": self.weighting.task_names,
                          **ckpt.shapes(self.weighting)},
            "objective": {"type": type(self.objective).__name__, **ckpt.shapes(self.objective)},
        }

    def save(self) -> Path:
        acc = self.accelerator
        rng = ckpt.capture_rng()
        if acc.num_processes > 1:
            from accelerate.utils import gather_object

            rng = gather_object([rng])
        else:
            rng = [rng]
        path = ckpt.checkpoint_path(self.run_dir)
        if acc.is_main_process:
            scaler = getattr(acc, "scaler", None)
            ckpt.save_checkpoint(path, {
                "fingerprint": self.fingerprint(),
                "model": acc.unwrap_model(self.model).state_dict(),
                "weighting": self.weighting.state_dict(),
                "objective": self.objective.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "scaler": scaler.state_dict() if scaler is not None else None,
                "rng": rng,
                "progress": vars(self.progress).copy(),
                "epoch_sums": self._epoch_sums,
                "history": self.history,
            })
            write_json(self.run_dir / "history.json", self.history)
        acc.wait_for_everyone()
        self.last_checkpoint = path
        return path

    def load(self, path) -> None:
        data = ckpt.load_checkpoint(path)
        ckpt.compare_fingerprints(data["fingerprint"], self.fingerprint(), path)
        try:
            self.accelerator.unwrap_model(self.model).load_state_dict(data["model"])
            self.weighting.load_state_dict(data["weighting"])
            self.objective.load_state_dict(data["objective"])
            self.optimizer.load_state_dict(data["optimizer"])
            if self.scheduler is not None:
                self.scheduler.load_state_dict(data["scheduler"])
            scaler = getattr(self.accelerator, "scaler", None)
            if scaler is not None and data.get("scaler"):
                scaler.load_state_dict(data["scaler"])
            rng = data["rng"]
            ckpt.restore_rng(rng[min(self.accelerator.process_index, len(rng) - 1)])
            self.progress = Progress(**data["progress"])
            self._epoch_sums = data["epoch_sums"]
            self.history = data["history"]
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"checkpoint '{path}' is incomplete or damaged ({e}); start a new run.") from None
        self.last_checkpoint = ckpt.resolve(path)
        log.info("resumed from %s at epoch %d, step %d", path, self.progress.epoch + 1, self.progress.step)

    def _write_config(self):
        if self.accelerator.is_main_process:
            write_json(self.run_dir / "config.json", {"trainer": self.config.to_dict(), "run": self.run_config})


def _flatten(tree: dict, prefix: str = "") -> dict[str, float]:
    flat = {}
    for k, v in tree.items():
        key = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, dict):
            flat.update(_flatten(v, key))
        else:
            flat[key] = v
    return flat


def _reset_accelerate_state():
    """Let one process build several Trainers with different settings (tests, baselines).

    Accelerate keeps process-wide singletons; its own test-suite resets them the same way.
    Under a multi-process launch the distributed state is kept.
    """
    from accelerate.state import AcceleratorState, PartialState

    if PartialState._shared_state and PartialState().num_processes > 1:
        AcceleratorState._reset_state(reset_partial_state=False)
    else:
        AcceleratorState._reset_state(reset_partial_state=True)
