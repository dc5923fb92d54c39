"""Tasks (losses, target checks, target lookup) and metrics as summable statistics."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from mtl.errors import DataError
from mtl.metrics import Accuracy, BinaryAccuracy
from mtl.tasks import Task, binary_task, classification_task

# ---------------------------------------------------------------------------
# classification tasks
# ---------------------------------------------------------------------------


def test_classification_loss_is_cross_entropy():
    torch.manual_seed(0)
    task = classification_task("digit", 10)
    logits, labels = torch.randn(6, 10), torch.tensor([0, 9, 3, 3, 7, 1])
    loss = task.loss(logits, labels)
    torch.testing.assert_close(loss, F.cross_entropy(logits, labels))
    # by hand for one sample: -log softmax(logits)[label]
    single = task.loss(logits[:1], labels[:1])
    assert float(single) == pytest.approx(float(-torch.log_softmax(logits[0], 0)[0]), rel=1e-6)


def test_classification_task_defaults():
    task = classification_task("digit", 10)
    assert task.likelihood == "classification"
    assert isinstance(task.primary_metric, Accuracy)
    assert task.target({"digit": torch.tensor([1]), "other": torch.tensor([2])}).tolist() == [1]


@pytest.mark.parametrize("bad, labels", [(10, [0, 4, 10, 12]), (-1, [3, -1, 2])])
def test_out_of_range_label_names_task_and_label(bad, labels):
    task = classification_task("left", 10)
    with pytest.raises(DataError, match=f"task 'left' got label {bad}, outside its head's range 0..9"):
        task.loss(torch.zeros(len(labels), 10), torch.tensor(labels))


def test_labels_at_the_ends_of_the_range_are_fine():
    task = classification_task("left", 3)
    loss = task.loss(torch.zeros(2, 3), torch.tensor([0, 2]))
    assert float(loss) == pytest.approx(math.log(3), rel=1e-6)  # uniform logits


def test_target_key_and_missing_target():
    task = classification_task("left", 10, target_key="digit_left")
    assert task.target({"digit_left": torch.tensor([4])}).tolist() == [4]
    with pytest.raises(DataError, match=r"task 'left' reads target 'digit_left', but the batch has targets \['left'\]"):
        task.target({"left": torch.tensor([4])})


# ---------------------------------------------------------------------------
# binary tasks
# ---------------------------------------------------------------------------


def test_binary_loss_is_bce_with_logits_on_integer_targets():
    torch.manual_seed(0)
    task = binary_task("attrs")
    logits = torch.randn(4, 5)
    targets = torch.randint(0, 2, (4, 5))  # int64 labels, converted to the logits' dtype
    torch.testing.assert_close(task.loss(logits, targets), F.binary_cross_entropy_with_logits(logits, targets.float()))
    # by hand: logit 0 against either label costs log 2
    assert float(task.loss(torch.zeros(2, 1), torch.tensor([[0], [1]]))) == pytest.approx(math.log(2), rel=1e-6)
    assert isinstance(task.primary_metric, BinaryAccuracy)


@pytest.mark.parametrize("targets", [[[0, 1], [2, 1]], [[0.5, 1.0], [0.0, 0.0]], [[-1, 0], [1, 1]]])
def test_binary_targets_other_than_0_and_1_are_a_data_error(targets):
    task = binary_task("smiling")
    with pytest.raises(DataError, match="task 'smiling' is binary but got targets other than 0 and 1"):
        task.loss(torch.zeros(2, 2), torch.tensor(targets))


def test_custom_task_without_a_check():
    task = Task("depth", F.l1_loss, likelihood="regression")
    assert float(task.loss(torch.tensor([1.0, 2.0]), torch.tensor([2.0, 0.0]))) == pytest.approx(1.5)


# ---------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------


def test_accuracy_statistics_add_up_over_batches():
    metric = Accuracy()
    assert metric.name == "accuracy" and metric.higher_is_better
    out1 = torch.tensor([[0.1, 0.2, 0.9, 0.0], [2.0, 1.0, 0.0, 0.0], [0.0, 3.0, 1.0, 2.0]])  # argmax 2, 0, 1
    y1 = torch.tensor([2, 1, 1])  # correct, wrong, correct
    out2 = torch.tensor([[0.0, 0.0, 0.0, 5.0], [1.0, 0.0, 0.0, 4.0]])  # argmax 3, 3
    y2 = torch.tensor([3, 0])  # correct, wrong
    s1, s2 = metric.statistics(out1, y1), metric.statistics(out2, y2)
    assert s1.shape == (3, 2) and s1.dtype == torch.float64
    assert s1.tolist() == [[1.0, 1.0], [0.0, 1.0], [1.0, 1.0]]
    totals = s1.sum(0) + s2.sum(0)
    assert totals.tolist() == [3.0, 5.0]
    whole = metric.statistics(torch.cat([out1, out2]), torch.cat([y1, y2])).sum(0)
    assert torch.equal(totals, whole)
    assert metric.compute(totals) == pytest.approx(0.6)
    # not the mean of the per-batch accuracies (2/3 and 1/2)
    assert metric.compute(totals) != pytest.approx((2 / 3 + 1 / 2) / 2)


def test_binary_accuracy_statistics_add_up_over_batches():
    metric = BinaryAccuracy()
    out1 = torch.tensor([[2.0, -1.0, 0.5], [-0.3, 0.0, 4.0]])  # predictions 1 0 1 / 0 0 1 (logit 0 -> 0)
    y1 = torch.tensor([[1, 0, 0], [0, 1, 1]])  # right right wrong / right wrong right
    out2 = torch.tensor([[-1.0, -2.0, 3.0]])  # predictions 0 0 1
    y2 = torch.tensor([[1, 0, 1]])  # wrong right right
    s1, s2 = metric.statistics(out1, y1), metric.statistics(out2, y2)
    assert s1.tolist() == [[2.0, 3.0], [2.0, 3.0]]
    assert s2.tolist() == [[2.0, 3.0]]
    totals = s1.sum(0) + s2.sum(0)
    assert totals.tolist() == [6.0, 9.0]
    assert torch.equal(totals, metric.statistics(torch.cat([out1, out2]), torch.cat([y1, y2])).sum(0))
    assert metric.compute(totals) == pytest.approx(2 / 3)


def test_binary_accuracy_with_one_label_per_sample():
    metric = BinaryAccuracy()
    stats = metric.statistics(torch.tensor([1.0, -1.0, 2.0, -0.5]), torch.tensor([1.0, 1.0, 0.0, 0.0]))
    assert stats.tolist() == [[1.0, 1.0], [0.0, 1.0], [0.0, 1.0], [1.0, 1.0]]
    assert metric.compute(stats.sum(0)) == pytest.approx(0.5)


def test_metrics_of_an_empty_split_are_nan():
    assert math.isnan(Accuracy().compute(torch.zeros(2, dtype=torch.float64)))
    assert math.isnan(BinaryAccuracy().compute(torch.zeros(2, dtype=torch.float64)))
