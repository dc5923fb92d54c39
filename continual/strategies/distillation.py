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
from torch.utils.data import Dataset

from mtl.batches import Gathered
from mtl.errors import ConfigError

from .base import Strategy


def soft_targets(teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(teacher / T), row by row, in float32."""
    return F.softmax(teacher_logits.float() / temperature, dim=1)


def cross_entropy_to(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over rows of -sum_k targets_k log softmax(logits / T)_k (cross_entropy with probability targets)."""
    return F.cross_entropy(logits.float() / temperature, targets)


def soft_cross_entropy(logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over rows of -sum_k softmax(teacher / T)_k log softmax(logits / T)_k."""
    return cross_entropy_to(logits, soft_targets(teacher_logits, temperature), temperature)


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

    def train_data(self, learner, experience):
        """The experience's data with the old model's soft targets recorded once per sample, before training: LwF's
        Algorithm 1 ("Y_o <- CNN(X_n, theta_s, theta_o)"). The old model is fixed and the stream's images are
        not augmented, so recording gives what a teacher pass on every batch would, at a fifth of the cost
        over five epochs."""
        data = super().train_data(learner, experience)
        if self.teacher is None or not self.old_heads:
            return data
        return WithRecorded(data, self.record(learner, data))

    @torch.no_grad()
    def record(self, learner, data, batch_size: int = 256) -> torch.Tensor:
        """``(N, outputs)``: the teacher's softened outputs softmax(y_o / T) on every sample of ``data`` (the soft
        targets), the old heads side by side."""
        teacher = self.teacher[0]
        device = next(teacher.parameters()).device
        rows = []
        for x, _, task_ids in data.batches(batch_size):
            z = learner.encode(teacher, x.to(device), task_ids.to(device))
            rows.append(torch.cat([soft_targets(self.old_part(learner, teacher.heads[h](z)), self.temperature)
                                   for h in self.old_heads], dim=1))
        return torch.cat(rows)

    def old_part(self, learner, outputs: torch.Tensor) -> torch.Tensor:
        """The outputs the old model was trained on: the old classes' in Class-IL, all of a head's otherwise."""
        return outputs[:, : self.old_classes] if learner.setting == "class" else outputs

    def extra_losses(self, learner, model, batch, z, logits):
        if self.teacher is None or not self.old_heads:
            return {"distillation": z.new_zeros(())}
        net = getattr(model, "module", model)
        shared = learner.stream.head_name(0) if learner.setting != "task" else None  # the head ``logits`` came from
        recorded = batch[3].split(batch[3].shape[1] // len(self.old_heads), dim=1)
        losses = [cross_entropy_to(self.old_part(learner, logits if head == shared else net.heads[head](z)), targets,
                                   self.temperature)
                  for head, targets in zip(self.old_heads, recorded)]
        return {"distillation": losses[0] if len(losses) == 1 else torch.stack(losses).sum()}


class WithRecorded(Dataset):
    """``(image, target, task id, recorded row)``: training data with one recorded tensor row per sample."""

    def __init__(self, data, recorded: torch.Tensor):
        if len(recorded) != len(data):
            raise ValueError(f"{len(recorded)} recorded rows for {len(data)} samples")
        self.data, self.recorded = data, recorded

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i):
        return (*self.data[i], self.recorded[i])

    def __getitems__(self, indices) -> Gathered:
        index = torch.as_tensor(indices, dtype=torch.long)
        return Gathered(*self.data.batch(index), self.recorded.index_select(0, index.to(self.recorded.device)))
