"""delta_m in its three published variants, on LibMTL's NYUv2 table, and every bad input."""

from __future__ import annotations

import json
import logging

import pytest

from mtl.delta_m import (
    VARIANTS,
    Baseline,
    delta_m,
    format_delta_m,
    load_baseline,
    metric_directions,
    relative_changes,
    report_delta_m,
)
from mtl.errors import ConfigError, DataError
from mtl.tasks import classification_task, nyuv2_tasks

# LibMTL's published NYUv2 table (DESIGN.md), in the table's units (percent, metres, degrees).
# DESIGN.md transcribes all nine columns for EW but only six (no "within" fractions) for
# MGDA-UB, so the published-row test uses those six: normal task = mean and median angle.
EW = {
    "segmentation": {"mIoU": 54.10, "pixel_acc": 75.78},
    "depth": {"abs_err": 0.3771, "rel_err": 0.1596},
    "normal": {"mean_angle": 23.53, "median_angle": 17.20,
               "within_11.25": 34.55, "within_22.5": 60.75, "within_30": 72.06},
}
MGDA_UB = {
    "segmentation": {"mIoU": 50.15, "pixel_acc": 73.44},
    "depth": {"abs_err": 0.3839, "rel_err": 0.1563},
    "normal": {"mean_angle": 22.78, "median_angle": 16.05},
}
SIX = {
    "segmentation": {"mIoU": True, "pixel_acc": True},
    "depth": {"abs_err": False, "rel_err": False},
    "normal": {"mean_angle": False, "median_angle": False},
}

# Relative changes of MGDA-UB against EW, sign + = better:
#   mIoU        +(50.15 - 54.10) / 54.10   = -3.95 / 54.10   = -0.0730129
#   pixel_acc   +(73.44 - 75.78) / 75.78   = -2.34 / 75.78   = -0.0308789
#   abs_err     -(0.3839 - 0.3771) / 0.3771 = -0.0068 / 0.3771 = -0.0180323
#   rel_err     -(0.1563 - 0.1596) / 0.1596 = +0.0033 / 0.1596 = +0.0206767
#   mean_angle  -(22.78 - 23.53) / 23.53   = +0.75 / 23.53   = +0.0318742
#   median      -(16.05 - 17.20) / 17.20   = +1.15 / 17.20   = +0.0668605
# per_task_primary: (-0.0730129 - 0.0180323 + 0.0318742) / 3 = -0.0591710 / 3 = -1.97237 %
# all_metrics:      sum of the six = -0.0025127, / 6 = -0.041880 %
# per_task_average: ((-0.0730129 - 0.0308789) / 2 + (-0.0180323 + 0.0206767) / 2
#                    + (0.0318742 + 0.0668605) / 2) / 3
#                   = (-0.0519459 + 0.0013222 + 0.0493674) / 3 = -0.041880 % (equal to all_metrics:
#                   every task has two metrics here)
HAND = {"per_task_primary": -1.97237, "all_metrics": -0.041880, "per_task_average": -0.041880}


@pytest.mark.parametrize("variant", list(HAND))
def test_published_row_mgda_ub_against_ew(variant):
    value = delta_m(MGDA_UB, Baseline("LibMTL-EW", EW), SIX, variant)
    assert value == pytest.approx(HAND[variant], abs=5e-5)


def test_relative_changes_by_hand():
    changes = relative_changes(MGDA_UB, EW, SIX, "all_metrics")
    assert changes["segmentation"]["mIoU"] == pytest.approx(-3.95 / 54.10)
    assert changes["depth"]["abs_err"] == pytest.approx(-0.0068 / 0.3771)
    assert changes["normal"]["median_angle"] == pytest.approx(1.15 / 17.20)
    assert list(relative_changes(MGDA_UB, EW, SIX, "per_task_primary")["normal"]) == ["mean_angle"]


def test_nine_metrics_variants_differ():
    # EW with only within_11.25 improved by 10 % (34.55 -> 38.005): one of nine metrics changes by +0.1.
    # all_metrics: 0.1 / 9 = 1.1111 %; per_task_average: (0 + 0 + 0.1 / 5) / 3 = 0.6667 %;
    # per_task_primary: the primaries (mIoU, abs_err, mean_angle) are unchanged -> 0 %.
    better = {t: dict(ms) for t, ms in EW.items()}
    better["normal"]["within_11.25"] = 34.55 * 1.1
    tasks = nyuv2_tasks()
    assert delta_m(better, EW, tasks, "all_metrics") == pytest.approx(100 * 0.1 / 9)
    assert delta_m(better, EW, tasks, "per_task_average") == pytest.approx(100 * 0.1 / 15)
    assert delta_m(better, EW, tasks, "per_task_primary") == pytest.approx(0.0)
    for variant in VARIANTS:
        assert delta_m(EW, EW, tasks, variant) == 0.0


