"""The accuracy matrix and ACC / BWT / FWT / forgetting against values computed by hand."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from continual.metrics import (
    AccuracyMatrix,
    average_accuracy,
    backward_transfer,
    forgetting,
    forward_transfer,
    plot_accuracy_matrix,
    summarize,
)
from mtl.errors import ConfigError, DataError

# R[i][j]: accuracy on experience j after training experience i. The cells above the
# diagonal that FWT uses are filled; R[0][2] is deliberately left unmeasured.
NAN = float("nan")
R = [
    [0.90, 0.20, NAN],
    [0.70, 0.95, 0.30],
    [0.60, 0.80, 0.85],
]
B = [0.10, 0.15, 0.12]


@pytest.fixture
def matrix():
    return AccuracyMatrix.from_values(R, baseline=B)


def test_full_matrix_metrics_match_hand_computed_values(matrix):
    # ACC = (0.60 + 0.80 + 0.85) / 3
    assert average_accuracy(matrix) == pytest.approx(0.75)
    # BWT = ((0.60 - 0.90) + (0.80 - 0.95)) / 2
    assert backward_transfer(matrix) == pytest.approx(-0.225)
    # FWT = ((R[0][1] - b[1]) + (R[1][2] - b[2])) / 2 = ((0.20 - 0.15) + (0.30 - 0.12)) / 2
    assert forward_transfer(matrix) == pytest.approx(0.115)
    # forgetting: j=0: max(0.90, 0.70) - 0.60 = 0.30; j=1: max(0.20, 0.95) - 0.80 = 0.15; mean 0.225
    assert forgetting(matrix) == pytest.approx(0.225)
    assert summarize(matrix) == pytest.approx({"acc": 0.75, "bwt": -0.225, "fwt": 0.115, "forgetting": 0.225})


def test_forgetting_uses_rows_before_the_diagonal_when_measured():
    # Column 1 is best at row 0 (0.97, before experience 1 was trained): the max covers l < T-1.
    values = [[0.9, 0.97, NAN], [0.7, 0.95, NAN], [0.6, 0.8, 0.85]]
    assert forgetting(values) == pytest.approx(((0.9 - 0.6) + (0.97 - 0.8)) / 2)
    # ...while BWT measures against the diagonal only.
    assert backward_transfer(values) == pytest.approx(((0.6 - 0.9) + (0.8 - 0.95)) / 2)


def test_partial_matrix_after_two_experiences():
    partial = AccuracyMatrix(3)
    partial.record_baseline(1, 0.15)
    for (i, j), v in {(0, 0): 0.90, (0, 1): 0.20, (1, 0): 0.70, (1, 1): 0.95}.items():
        partial.record(i, j, v)
    assert partial.completed == 2
    assert average_accuracy(partial) == pytest.approx((0.70 + 0.95) / 2)
    assert backward_transfer(partial) == pytest.approx(0.70 - 0.90)
    assert forward_transfer(partial) == pytest.approx(0.20 - 0.15)
    assert forgetting(partial) == pytest.approx(0.90 - 0.70)


def test_after_argument_selects_the_prefix(matrix):
    assert average_accuracy(matrix, after=0) == pytest.approx(0.90)
    assert average_accuracy(matrix, after=1) == pytest.approx((0.70 + 0.95) / 2)
    assert summarize(matrix, after=0) == {"acc": pytest.approx(0.90), "bwt": None, "fwt": None, "forgetting": None}


def test_clear_errors_where_a_metric_does_not_apply(matrix):
    with pytest.raises(DataError, match="record_baseline"):
        forward_transfer(AccuracyMatrix.from_values(R))
    with pytest.raises(DataError, match="at least 2 trained experiences"):
        backward_transfer(matrix, after=0)
    with pytest.raises(DataError, match="no measurements"):
        average_accuracy(AccuracyMatrix(3))
    gappy = AccuracyMatrix.from_values([[0.9, NAN], [NAN, 0.8]], baseline=[0.1, 0.1])
    with pytest.raises(DataError, match=r"R\[1\]\[0\]"):
        average_accuracy(gappy)
    with pytest.raises(DataError, match=r"R\[0\]\[1\]"):
        forward_transfer(gappy)
    with pytest.raises(ConfigError, match="0..2"):
        average_accuracy(matrix, after=3)


def test_recording_refuses_bad_values_and_indices():
    m = AccuracyMatrix(2)
    with pytest.raises(DataError, match="fractions"):
        m.record(0, 0, 93.0)
    with pytest.raises(DataError, match="outside"):
        m.record(0, 0, float("nan"))
    with pytest.raises(ConfigError, match="0..1"):
        m.record(2, 0, 0.5)
    with pytest.raises(ConfigError, match="positive integer"):
        AccuracyMatrix(0)
    with pytest.raises(DataError, match="square"):
        AccuracyMatrix.from_values([[0.5, 0.5]])


def test_dict_round_trip_is_json_safe_with_none_for_nan(matrix):
    data = json.loads(json.dumps(matrix.to_dict(), allow_nan=False))  # allow_nan=False: no NaN may remain
    assert data["values"][0][2] is None and data["baseline"] == B
    back = AccuracyMatrix.from_dict(data)
    np.testing.assert_array_equal(back.values, matrix.values)  # NaN compares equal here
    np.testing.assert_array_equal(back.baseline, matrix.baseline)
    assert math.isnan(back[0, 2]) and back[2, 1] == 0.80
    assert AccuracyMatrix(2).to_dict() == {"values": [[None, None], [None, None]], "baseline": None}
    with pytest.raises(DataError, match="'values'"):
        AccuracyMatrix.from_dict({"rows": []})


def test_plot_writes_a_png(tmp_path, matrix):
    out = plot_accuracy_matrix(matrix, tmp_path / "matrix.png", title="split test")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["matrix.png"]  # no temporary file left behind
