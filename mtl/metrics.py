"""Metrics as sums of per-sample statistics.

A metric turns one batch into per-sample statistics (an ``N x K`` tensor); the
evaluation loop gathers them across processes (dropping the samples Accelerate
duplicates to even out the last batch), sums them over the whole split, and
``compute`` turns the ``K`` totals into a number. Summing is what makes a metric
exact over a split and across processes, whatever the batch boundaries.

Units: accuracies, error rates, mIoU, pixel accuracy and the "within" fractions are fractions
in [0, 1] (published tables print them in percent); depth errors are in the data's units (abs)
or a fraction (rel); angles are in degrees. Metric names are stable strings, usable as table
columns: accuracy, error_rate, mIoU, pixel_acc, abs_err, rel_err, mean_angle, median_angle,
within_11.25, within_22.5, within_30.
"""

from __future__ import annotations

import torch

from .errors import ConfigError, DataError


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


class ErrorRate(BinaryAccuracy):
    """Fraction of wrong binary labels (1 - ``BinaryAccuracy``), over all labels of all samples.

    A fraction like ``Accuracy``: CelebA's published "mean error 8.25%" is 0.0825 here.
    """

    name = "error_rate"
    higher_is_better = False

    def compute(self, totals):
        return 1.0 - float(totals[0] / totals[1]) if totals[1] > 0 else float("nan")


def mean_error(results: dict, num_attributes: int | None = None) -> float:
    """Mean error (a fraction) over binary attribute tasks, e.g. CelebA's 40 attributes.

    ``results`` is ``{task: {metric: value}}`` as ``Trainer.evaluate`` returns it. Each task
    contributes its ``error_rate``, or ``1 - accuracy`` where it only reports accuracy.
    ``num_attributes`` (40 for CelebA), when given, is checked against the number of tasks so a
    missing attribute cannot silently shift the mean.
    """
    if not results:
        raise DataError("mean_error got no results; expected {task: {metric: value}} with one task per attribute.")
    if num_attributes is not None and len(results) != num_attributes:
        raise DataError(
            f"mean_error expected {num_attributes} attribute tasks but got {len(results)} "
            f"({sorted(results)}); evaluate every attribute, or pass num_attributes=None."
        )
    errors = []
    for task, metrics in results.items():
        if not isinstance(metrics, dict):
            raise DataError(f"results of task '{task}' are {metrics!r}; expected a dict {{metric: value}}.")
        if ErrorRate.name in metrics:
            errors.append(float(metrics[ErrorRate.name]))
        elif BinaryAccuracy.name in metrics:
            errors.append(1.0 - float(metrics[BinaryAccuracy.name]))
        else:
            raise DataError(
                f"task '{task}' has neither 'error_rate' nor 'accuracy' among its metrics {sorted(metrics)}; "
                "give it an ErrorRate or BinaryAccuracy metric (attribute_task / binary_task do)."
            )
    return sum(errors) / len(errors)


# ---------------------------------------------------------------------------------------------
# Dense prediction metrics, NYUv2 conventions of mtan (Liu et al. 2019) and LibMTL
# ---------------------------------------------------------------------------------------------


def _ratio(num: torch.Tensor, den: torch.Tensor) -> float:
    return float(num / den) if den > 0 else float("nan")


class _ConfusionMetric(Metric):
    """Per-sample statistics: the sample's ``C x C`` confusion counts, flattened (row = target, column = prediction).

    ``output`` is ``(N, C, ...)`` logits (the arg-max over dim 1 is the prediction) or ``(N, ...)``
    integer predictions; ``target`` is ``(N, ...)`` integer labels where ``ignore_index`` marks a
    pixel that counts nowhere, whatever is predicted there.
    """

    def __init__(self, num_classes: int = 13, ignore_index: int = -1):
        if num_classes < 1:
            raise ConfigError(f"{type(self).__name__} needs num_classes >= 1, got {num_classes}.")
        self.num_classes, self.ignore_index = int(num_classes), int(ignore_index)

    def statistics(self, output, target):
        c = self.num_classes
        if output.dim() == target.dim() + 1:
            if output.shape[1] != c:
                raise DataError(
                    f"metric '{self.name}' expects {c} class scores per pixel (dim 1), got output of shape "
                    f"{tuple(output.shape)}; give the head {c} output channels or the metric num_classes={output.shape[1]}."
                )
            pred = output.argmax(dim=1)
        else:
            pred = output.long()
        if pred.shape != target.shape:
            raise DataError(
                f"metric '{self.name}': predictions of shape {tuple(pred.shape)} do not match labels of shape "
                f"{tuple(target.shape)}; upsample the logits to the label resolution."
            )
        target = target.long()
        valid = target != self.ignore_index
        bad = valid & ((target < 0) | (target >= c))
        if bool(bad.any()):
            raise DataError(
                f"metric '{self.name}' got label {int(target[bad][0])}, expected {self.ignore_index} (ignored) "
                f"or 0..{c - 1}; fix the labels of the data set or num_classes."
            )
        n = target.shape[0]
        sample = torch.arange(n, device=target.device).view(n, *([1] * (target.dim() - 1))).expand_as(target)
        index = (sample * (c * c) + target * c + pred.clamp(0, c - 1))[valid]
        counts = torch.bincount(index, minlength=n * c * c)
        return counts.reshape(n, c * c).to(torch.float64)

    def confusion(self, totals: torch.Tensor) -> torch.Tensor:
        """The summed statistics as a ``C x C`` matrix (row = target class, column = predicted class)."""
        return totals.reshape(self.num_classes, self.num_classes)


