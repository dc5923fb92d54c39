"""Metrics as sums of per-sample statistics.

A metric turns one batch into per-sample statistics (an ``N x K`` tensor); the
evaluation loop gathers them across processes (dropping the samples Accelerate
duplicates to even out the last batch), sums them over the whole split, and
``compute`` turns the ``K`` totals into a number. Summing is what makes a metric
exact over a split and across processes, whatever the batch boundaries.
"""

from __future__ import annotations

import torch


class Metric:
    name: str = "metric"
    higher_is_better: bool = True

    def statistics(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-sample statistics, shape ``(N, K)``, that add up over samples."""
        raise NotImplementedError

    def compute(self, totals: torch.Tensor) -> float:
        """The metric from the ``K`` summed statistics of a whole split."""
        raise NotImplementedError


class Accuracy(Metric):
    """Fraction of samples whose arg-max class equals the target."""

    name = "accuracy"
    higher_is_better = True

    def statistics(self, output, target):
        correct = (output.argmax(dim=1) == target).to(torch.float64)
        return torch.stack([correct, torch.ones_like(correct)], dim=1)

    def compute(self, totals):
        return float(totals[0] / totals[1]) if totals[1] > 0 else float("nan")


class BinaryAccuracy(Metric):
    """Fraction of correct binary labels (logit > 0 means 1), over all labels of all samples."""

    name = "accuracy"
    higher_is_better = True

    def statistics(self, output, target):
        correct = ((output > 0) == (target > 0.5)).to(torch.float64).reshape(output.shape[0], -1)
        return torch.stack([correct.sum(1), torch.full_like(correct[:, 0], correct.shape[1])], dim=1)

    def compute(self, totals):
        return float(totals[0] / totals[1]) if totals[1] > 0 else float("nan")
