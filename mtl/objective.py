"""What a training step minimises: named losses computed from one batch.

The Trainer asks its ``Objective`` for ``{loss name: scalar loss}`` (and the shared
representation, for weightings that differentiate with respect to it), and its
``Weighting`` turns those losses into a gradient. Multi-task learning uses
``TaskLosses`` (one loss per task head); domain adaptation, distillation and
continual strategies bring their own objectives: an ``nn.Module`` whose parameters
(a discriminator, a decoder) train with the model and are saved in its checkpoints.
"""

from __future__ import annotations

import torch
from torch import nn

from .tasks import Task


class Objective(nn.Module):
    #: the names of the losses ``losses`` returns; the weighting is built for them
    loss_names: list[str]
    #: True for objectives that update their own parameters with optimizers of their own
    #: (ADDA's discriminator): the Trainer then leaves those parameters out of its optimizer.
    own_optimizer: bool = False
    #: True for objectives that take the whole training step (alternating updates):
    #: the Trainer then calls ``train_step(trainer, batch)`` instead of its own step.
    custom_step: bool = False

    def losses(self, model: nn.Module, batch) -> tuple[dict[str, torch.Tensor], object]:
        """``({name: loss}, representation or None)`` for one training batch."""
        raise NotImplementedError

    def set_progress(self, progress: float) -> None:
        """Called before every step with the fraction of the run done, in [0, 1] (for schedules)."""

    def after_step(self, model: nn.Module) -> None:
        """Called after every optimizer step, gradients still in ``.grad`` (path integrals, online estimates)."""

    def lr_factor(self, progress: float) -> float | None:
        """A factor on every learning rate at this point of the run, or None to leave them alone."""
        return None

    def train_step(self, trainer, batch) -> tuple[dict[str, float], dict[str, float]] | None:
        """With ``custom_step``: one whole update; returns ``(losses, weights)`` as floats for the history.

        Use ``trainer.accelerator.backward``, ``trainer.optimizer`` (the model's parameters) and
        ``trainer.all_mean_grads(params)`` for parameters DDP does not average (the objective's).
        """
        raise NotImplementedError(f"{type(self).__name__} sets custom_step but has no train_step")


class TaskLosses(Objective):
    """Multi-task learning: batches are ``(inputs, targets)``; each task's loss on its own head."""

    def __init__(self, tasks: list[Task]):
        super().__init__()
        self.tasks = list(tasks)
        self.loss_names = [t.name for t in self.tasks]

    def losses(self, model, batch):
        inputs, targets = batch
        outputs, rep = model(inputs, return_rep=True)
        return {t.name: t.loss(outputs[t.name], t.target(targets)) for t in self.tasks}, rep