def test_sign_follows_each_metrics_direction():
    base = {"depth": {"abs_err": 0.5}, "seg": {"mIoU": 0.5}}
    dirs = {"depth": {"abs_err": False}, "seg": {"mIoU": True}}
    # lower error (0.4, -20 %) is better: +20 %; higher mIoU (0.6, +20 %) is better: +20 %
    assert delta_m({"depth": {"abs_err": 0.4}, "seg": {"mIoU": 0.6}}, base, dirs, "all_metrics") == pytest.approx(20.0)
    # both worse: -20 %
    assert delta_m({"depth": {"abs_err": 0.6}, "seg": {"mIoU": 0.4}}, base, dirs, "all_metrics") == pytest.approx(-20.0)
    # one better, one worse by the same amount: 0
    assert delta_m({"depth": {"abs_err": 0.4}, "seg": {"mIoU": 0.4}}, base, dirs, "all_metrics") == pytest.approx(0.0)


def test_directions_from_tasks_equal_the_explicit_mapping():
    dirs = metric_directions(nyuv2_tasks())
    assert dirs["segmentation"] == {"mIoU": True, "pixel_acc": True}
    assert dirs["depth"] == {"abs_err": False, "rel_err": False}
    assert list(dirs["normal"]) == ["mean_angle", "median_angle", "within_11.25", "within_22.5", "within_30"]
    full_result = {t: dict(ms) for t, ms in EW.items()}
    full_result["segmentation"]["mIoU"] = 50.0
    for variant in VARIANTS:
        assert delta_m(full_result, EW, nyuv2_tasks(), variant) == delta_m(full_result, EW, dirs, variant)


def test_per_task_primary_needs_only_primary_metrics():
    base = {"segmentation": {"mIoU": 54.10}, "depth": {"abs_err": 0.3771}, "normal": {"mean_angle": 23.53}}
    assert delta_m(MGDA_UB, base, SIX, "per_task_primary") == pytest.approx(HAND["per_task_primary"], abs=5e-5)
    with pytest.raises(DataError, match="has no metric 'pixel_acc' for task 'segmentation'"):
        delta_m(MGDA_UB, base, SIX, "all_metrics")


def test_format_names_variant_and_baseline():
    line = format_delta_m(-1.2345, "all_metrics", Baseline("stl-resnet50", EW))
    assert line == "delta_m (all_metrics, vs single-task baseline 'stl-resnet50') = -1.23% (positive = better)"
    assert format_delta_m(0.5, "per_task_primary", "stl") == (
        "delta_m (per_task_primary, vs single-task baseline 'stl') = +0.50% (positive = better)"
    )
    report = report_delta_m(MGDA_UB, Baseline("LibMTL-EW", EW), SIX, "per_task_primary")
    assert report == "delta_m (per_task_primary, vs single-task baseline 'LibMTL-EW') = -1.97% (positive = better)"


# ---------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------


def test_unknown_variant_names_the_three():
    msg = r"unknown delta_m variant 'mean'; choose one of 'per_task_primary', 'all_metrics', 'per_task_average'"
    with pytest.raises(ConfigError, match=msg):
        delta_m(MGDA_UB, EW, SIX, "mean")
    with pytest.raises(ConfigError, match=msg):
        format_delta_m(1.0, "mean", "stl")


def test_baseline_missing_task_or_metric():
    no_depth = {t: ms for t, ms in EW.items() if t != "depth"}
    with pytest.raises(DataError, match=r"single-task baseline 'stl' has no task 'depth' .*the baseline file/dict must contain \"depth\""):
        delta_m(MGDA_UB, Baseline("stl", no_depth), SIX, "all_metrics")
    no_rel = {**EW, "depth": {"abs_err": 0.3771}}
    with pytest.raises(DataError, match=r"has no metric 'rel_err' for task 'depth'.*variant 'per_task_average' needs it"):
        delta_m(MGDA_UB, Baseline("stl", no_rel), SIX, "per_task_average")


