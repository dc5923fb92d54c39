"""Task: a name, a loss, metrics, and where its target lives in a batch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.nn import functional as F

from .errors import DataError
from .metrics import (
    Accuracy,
    AngleWithin,
    BinaryAccuracy,
    DepthAbsError,
    DepthRelError,
    ErrorRate,
    MeanAngleError,
    MeanIoU,
    MedianAngleError,
    Metric,
    PixelAccuracy,
    valid_pixels,
)

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


def attribute_task(name: str, target_key: str | None = None) -> Task:
    """A binary attribute (CelebA): binary cross-entropy on logits, error rate as primary metric, then accuracy.

    Sener & Koltun report CelebA as the mean error over the 40 attributes: ``metrics.mean_error``.
    """
    task = binary_task(name, target_key)
    task.metrics = [ErrorRate(), BinaryAccuracy()]
    return task


# ---------------------------------------------------------------------------------------------
# Dense tasks, NYUv2 conventions of mtan (Liu et al. 2019) and LibMTL
# ---------------------------------------------------------------------------------------------


def segmentation_label_check(num_classes: int, ignore_index: int = -1) -> Callable[[torch.Tensor, str], None]:
    def check(target: torch.Tensor, task: str) -> None:
        if target.is_floating_point() and bool((target != target.round()).any()):
            value = float(target[target != target.round()][0])
            raise DataError(f"task '{task}' got label {value}, which is not an integer; labels are class indices.")
        bad = (target != ignore_index) & ((target < 0) | (target >= num_classes))
        if bool(bad.any()):
            value = int(target[bad][0])
            raise DataError(
                f"task '{task}' got label {value}, outside {ignore_index} (ignored) and its head's range "
                f"0..{num_classes - 1}. Give the head num_classes > {value}, mark the pixel {ignore_index}, "
                "or fix the labels of the data set."
            )

    return check


def segmentation_task(
    name: str = "segmentation", num_classes: int = 13, ignore_index: int = -1, target_key: str | None = None
) -> Task:
    """Semantic segmentation: per-pixel cross-entropy over the non-ignored pixels; mIoU (primary) and pixel accuracy.

    Output ``(N, C, H, W)`` logits, target ``(N, H, W)`` integer labels in ``0..C-1`` or
    ``ignore_index`` (-1 for NYUv2's 13 classes). The loss is the mean over the batch's
    non-ignored pixels (``F.cross_entropy(..., ignore_index=-1)``), and 0 (with a gradient of
    zeros) for a batch whose pixels are all ignored, where ``F.cross_entropy`` gives NaN.
    """

    def loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if output.dim() != target.dim() + 1 or output.shape[0] != target.shape[0] or output.shape[2:] != target.shape[1:]:
            raise DataError(
                f"task '{name}' needs logits (N, C, H, W) and labels (N, H, W) of the same N, H, W; got "
                f"{tuple(output.shape)} and {tuple(target.shape)}. Upsample the logits to the label resolution."
            )
        if output.shape[1] != num_classes:
            raise DataError(
                f"task '{name}' has {num_classes} classes but its head gives {output.shape[1]} scores per pixel; "
                f"build the head with {num_classes} output channels."
            )
        target = target.long()
        total = F.cross_entropy(output, target, ignore_index=ignore_index, reduction="sum")
        return total / (target != ignore_index).sum().clamp(min=1)

    metrics: list[Metric] = [MeanIoU(num_classes, ignore_index), PixelAccuracy(num_classes, ignore_index)]
    return Task(name, loss, metrics, target_key, segmentation_label_check(num_classes, ignore_index))


def dense_target_check(channels: int) -> Callable[[torch.Tensor, str], None]:
    def check(target: torch.Tensor, task: str) -> None:
        if target.dim() != 4 or target.shape[1] != channels:
            raise DataError(
                f"task '{task}' expects targets of shape (N, {channels}, H, W), got {tuple(target.shape)}; "
                "a data set stored H x W x C must be permuted to C x H x W."
            )
        if not bool(torch.isfinite(target).all()):
            raise DataError(
                f"task '{task}' got a non-finite target value; mark missing pixels with 0 in every channel "
                "(the invalid-pixel convention), not NaN or inf."
            )

    return check


def _check_dense_pair(task: str, output: torch.Tensor, target: torch.Tensor) -> None:
    if output.shape != target.shape:
        raise DataError(
            f"task '{task}' needs an output of the target's shape {tuple(target.shape)}, got {tuple(output.shape)}; "
            "give the head the right number of channels and upsample it to the target resolution."
        )


def depth_task(name: str = "depth", target_key: str | None = None) -> Task:
    """Depth: L1 over valid pixels; mean absolute (primary) and relative error over valid pixels.

    Output and target ``(N, 1, H, W)``; a pixel whose target channels sum to 0 is invalid and
    counts nowhere. The loss is ``sum(|pred - gt| * valid) / #valid`` (LibMTL's ``DepthLoss``),
    0 for a batch without valid pixels.
    """

    def loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _check_dense_pair(name, output, target)
        mask = valid_pixels(target).expand_as(target).to(output.dtype)
        return ((output - target.to(output.dtype)).abs() * mask).sum() / mask.sum().clamp(min=1)

    return Task(name, loss, [DepthAbsError(), DepthRelError()], target_key, dense_target_check(1), "regression")


def normal_task(name: str = "normal", target_key: str | None = None) -> Task:
    """Surface normals: ``1 - cos(pred, gt)`` averaged over valid pixels; angle-error metrics in degrees.

    Output and target ``(N, 3, H, W)``; both are normalised to unit length (the head normalises
    already), so the loss equals LibMTL's ``NormalLoss`` ``1 - sum(<p, gt> * valid) / #valid`` on
    unit targets. Metrics: mean angle (primary), median angle (0.05 degree histogram, within
    0.05 degree of the exact median), and the fractions of valid pixels under 11.25, 22.5 and 30
    degrees.
    """

    def loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _check_dense_pair(name, output, target)
        mask = valid_pixels(target).squeeze(1).to(output.dtype)  # on the stored target, before any cast
        cos = (F.normalize(output, dim=1) * F.normalize(target.to(output.dtype), dim=1)).sum(dim=1)
        return ((1 - cos) * mask).sum() / mask.sum().clamp(min=1)

    metrics: list[Metric] = [
        MeanAngleError(),
        MedianAngleError(),
        AngleWithin(11.25),
        AngleWithin(22.5),
        AngleWithin(30),
    ]
    return Task(name, loss, metrics, target_key, dense_target_check(3), "regression")


def nyuv2_tasks(num_classes: int = 13) -> list[Task]:
    """The three NYUv2 tasks, named as the data set's targets: segmentation, depth, normal (nine metrics)."""
    return [segmentation_task(num_classes=num_classes), depth_task(), normal_task()]
