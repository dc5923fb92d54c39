"""NYUv2 dense tasks (segmentation, depth, normals) and CelebA error rates, against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from mtl.errors import ConfigError, DataError
from mtl.metrics import (
    AngleWithin,
    BinaryAccuracy,
    DepthAbsError,
    DepthRelError,
    ErrorRate,
    MeanAngleError,
    MeanIoU,
    MedianAngleError,
    PixelAccuracy,
    angle_errors,
    mean_error,
)
from mtl.tasks import attribute_task, depth_task, normal_task, nyuv2_tasks, segmentation_task


def total(metric, *batches):
    """Sum a metric's per-sample statistics over batches, as Trainer.evaluate does."""
    return sum(metric.statistics(out, tgt).sum(0) for out, tgt in batches)


def one_hot_logits(pred: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(N, H, W) class indices -> (N, C, H, W) logits whose arg-max is that class."""
    return F.one_hot(pred, num_classes).permute(0, 3, 1, 2).float()


# ---------------------------------------------------------------------------
# names, directions, factories
# ---------------------------------------------------------------------------


def test_nyuv2_tasks_metric_names_and_directions():
    seg, depth, normal = nyuv2_tasks()
    assert [seg.name, depth.name, normal.name] == ["segmentation", "depth", "normal"]
    assert [(m.name, m.higher_is_better) for m in seg.metrics] == [("mIoU", True), ("pixel_acc", True)]
    assert [(m.name, m.higher_is_better) for m in depth.metrics] == [("abs_err", False), ("rel_err", False)]
    assert [(m.name, m.higher_is_better) for m in normal.metrics] == [
        ("mean_angle", False), ("median_angle", False),
        ("within_11.25", True), ("within_22.5", True), ("within_30", True),
    ]
    assert (seg.likelihood, depth.likelihood, normal.likelihood) == ("classification", "regression", "regression")
    assert seg.primary_metric.name == "mIoU" and depth.primary_metric.name == "abs_err"
    assert normal.primary_metric.name == "mean_angle"


# ---------------------------------------------------------------------------
# segmentation
# ---------------------------------------------------------------------------

# Two 1x4 label maps, four classes. Class 3 appears in no label, and is predicted only on the
# ignored (-1) pixel, so over the split it is absent from both prediction and target.
SEG_TARGET = torch.tensor([[[0, 0, 1, -1]], [[2, 2, 1, 0]]])
SEG_PRED = torch.tensor([[[0, 1, 1, 3]], [[2, 0, 1, 0]]])


def test_confusion_statistics_by_hand():
    metric = MeanIoU(num_classes=4)
    stats = metric.statistics(one_hot_logits(SEG_PRED, 4), SEG_TARGET)
    assert stats.shape == (2, 16) and stats.dtype == torch.float64
    # sample 0: (target, pred) = (0,0) (0,1) (1,1); the -1 pixel predicted 3 counts nowhere
    assert stats[0].reshape(4, 4).tolist() == [[1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    # sample 1: (2,2) (2,0) (1,1) (0,0)
    assert stats[1].reshape(4, 4).tolist() == [[1, 0, 0, 0], [0, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]


def test_miou_and_pixel_accuracy_by_hand():
    # Summed confusion (rows target, columns prediction):
    #   [[2, 1, 0, 0],
    #    [0, 2, 0, 0],
    #    [1, 0, 1, 0],
    #    [0, 0, 0, 0]]
    # IoU_0 = 2 / (3 + 3 - 2) = 1/2, IoU_1 = 2 / (2 + 3 - 2) = 2/3, IoU_2 = 1 / (2 + 1 - 1) = 1/2,
    # class 3: union 0, left out. mIoU = (1/2 + 2/3 + 1/2) / 3 = 5/9 (not 5/12 with a zero for class 3).
    # Pixel accuracy: 5 correct of 7 non-ignored pixels.
    logits = one_hot_logits(SEG_PRED, 4)
    miou, acc = MeanIoU(4), PixelAccuracy(4)
    assert miou.compute(total(miou, (logits, SEG_TARGET))) == pytest.approx(5 / 9)
    assert acc.compute(total(acc, (logits, SEG_TARGET))) == pytest.approx(5 / 7)
    # integer predictions work as well as logits
    assert miou.compute(total(miou, (SEG_PRED, SEG_TARGET))) == pytest.approx(5 / 9)


def test_class_predicted_but_never_labelled_counts_as_zero_iou():
    # target [0, 0], prediction [0, 1]: IoU_0 = 1 / (2 + 1 - 1) = 1/2, IoU_1 = 0 / (0 + 1 - 0) = 0
    metric = MeanIoU(3)
    stats = metric.statistics(torch.tensor([[0, 1]]), torch.tensor([[0, 0]]))
    assert metric.compute(stats.sum(0)) == pytest.approx(0.25)


def test_segmentation_statistics_add_up_over_batches():
    logits = one_hot_logits(SEG_PRED, 4)
    for metric in (MeanIoU(4), PixelAccuracy(4)):
        two = total(metric, (logits[:1], SEG_TARGET[:1]), (logits[1:], SEG_TARGET[1:]))
        one = total(metric, (logits, SEG_TARGET))
        assert torch.equal(two, one)
    # the mean of the per-batch mIoUs is not the split's mIoU
    miou = MeanIoU(4)
    first = miou.compute(total(miou, (logits[:1], SEG_TARGET[:1])))  # IoU_0 = 1/2, IoU_1 = 1/2 -> 1/2
    second = miou.compute(total(miou, (logits[1:], SEG_TARGET[1:])))  # 1/2, 1, 1/2 -> 2/3
    assert (first, second) == (pytest.approx(0.5), pytest.approx(2 / 3))
    assert (first + second) / 2 != pytest.approx(5 / 9)


def test_all_ignored_split_is_nan_and_bad_labels_are_data_errors():
    metric = MeanIoU(4)
    stats = metric.statistics(torch.zeros(1, 4, 1, 2), torch.tensor([[[-1, -1]]]))
    assert stats.sum() == 0 and math.isnan(metric.compute(stats.sum(0)))
    assert math.isnan(PixelAccuracy(4).compute(stats.sum(0)))
    with pytest.raises(DataError, match=r"metric 'mIoU' got label 4, expected -1 \(ignored\) or 0..3"):
        metric.statistics(torch.zeros(1, 4, 1, 2), torch.tensor([[[0, 4]]]))
    with pytest.raises(DataError, match="expects 4 class scores per pixel"):
        metric.statistics(torch.zeros(1, 5, 1, 2), torch.tensor([[[0, 1]]]))
    with pytest.raises(ConfigError):
        MeanIoU(0)


def test_segmentation_loss_is_cross_entropy_over_non_ignored_pixels():
    torch.manual_seed(0)
    task = segmentation_task(num_classes=4)
    logits = torch.randn(2, 4, 1, 4)
    loss = task.loss(logits, SEG_TARGET)
    torch.testing.assert_close(loss, F.cross_entropy(logits, SEG_TARGET, ignore_index=-1))
    # by hand: uniform logits cost log 4 on each of the 7 valid pixels; the ignored pixel adds nothing
    assert float(task.loss(torch.zeros(2, 4, 1, 4), SEG_TARGET)) == pytest.approx(math.log(4))


def test_segmentation_loss_of_an_all_ignored_batch_is_zero_not_nan():
    task = segmentation_task(num_classes=4)
    logits = torch.randn(1, 4, 2, 2, requires_grad=True)
    loss = task.loss(logits, torch.full((1, 2, 2), -1))
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("bad", [13, -2, 255])
def test_segmentation_labels_outside_range_name_task_and_value(bad):
    task = segmentation_task()
    labels = torch.tensor([[[0, -1], [12, bad]]])
    with pytest.raises(DataError, match=rf"task 'segmentation' got label {bad}, outside -1 \(ignored\) and its head's range 0..12"):
        task.loss(torch.zeros(1, 13, 2, 2), labels)


def test_segmentation_shape_and_class_count_errors():
    task = segmentation_task("seg", num_classes=13)
    with pytest.raises(DataError, match="task 'seg' has 13 classes but its head gives 7"):
        task.loss(torch.zeros(1, 7, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(DataError, match="Upsample the logits"):
        task.loss(torch.zeros(1, 13, 4, 4), torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(DataError, match="task 'seg' got label 1.5, which is not an integer"):
        task.loss(torch.zeros(1, 13, 1, 2), torch.tensor([[[0.0, 1.5]]]))


# ---------------------------------------------------------------------------
# depth
# ---------------------------------------------------------------------------

# batch 1: valid pixels (gt, pred) = (2, 1), (4, 4), (1, 3); gt 0 is invalid (pred 5 ignored)
DEPTH_GT_1 = torch.tensor([[[[2.0, 0.0], [4.0, 1.0]]]])
DEPTH_PRED_1 = torch.tensor([[[[1.0, 5.0], [4.0, 3.0]]]])
# batch 2: one valid pixel (2, 1)
DEPTH_GT_2 = torch.tensor([[[[0.0, 0.0], [0.0, 2.0]]]])
DEPTH_PRED_2 = torch.tensor([[[[9.0, 9.0], [9.0, 1.0]]]])


def test_depth_errors_by_hand_over_valid_pixels():
    abs_err, rel_err = DepthAbsError(), DepthRelError()
    # batch 1: |errors| 1, 0, 2 -> abs 3/3 = 1; relative 1/2 + 0/4 + 2/1 = 5/2 -> 5/6
    assert abs_err.statistics(DEPTH_PRED_1, DEPTH_GT_1).tolist() == [[3.0, 3.0]]
    assert rel_err.statistics(DEPTH_PRED_1, DEPTH_GT_1).tolist() == [[2.5, 3.0]]
    assert abs_err.compute(total(abs_err, (DEPTH_PRED_1, DEPTH_GT_1))) == pytest.approx(1.0)
    assert rel_err.compute(total(rel_err, (DEPTH_PRED_1, DEPTH_GT_1))) == pytest.approx(5 / 6)
    # both batches: abs (3 + 1) / 4 = 1, rel (5/2 + 1/2) / 4 = 3/4 (not the batch mean (5/6 + 1/2) / 2)
    batches = [(DEPTH_PRED_1, DEPTH_GT_1), (DEPTH_PRED_2, DEPTH_GT_2)]
    assert abs_err.compute(total(abs_err, *batches)) == pytest.approx(1.0)
    assert rel_err.compute(total(rel_err, *batches)) == pytest.approx(0.75)
    one = total(rel_err, (torch.cat([DEPTH_PRED_1, DEPTH_PRED_2]), torch.cat([DEPTH_GT_1, DEPTH_GT_2])))
    assert torch.equal(total(rel_err, *batches), one)
    assert not abs_err.higher_is_better and not rel_err.higher_is_better


def test_depth_without_valid_pixels_is_nan():
    stats = DepthAbsError().statistics(torch.ones(1, 1, 2, 2), torch.zeros(1, 1, 2, 2))
    assert stats.tolist() == [[0.0, 0.0]]
    assert math.isnan(DepthAbsError().compute(stats.sum(0)))
    assert math.isnan(DepthRelError().compute(DepthRelError().statistics(torch.ones(1, 1, 2, 2), torch.zeros(1, 1, 2, 2)).sum(0)))


def test_depth_loss_is_l1_on_valid_pixels_only():
    task = depth_task()
    pred = DEPTH_PRED_1.clone().requires_grad_(True)
    loss = task.loss(pred, DEPTH_GT_1)
    assert float(loss.detach()) == pytest.approx(1.0)  # (1 + 0 + 2) / 3
    loss.backward()
    # d/dpred |pred - gt| / 3 = sign / 3 on valid pixels (0 where pred == gt), nothing on the invalid one
    torch.testing.assert_close(pred.grad, torch.tensor([[[[-1 / 3, 0.0], [0.0, 1 / 3]]]]))
    empty = torch.ones(1, 1, 2, 2, requires_grad=True)
    assert float(task.loss(empty, torch.zeros(1, 1, 2, 2)).detach()) == 0.0


def test_depth_shape_and_value_errors():
    task = depth_task()
    with pytest.raises(DataError, match=r"task 'depth' expects targets of shape \(N, 1, H, W\), got \(1, 2, 2, 1\)"):
        task.loss(torch.zeros(1, 2, 2, 1), torch.zeros(1, 2, 2, 1))
    with pytest.raises(DataError, match=r"task 'depth' needs an output of the target's shape \(1, 1, 2, 2\), got \(1, 1, 4, 4\)"):
        task.loss(torch.zeros(1, 1, 4, 4), torch.ones(1, 1, 2, 2))
    with pytest.raises(DataError, match="task 'depth' got a non-finite target value"):
        task.loss(torch.zeros(1, 1, 1, 2), torch.tensor([[[[1.0, float("nan")]]]]))
    with pytest.raises(DataError, match="metric 'abs_err' needs output and target of one shape"):
        DepthAbsError().statistics(torch.zeros(1, 1, 4, 4), torch.ones(1, 1, 2, 2))


# ---------------------------------------------------------------------------
# surface normals
# ---------------------------------------------------------------------------


def _unit(deg: float):
    """A vector at ``deg`` degrees from +z, in the x-z plane."""
    r = math.radians(deg)
    return (math.sin(r), 0.0, math.cos(r))


def normal_batch():
    """One 1x7 image: target +z everywhere but the last pixel (all zeros, invalid).

    Predictions at exactly 0 (a non-unit (0, 0, 2)), 10, 25, 45, 90, 180 degrees, and anything on
    the invalid pixel.
    """
    preds = [(0.0, 0.0, 2.0), _unit(10), _unit(25), _unit(45), (1.0, 0.0, 0.0), (0.0, 0.0, -1.0), (1.0, 0.0, 0.0)]
    gts = [(0.0, 0.0, 1.0)] * 6 + [(0.0, 0.0, 0.0)]
    pred = torch.tensor(preds, dtype=torch.float32).T.reshape(1, 3, 1, 7)
    gt = torch.tensor(gts, dtype=torch.float32).T.reshape(1, 3, 1, 7)
    return pred, gt


def test_angles_of_exactly_known_vectors():
    pred, gt = normal_batch()
    angles, valid = angle_errors(pred, gt)
    assert valid.tolist() == [[[True] * 6 + [False]]]
    torch.testing.assert_close(angles[0, 0, :6], torch.tensor([0.0, 10.0, 25.0, 45.0, 90.0, 180.0], dtype=torch.float64),
                               atol=1e-5, rtol=0)
    assert float(angles[0, 0, 0]) < 1e-6 and float(angles[0, 0, 5]) == pytest.approx(180.0, abs=1e-6)


def test_normal_metrics_by_hand():
    # valid angles 0, 10, 25, 45, 90, 180: mean 350/6; median (25 + 45)/2 = 35 (numpy.median, even count);
    # strictly under 11.25: {0, 10} -> 2/6; under 22.5: 2/6; under 30: {0, 10, 25} -> 3/6
    pred, gt = normal_batch()
    expect = {"mean_angle": 350 / 6, "within_11.25": 2 / 6, "within_22.5": 2 / 6, "within_30": 3 / 6}
    for metric in normal_task().metrics:
        value = metric.compute(total(metric, (pred, gt)))
        if metric.name == "median_angle":
            assert abs(value - 35.0) < metric.bin_width
        else:
            assert value == pytest.approx(expect[metric.name], abs=1e-6), metric.name
    assert MeanAngleError().statistics(pred, gt)[0, 1] == 6.0  # the invalid pixel is not counted


def test_median_histogram_layout_and_odd_count():
    metric = MedianAngleError()
    assert metric.bin_width == 0.05 and metric.num_bins == 3600
    pred, gt = normal_batch()
    stats = metric.statistics(pred, gt)
    assert stats.shape == (1, 3600) and stats.sum() == 6
    assert stats[0, 3599] == 1  # 180 degrees falls in the last bin
    assert stats[0, 1800] == 1  # 90 degrees starts bin 1800
    # odd count {0, 90, 180}: median 90, estimated at the centre of its bin, 90.025
    odd = metric.statistics(pred[..., [0, 4, 5]], gt[..., [0, 4, 5]])
    assert metric.compute(odd.sum(0)) == pytest.approx(90.025)
    assert math.isnan(metric.compute(torch.zeros(3600, dtype=torch.float64)))


@pytest.mark.parametrize("count", [2001, 2000, 2])
def test_median_is_within_one_bin_of_the_exact_median(count):
    # random directions against random unit targets, summed over two batches of uneven size
    g = torch.Generator().manual_seed(count)
    pred = torch.randn(1, 3, 1, count, generator=g)
    gt = F.normalize(torch.randn(1, 3, 1, count, generator=g), dim=1)
    metric = MedianAngleError()
    split = count // 3
    totals = total(metric, (pred[..., :split], gt[..., :split]), (pred[..., split:], gt[..., split:]))
    exact = float(np.median(angle_errors(pred, gt)[0].numpy()))
    assert abs(metric.compute(totals) - exact) < metric.bin_width


def test_normal_statistics_add_up_over_batches():
    pred, gt = normal_batch()
    # one batch of 2 samples vs the same 2 samples one at a time
    pred2, gt2 = torch.cat([pred, pred.flip(-1)]), torch.cat([gt, gt.flip(-1)])
    for metric in normal_task().metrics:
        assert torch.equal(total(metric, (pred2[:1], gt2[:1]), (pred2[1:], gt2[1:])), total(metric, (pred2, gt2)))


def test_normal_loss_is_one_minus_cosine_on_valid_pixels():
    pred, gt = normal_batch()
    cosines = [1.0, math.cos(math.radians(10)), math.cos(math.radians(25)), math.cos(math.radians(45)), 0.0, -1.0]
    expected = sum(1 - c for c in cosines) / 6
    task = normal_task()
    assert float(task.loss(pred, gt)) == pytest.approx(expected, abs=1e-6)
    # the invalid pixel gets no gradient
    p = pred.clone().requires_grad_(True)
    task.loss(p, gt).backward()
    assert torch.equal(p.grad[..., 6], torch.zeros(1, 3, 1))
    assert task.likelihood == "regression"
    with pytest.raises(DataError, match=r"task 'normal' expects targets of shape \(N, 3, H, W\)"):
        task.loss(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2))


def test_angle_within_names_and_config():
    assert [AngleWithin(t).name for t in (11.25, 22.5, 30)] == ["within_11.25", "within_22.5", "within_30"]
    with pytest.raises(ConfigError):
        AngleWithin(0)
    with pytest.raises(ConfigError):
        MedianAngleError(bins_per_degree=0)


# ---------------------------------------------------------------------------
# CelebA: error rate and mean error over attributes
# ---------------------------------------------------------------------------


def test_error_rate_is_one_minus_binary_accuracy():
    out = torch.tensor([[2.0, -1.0, 0.5], [-0.3, 0.0, 4.0]])  # predictions 1 0 1 / 0 0 1
    y = torch.tensor([[1, 0, 0], [0, 1, 1]])  # right right wrong / right wrong right: 2 of 6 wrong
    err = ErrorRate()
    assert err.name == "error_rate" and not err.higher_is_better
    totals = err.statistics(out, y).sum(0)
    assert err.compute(totals) == pytest.approx(1 / 3)
    assert err.compute(totals) == pytest.approx(1 - BinaryAccuracy().compute(totals))
    assert math.isnan(err.compute(torch.zeros(2, dtype=torch.float64)))


def test_attribute_task_and_mean_error():
    task = attribute_task("Smiling")
    assert [m.name for m in task.metrics] == ["error_rate", "accuracy"]
    # three attributes: error 0.1, error 0.2 (from accuracy 0.8), error 0.3 -> mean 0.2
    results = {"a": {"error_rate": 0.1, "accuracy": 0.9}, "b": {"accuracy": 0.8}, "c": {"error_rate": 0.3}}
    assert mean_error(results) == pytest.approx(0.2)
    assert mean_error(results, num_attributes=3) == pytest.approx(0.2)
    with pytest.raises(DataError, match="mean_error expected 40 attribute tasks but got 3"):
        mean_error(results, num_attributes=40)
    with pytest.raises(DataError, match="task 'd' has neither 'error_rate' nor 'accuracy'"):
        mean_error({"d": {"mIoU": 0.5}})
    with pytest.raises(DataError, match="mean_error got no results"):
        mean_error({})