def test_results_missing_task_or_metric():
    with pytest.raises(DataError, match="the results have no task 'normal'"):
        delta_m({t: ms for t, ms in MGDA_UB.items() if t != "normal"}, EW, SIX, "all_metrics")
    with pytest.raises(DataError, match="the results of task 'normal' have no metric 'within_11.25'"):
        delta_m(MGDA_UB, EW, nyuv2_tasks(), "all_metrics")


def test_zero_and_non_finite_values():
    zero = {**EW, "depth": {"abs_err": 0.0, "rel_err": 0.1596}}
    with pytest.raises(DataError, match="has value 0 for metric 'abs_err' of task 'depth'"):
        delta_m(MGDA_UB, Baseline("stl", zero), SIX, "all_metrics")
    nan_result = {**MGDA_UB, "segmentation": {"mIoU": float("nan"), "pixel_acc": 73.44}}
    with pytest.raises(DataError, match="metric 'mIoU' of task 'segmentation' is nan"):
        delta_m(nan_result, EW, SIX, "all_metrics")
    with pytest.raises(DataError, match="metric 'mIoU' of task 'segmentation' is 'high', not a number"):
        delta_m(MGDA_UB, {**EW, "segmentation": {"mIoU": "high", "pixel_acc": 1.0}}, SIX, "all_metrics")


def test_bad_directions():
    with pytest.raises(ConfigError, match="direction of metric 'abs_err' of task 'depth' is 'lower'"):
        delta_m(MGDA_UB, EW, {"depth": {"abs_err": "lower"}}, "all_metrics")
    with pytest.raises(ConfigError, match="at least one task"):
        delta_m(MGDA_UB, EW, {}, "all_metrics")
    with pytest.raises(ConfigError, match="task 'depth' needs at least one metric"):
        delta_m(MGDA_UB, EW, {"depth": {}}, "all_metrics")
    with pytest.raises(ConfigError, match="Task objects or a mapping"):
        delta_m(MGDA_UB, EW, ["depth"], "all_metrics")


def test_unit_mismatch_is_warned(caplog):
    fractions = {"segmentation": {"mIoU": 0.5015}}
    with caplog.at_level(logging.WARNING, logger="mtl.delta_m"):
        delta_m(fractions, EW, {"segmentation": {"mIoU": True}}, "per_task_primary")
    assert "same units" in caplog.text


def test_load_baseline_from_json(tmp_path):
    path = tmp_path / "stl-resnet50.json"
    path.write_text(json.dumps(EW))
    base = load_baseline(path)
    assert base.name == "stl-resnet50" and base.values == EW and base.source == str(path)
    assert load_baseline(path, name="LibMTL-EW").name == "LibMTL-EW"
    value = delta_m(MGDA_UB, base, SIX, "per_task_primary")
    assert value == pytest.approx(HAND["per_task_primary"], abs=5e-5)
    # a missing metric names the file
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"segmentation": {"mIoU": 54.1}}))
    with pytest.raises(DataError, match=r"baseline 'partial' \(file .*partial.json\) has no task 'depth'"):
        delta_m(MGDA_UB, load_baseline(partial), SIX, "per_task_primary")


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "does not exist"),
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ("{}", "must be a JSON object"),
        ('{"depth": 0.37}', "task 'depth' maps to 0.37"),
        ('{"depth": {"abs_err": "0.37"}}', "metric 'abs_err' of task 'depth' is '0.37', not a number"),
        ('{"depth": {"abs_err": true}}', "metric 'abs_err' of task 'depth' is True, not a number"),
        ('{"depth": {"abs_err": NaN}}', "metric 'abs_err' of task 'depth' is nan"),
    ],
)
def test_load_baseline_bad_files(tmp_path, content, message):
    path = tmp_path / "stl.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_baseline(path)


def test_load_baseline_directory(tmp_path):
    with pytest.raises(DataError, match="is a directory"):
        load_baseline(tmp_path)


def test_classification_tasks_work_too():
    # any Task list: accuracy of two digit heads against a single-task baseline
    tasks = [classification_task("left", 10), classification_task("right", 10)]
    base = {"left": {"accuracy": 0.9723}, "right": {"accuracy": 0.9590}}
    result = {"left": {"accuracy": 0.9726}, "right": {"accuracy": 0.9590}}
    # Sener & Koltun's MGDA-UB vs single task: (0.0003 / 0.9723 + 0) / 2 = 0.015427 %
    assert delta_m(result, base, tasks, "per_task_primary") == pytest.approx(100 * 0.0003 / 0.9723 / 2)