class MeanIoU(_ConfusionMetric):
    """Mean intersection over union over the classes present in the split.

    ``IoU_c = TP_c / (TP_c + FP_c + FN_c)`` from the confusion matrix summed over the whole split
    (as LibMTL's NYUv2 ``SegMetric``); a class absent from both the labels and the predictions of the
    split (union 0) has no IoU and is left out of the mean (LibMTL would average a NaN). A class
    predicted but never labelled has IoU 0 and counts. A fraction in [0, 1].
    """

    name = "mIoU"
    higher_is_better = True

    def compute(self, totals):
        h = self.confusion(totals)
        tp = h.diagonal()
        union = h.sum(0) + h.sum(1) - tp
        present = union > 0
        return float((tp[present] / union[present]).mean()) if bool(present.any()) else float("nan")


class PixelAccuracy(_ConfusionMetric):
    """Fraction of non-ignored pixels whose predicted class is the label: trace / sum of the confusion matrix."""

    name = "pixel_acc"
    higher_is_better = True

    def compute(self, totals):
        h = self.confusion(totals)
        return _ratio(h.diagonal().sum(), h.sum())


def valid_pixels(target: torch.Tensor) -> torch.Tensor:
    """mtan / LibMTL validity mask of a dense target ``(N, C, H, W)``: channels not summing to 0, ``(N, 1, H, W)``.

    (So a real unit normal whose components happen to sum to 0 counts as invalid, as in the
    published evaluations.)
    """
    return target.sum(dim=1, keepdim=True) != 0


def _check_dense(metric: str, output: torch.Tensor, target: torch.Tensor) -> None:
    if output.shape != target.shape or target.dim() < 2:
        raise DataError(
            f"metric '{metric}' needs output and target of one shape (N, C, H, W), got output "
            f"{tuple(output.shape)} and target {tuple(target.shape)}; upsample the prediction to the target resolution."
        )


