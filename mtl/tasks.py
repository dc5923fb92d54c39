"""Task: a name, a loss, metrics, and where its target lives in a batch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.nn import functional as F

from .errors import DataError
from .metrics import Accuracy, BinaryAccuracy, Metric

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Task:
    """One supervised objective of a multi-task model.

    ``loss_fn(output, target)`` returns a scalar; ``metrics[0]`` is the task's primary
    metric (each metric says whether higher is better); ``target_key`` names the
    entry of the batch's target dict (the task name by default); ``check_target``
    raises a ``DataError`` for targets the head cannot represent.
    ``likelihood`` tells uncertainty weighting which of Kendall et al.'s forms to use
    ("classification": 1/sigma^2, "regression": 1/(2 sigma^2)).
    """

    name: str
    loss_fn: LossFn
    metrics: list[Metric] = field(default_factory=list)
    target_key: str | None = None
    check_target: Callable[[torch.Tensor, str], None] | None = None
    likelihood: str = "classification"

    def target(self, targets: dict) -> torch.Tensor:
        key = self.target_key or self.name
        if key not in targets:
            raise DataError(
                f"task '{self.name}' reads target '{key}', but the batch has targets {sorted(targets)}. "
                "Set the task's target_key or fix the data set's target names."
            )
        return targets[key]

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.check_target is not None:
            self.check_target(target, self.name)
        return self.loss_fn(output, target)

    @property
    def primary_metric(self) -> Metric:
        return self.metrics[0]


def class_range_check(num_classes: int) -> Callable[[torch.Tensor, str], None]:
    def check(target: torch.Tensor, task: str) -> None:
        bad = (target < 0) | (target >= num_classes)
        if bool(bad.any()):
            value = int(target[bad][0])
            raise DataError(
                f"task '{task}' got label {value}, outside its head's range 0..{num_classes - 1}. "
                f"Give the head num_classes > {value}, or fix the labels of the data set."
            )

    return check


def binary_range_check(target: torch.Tensor, task: str) -> None:
    if bool(((target != 0) & (target != 1)).any()):
        raise DataError(f"task '{task}' is binary but got targets other than 0 and 1; map the labels to {{0, 1}}.")


def classification_task(name: str, num_classes: int, target_key: str | None = None) -> Task:
    """Cross-entropy on integer class labels, accuracy as metric."""
    return Task(name, F.cross_entropy, [Accuracy()], target_key, class_range_check(num_classes))


def binary_task(name: str, target_key: str | None = None) -> Task:
    """Binary cross-entropy on logits, one or more 0/1 labels per sample, accuracy as metric."""

    def loss(output, target):
        return F.binary_cross_entropy_with_logits(output, target.to(output.dtype))

    return Task(name, loss, [BinaryAccuracy()], target_key, binary_range_check)
