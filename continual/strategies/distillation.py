"""Distillation strategies: the model before this experience teaches the one being trained.

- ``lwf``: Learning without Forgetting (Li & Hoiem, ECCV 2016 / TPAMI 2017, eq. 2): the
  old model's outputs on the NEW data are soft targets for the old outputs, through the
  cross-entropy of temperature-softened distributions (T = 2 in the paper), weighted by
  lambda_o (1 in the paper). Task-IL: every old task's head; Class-IL: the old classes'
  outputs of the grown head; Domain-IL: the shared head.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from mtl.errors import ConfigError

from .base import Strategy


def soft_cross_entropy(logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over rows of -sum_k softmax(teacher / T)_k log softmax(logits / T)_k (cross_entropy with
    probability targets computes exactly this)."""
    targets = F.softmax(teacher_logits.float() / temperature, dim=1)
    return F.cross_entropy(logits.float() / temperature, targets)


class LwF(Strategy):
    name = "lwf"
    extra_loss_names = ("distillation",)

    def __init__(self, alpha: float = 1.0, temperature: float = 2.0):
        super().__init__()
        if temperature <= 0:
            raise ConfigError(f"LwF's temperature must be > 0, got {temperature}.")
        if alpha < 0:
            raise ConfigError(f"LwF's weight alpha must be >= 0, got {alpha}.")
        self.alpha, self.temperature = alpha, temperature
        self.teacher = None  # the model as it was after the previous experience (not a submodule: not trained)
        self.old_heads: list[str] = []
        self.old_classes = 0

    def loss_weights(self):
        return {"distillation": self.alpha}

    def before_experience(self, learner, experience) -> None:
        if experience.index == 0:
            return
        teacher = copy.deepcopy(getattr(learner.model, "module", learner.model)).eval()
        self.teacher = [teacher.requires_grad_(False)]  # in a list: no submodule, not saved, not trained
        self.old_heads = [h for h in teacher.task_names if learner.setting != "task"
                          or h != f"task{experience.task_id}"]
        # Class-IL: prepare() appended this experience's classes after the old ones
        self.old_classes = len([c for c in learner.seen_classes if c not in experience.classes])

    def extra_losses(self, learner, model, batch, z, logits):
        if self.teacher is None or not self.old_heads:
            return {"distillation": z.new_zeros(())}
        x = batch[0]
        teacher = self.teacher[0]
        net = getattr(model, "module", model)
        with torch.no_grad():
            old_z = teacher.encode(x)
            old = {h: teacher.heads[h](old_z) for h in self.old_heads}
        shared = learner.stream.head_name(0) if learner.setting != "task" else None  # the head ``logits`` came from
        losses = []
        for head in self.old_heads:
            new, target = (logits if head == shared else net.heads[head](z)), old[head]
            if learner.setting == "class":
                new, target = new[:, : self.old_classes], target[:, : self.old_classes]
            losses.append(soft_cross_entropy(new, target, self.temperature))
        return {"distillation": losses[0] if len(losses) == 1 else torch.stack(losses).sum()}
