"""The model a continual run trains, and how each setting reads its outputs.

One ``MultiTaskModel`` serves the three settings (van de Ven & Tolias, 2019); the
stream names the heads and maps labels to their outputs (``Stream.head_name``,
``Stream.head_label``):

- Task-IL: one head per task (``"task0"``, ``"task1"``, ... added with ``add_head`` when
  the task first appears); the task id picks the head, at training and at test time.
  Every head has the width of the stream's largest experience, so that the logits of a
  mixed batch (replay) form one ``(N, width)`` tensor; a head's spare outputs are never
  targets.
- Class-IL: one head, ``"classifier"``, whose outputs grow by the new classes of every
  experience (``IncrementalClassifier``); no task id at test time.
- Domain-IL: one shared head, ``"classifier"``, over the labels of one experience.

``ExperienceData`` yields ``(image, head target, task_id)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from mtl.batches import Gathered
from mtl.model import MultiTaskModel


class IncrementalClassifier(nn.Module):
    """A linear classifier whose outputs grow; old rows keep their weights when it grows."""

    def __init__(self, in_features: int, num_classes: int = 0):
        super().__init__()
        self.in_features = in_features
        self.linear = nn.Linear(in_features, max(num_classes, 1))
        self.num_classes = num_classes

    def grow(self, num_classes: int) -> None:
        if num_classes <= self.num_classes:
            return
        old = self.linear
        self.linear = nn.Linear(self.in_features, num_classes).to(old.weight.device, old.weight.dtype)
        if self.num_classes:
            with torch.no_grad():
                self.linear.weight[: self.num_classes] = old.weight[: self.num_classes]
                self.linear.bias[: self.num_classes] = old.bias[: self.num_classes]
        self.num_classes = num_classes

    def forward(self, z):
        out = self.linear(z.flatten(1))
        return out if out.shape[1] == self.num_classes else out[:, : self.num_classes]  # no class yet: (N, 0)


class ContinualLearner:
    """The model of a run and the stream's setting: heads, logits and accuracy.

    ``head_factory(in_features, num_outputs)`` builds a Task-IL / Domain-IL head (a linear
    layer by default); strategies that need another classifier (LUCIR's cosine layer)
    replace it. ``prepared`` is the last experience whose head or classes the model has.
    """

    def __init__(self, encoder: nn.Module, stream, head_factory=None):
        self.stream, self.setting = stream, stream.setting
        self.head_factory = head_factory or (lambda features, outputs: nn.Linear(features, outputs))
        self.width = max(len(exp.classes) for exp in stream)
        first = stream[0]
        if self.setting == "class":
            head = IncrementalClassifier(encoder.out_features)
        else:
            head = self.head_factory(encoder.out_features, self.width)
        self.model = MultiTaskModel(encoder, {stream.head_name(first): head})
        self.prepared = -1

    # ----- structure -----------------------------------------------------------------------
    def prepare(self, experience) -> None:
        """Add what ``experience`` needs: its task's head (Task-IL) or its new classes (Class-IL)."""
        name = self.stream.head_name(experience)
        if self.setting == "task":
            seen = {self.stream[i].task_id for i in range(self.prepared + 1)}
            add_task = getattr(self.model.encoder, "add_task", None)
            if add_task is not None and experience.task_id not in seen:
                add_task(name)  # an encoder with a part per task (PNN's columns)
            if name not in self.model.heads:
                device = next(self.model.parameters()).device
                self.model.add_head(name, self.head_factory(self.model.encoder.out_features, self.width).to(device))
        elif self.setting == "class":
            self.model.heads[name].grow(self.stream.num_outputs(experience))
        self.prepared = max(self.prepared, experience.index)

    @property
    def seen_classes(self) -> tuple[int, ...]:
        return self.stream.classes_seen(self.prepared) if self.prepared >= 0 else ()

    # ----- targets and outputs -------------------------------------------------------------
    def head_names(self, task_ids: torch.Tensor) -> list[tuple[str, torch.Tensor | None]]:
        """``[(head, mask of the batch rows it reads)]`` for a batch with these task ids; the mask is None
        where one head reads every row."""
        if self.setting != "task":
            return [(self.stream.head_name(0), None)]
        tasks = torch.unique(task_ids).tolist()
        if len(tasks) == 1:
            return [(f"task{tasks[0]}", None)]
        return [(f"task{t}", task_ids == t) for t in tasks]

    def encode(self, model, x: torch.Tensor, task_ids: torch.Tensor):
        """The representation of ``x``, through the model's forward (under DDP only that averages the
        encoder's gradients). A per-task encoder (PNN's columns) returns ``{head: representation}``."""
        net = getattr(model, "module", model)
        tasks = [name for name, _ in self.head_names(task_ids)] if getattr(net.encoder, "per_task", False) else []
        return model(x, tasks=tasks, return_rep=True)[1]

    def logits(self, model, z, task_ids: torch.Tensor) -> torch.Tensor:
        """``(N, outputs)``: each row from the head its task id selects (one head outside Task-IL).

        ``z``: a tensor, or ``{head: representation}`` from a per-task encoder."""
        net = getattr(model, "module", model)
        parts = self.head_names(task_ids)
        if len(parts) == 1:
            name = parts[0][0]
            return net.heads[name](z[name] if isinstance(z, dict) else z)
        out = None
        for name, rows in parts:
            logits = net.heads[name]((z[name] if isinstance(z, dict) else z)[rows])
            if out is None:
                out = logits.new_zeros(len(task_ids), logits.shape[1])
            out[rows] = logits
        return out

    def loss(self, logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        return F.cross_entropy(logits.float(), targets, reduction=reduction)

    @torch.no_grad()
    def accuracy(self, model, experience, task_aware: bool = False, scores=None, batch_size: int = 256) -> float:
        """Accuracy (a fraction) on ``experience``'s test split; NaN where it cannot be measured yet.

        Task-IL reads the experience's head, Domain-IL the shared one; Class-IL takes the
        argmax over every class seen so far, or with ``task_aware`` over the experience's own
        classes only: the Task-IL accuracy of the same Class-IL model (Buzzega et al. 2020).
        ``scores(model, x, task_ids)``: class scores to take the argmax of instead of the logits
        (iCaRL's nearest-mean-of-exemplars classifier); None from it means "use the logits".
        """
        if self.setting == "task" and self.stream.head_name(experience) not in self.model.heads:
            return float("nan")  # no head yet
        if self.setting == "class" and experience.index > self.prepared:
            return float("nan")  # its classes have no outputs yet
        net = getattr(model, "module", model)
        was_training = net.training
        net.eval()
        device = next(net.parameters()).device
        data = ExperienceData(experience, self, "test")
        allowed = None
        if task_aware and self.setting == "class":
            allowed = torch.tensor(sorted(self.stream.head_label(experience, torch.tensor(experience.classes))
                                          .tolist()), device=device)
        correct = 0
        for x, y, t in data.batches(batch_size):
            x, t = x.to(device), t.to(device)
            logits = scores(net, x, t) if scores is not None else None
            if logits is None:
                logits = self.logits(net, self.encode(net, x, t), t)
            predicted = allowed[logits[:, allowed].argmax(1)] if allowed is not None else logits.argmax(1)
            correct += int((predicted.cpu() == y).sum())
        net.train(was_training)
        return correct / len(data)


class ExperienceData(Dataset):
    """``(image, head target, task id)`` for one split of an experience."""

    def __init__(self, experience, learner: ContinualLearner, split: str = "train"):
        self.data = experience.train if split == "train" else experience.test
        self.task_id = experience.task_id
        labels = getattr(self.data, "labels", None)
        if labels is None:
            labels = torch.tensor([int(self.data[i][1]) for i in range(len(self.data))])
        self.targets = learner.stream.head_label(experience, labels.long())

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i):
        return self.data[i][0], self.targets[i], self.task_id

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(indices if isinstance(indices, torch.Tensor) else list(indices), dtype=torch.long)
        take = getattr(self.data, "take_images", None)  # one gather where the images are one tensor
        images = take(index) if take is not None else torch.stack([self.data[i][0] for i in index.tolist()])
        return images, self.targets.index_select(0, index), torch.full((len(index),), self.task_id, dtype=torch.long)

    def batches(self, batch_size: int):
        """The split in order, ``batch_size`` samples at a time, each ``(images, targets, task_ids)``."""
        for start in range(0, len(self), batch_size):
            yield self.batch(range(start, min(start + batch_size, len(self))))

    def __getitems__(self, indices) -> Gathered:
        """A DataLoader's batch fetch: the items of ``indices`` from one gather (same items as ``__getitem__``)."""
        return Gathered(*self.batch(indices))