class _PixelErrorMetric(Metric):
    """Per-sample statistics ``[sum of the pixel error over valid pixels, number of valid pixel values]``."""

    higher_is_better = False

    def _pixel_error(self, pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def statistics(self, output, target):
        _check_dense(self.name, output, target)
        mask = valid_pixels(target).expand_as(target)
        pred, gt = output.to(torch.float64), target.to(torch.float64)
        error = torch.where(mask, self._pixel_error(pred, gt), torch.zeros((), dtype=torch.float64, device=gt.device))
        dims = tuple(range(1, target.dim()))
        return torch.stack([error.sum(dims), mask.sum(dims).to(torch.float64)], dim=1)

    def compute(self, totals):
        return _ratio(totals[0], totals[1])


class DepthAbsError(_PixelErrorMetric):
    """Mean ``|pred - gt|`` over all valid pixels of the split (depth in the data's units, metres for NYUv2)."""

    name = "abs_err"

    def _pixel_error(self, pred, gt):
        return (pred - gt).abs()


class DepthRelError(_PixelErrorMetric):
    """Mean ``|pred - gt| / gt`` over all valid pixels of the split (a fraction)."""

    name = "rel_err"

    def _pixel_error(self, pred, gt):
        return (pred - gt).abs() / gt.abs()


def angle_errors(output: torch.Tensor, target: torch.Tensor, metric: str = "normal") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel angle in degrees between predicted and target normals ``(N, 3, H, W)``, and the validity mask.

    Both are normalised to unit length in float64 (the head normalises already; this is a
    defence), so the angle is ``degrees(acos(clamp(<p, t>, -1, 1)))`` in [0, 180]. Returns
    ``(angles, valid)``, each ``(N, H, W)``.
    """
    _check_dense(metric, output, target)
    p = torch.nn.functional.normalize(output.to(torch.float64), dim=1)
    t = torch.nn.functional.normalize(target.to(torch.float64), dim=1)
    angles = torch.rad2deg(torch.acos((p * t).sum(dim=1).clamp(-1.0, 1.0)))
    return angles, valid_pixels(target).squeeze(1)


class MeanAngleError(Metric):
    """Mean angle error in degrees over all valid pixels of the split."""

    name = "mean_angle"
    higher_is_better = False

    def statistics(self, output, target):
        angles, valid = angle_errors(output, target, self.name)
        dims = tuple(range(1, angles.dim()))
        return torch.stack([torch.where(valid, angles, 0.0).sum(dims), valid.sum(dims).to(torch.float64)], dim=1)

    def compute(self, totals):
        return _ratio(totals[0], totals[1])


class MedianAngleError(Metric):
    """Median angle error in degrees over all valid pixels of the split, from a histogram.

    A median does not add up over samples, so each sample carries a histogram of its valid
    pixels' angles: ``bins_per_degree`` bins per degree over [0, 180] (default 20, i.e. 0.05 degree
    bins, 3,600 statistics per sample; 180 exactly falls in the last bin). ``compute`` finds the
    bin holding each middle order statistic (rank ``(n+1)/2`` for odd ``n``; ranks ``n/2`` and
    ``n/2 + 1``, averaged, for even ``n``, as ``numpy.median``) and interpolates linearly inside it,
    putting the bin's ``k`` values at the centres of ``k`` equal sub-intervals. Each estimated order
    statistic lies in the same bin as the true one, so the result is within one bin width
    (0.05 degree) of the exact median.
    """

    name = "median_angle"
    higher_is_better = False

    def __init__(self, bins_per_degree: int = 20):
        if int(bins_per_degree) != bins_per_degree or bins_per_degree < 1:
            raise ConfigError(f"MedianAngleError needs a positive integer bins_per_degree, got {bins_per_degree}.")
        self.bins_per_degree = int(bins_per_degree)
        self.num_bins = 180 * self.bins_per_degree

    @property
    def bin_width(self) -> float:
        return 1.0 / self.bins_per_degree

    def statistics(self, output, target):
        angles, valid = angle_errors(output, target, self.name)
        n = angles.shape[0]
        # multiplying by an integer keeps an angle that is a multiple of the bin width on its bin's lower edge
        bins = (angles * self.bins_per_degree).floor().long().clamp(0, self.num_bins - 1)
        sample = torch.arange(n, device=angles.device).view(n, *([1] * (angles.dim() - 1))).expand_as(bins)
        counts = torch.bincount((sample * self.num_bins + bins)[valid], minlength=n * self.num_bins)
        return counts.reshape(n, self.num_bins).to(torch.float64)

    def compute(self, totals):
        hist = totals.to(torch.float64)
        n = float(hist.sum())
        if n <= 0:
            return float("nan")
        cum = hist.cumsum(0)

        def order_statistic(rank: float) -> float:
            b = int(torch.searchsorted(cum, torch.tensor([rank], dtype=torch.float64, device=cum.device))[0])
            before = float(cum[b] - hist[b])
            return (b + (rank - before - 0.5) / float(hist[b])) * self.bin_width

        if int(n) % 2 == 1:
            return order_statistic((n + 1) / 2)
        return 0.5 * (order_statistic(n / 2) + order_statistic(n / 2 + 1))


class AngleWithin(Metric):
    """Fraction of valid pixels whose angle error is strictly below ``threshold`` degrees (LibMTL: ``error < 11.25``)."""

    higher_is_better = True

    def __init__(self, threshold: float):
        if not 0 < threshold <= 180:
            raise ConfigError(f"AngleWithin needs a threshold in (0, 180] degrees, got {threshold}.")
        self.threshold = float(threshold)
        self.name = f"within_{self.threshold:g}"

    def statistics(self, output, target):
        angles, valid = angle_errors(output, target, self.name)
        dims = tuple(range(1, angles.dim()))
        within = valid & (angles < self.threshold)
        return torch.stack([within.sum(dims), valid.sum(dims)], dim=1).to(torch.float64)

    def compute(self, totals):
        return _ratio(totals[0], totals[1])
