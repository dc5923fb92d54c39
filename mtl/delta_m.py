"""delta_m: a multi-task model's mean relative change against a single-task baseline, by name.

Three definitions are published, and they give different numbers for the same run; every
function here takes the variant by name, and ``format_delta_m`` prints it with the baseline's
name. With ``M_m`` the multi-task model's value of a metric, ``M_b`` the single-task
baseline's, and ``s = +1`` where higher is better, ``-1`` where lower is better, the relative
change of one metric is ``r = s * (M_m - M_b) / M_b``. Then:

- ``"per_task_primary"`` (Maninis et al. 2019, "Attentive single-tasking of multiple tasks";
  Vandenhende et al. 2021, "Multi-task learning for dense prediction tasks: a survey"):
  ``delta_m = 1/T sum_t r_t`` over the T tasks, with one metric per task, its primary metric
  (``Task.metrics[0]``).
- ``"all_metrics"`` (Liu et al. 2021, CAGrad; Navon et al. 2022, Nash-MTL):
  ``delta_m = 1/K sum_k r_k`` over all K metrics of all tasks (the nine NYUv2 metrics).
- ``"per_task_average"`` (Lin & Zhang, LibMTL's ``count_improvement``):
  ``delta_m = 1/T sum_t (1/K_t sum_{k in t} r_k)``, the mean over tasks of each task's mean.

All three are returned in percent with one sign convention: **positive means better than the
baseline** (as Maninis et al., Vandenhende et al. and LibMTL print it). CAGrad and Nash-MTL
print the same quantity with the opposite sign (a "drop", lower is better): compare their
column with ``-delta_m(..., variant="all_metrics")``. ``all_metrics`` and
``per_task_average`` agree whenever every task has the same number of metrics.

Relative changes do not depend on units, but the result and the baseline must share them: this
library's fractions (mIoU 0.5410) against a table's percent (54.10) would be wrong by a factor
of 100 per metric; ``delta_m`` logs a warning when a ratio looks like that.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError, DataError

logger = logging.getLogger(__name__)

VARIANTS: dict[str, str] = {
    "per_task_primary": "mean over tasks of the primary metric's relative change "
    "(Maninis et al. 2019; Vandenhende et al. 2021)",
    "all_metrics": "mean over all metrics of all tasks (CAGrad, Liu et al. 2021; Nash-MTL, Navon et al. 2022)",
    "per_task_average": "mean over tasks of the mean relative change of each task's metrics (LibMTL)",
}

Values = Mapping[str, Mapping[str, float]]
Directions = Mapping[str, Mapping[str, bool]]

_FORMAT_HINT = 'a JSON object {task: {metric: value}}, e.g. {"depth": {"abs_err": 0.3771, "rel_err": 0.1596}}'


@dataclass(frozen=True)
class Baseline:
    """Single-task results ``{task: {metric: value}}`` under a name (printed with every delta_m)."""

    name: str
    values: dict[str, dict[str, float]]
    source: str | None = field(default=None, compare=False)  # the file it came from, for error messages

    def where(self) -> str:
        return f"single-task baseline '{self.name}'" + (f" (file {self.source})" if self.source else "")


def _check_variant(variant: str) -> str:
    if variant not in VARIANTS:
        names = ", ".join(f"'{v}'" for v in VARIANTS)
        raise ConfigError(f"unknown delta_m variant {variant!r}; choose one of {names}.")
    return variant


def _number(value, what: str, error=DataError) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise error(f"{what} is {value!r}, not a number.")
    value = float(value)
    if not math.isfinite(value):
        raise error(f"{what} is {value}; it must be finite (a NaN metric usually means an empty split).")
    return value


def _validated_values(values, where: str) -> dict[str, dict[str, float]]:
    if not isinstance(values, Mapping) or not values:
        raise DataError(f"{where} must be {_FORMAT_HINT}; got {values!r}.")
    out: dict[str, dict[str, float]] = {}
    for task, metrics in values.items():
        if not isinstance(metrics, Mapping):
            raise DataError(f"{where}: task '{task}' maps to {metrics!r}; expected {{metric: value}} ({_FORMAT_HINT}).")
        out[str(task)] = {str(m): _number(v, f"{where}: metric '{m}' of task '{task}'") for m, v in metrics.items()}
    return out


def load_baseline(path: str | Path, name: str | None = None) -> Baseline:
    """Read a single-task baseline from a JSON file ``{task: {metric: value}}``; its name defaults to the file stem."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise DataError(f"single-task baseline file {path} {what}; write {_FORMAT_HINT}.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"single-task baseline file {path} is not valid JSON ({exc}); it must hold {_FORMAT_HINT}.") from exc
    values = _validated_values(data, f"single-task baseline file {path}")
    return Baseline(name or path.stem, values, str(path))


def _as_baseline(baseline) -> Baseline:
    if isinstance(baseline, Baseline):
        return Baseline(baseline.name, _validated_values(baseline.values, baseline.where()), baseline.source)
    return Baseline("baseline", _validated_values(baseline, "the single-task baseline"))


def metric_directions(tasks) -> dict[str, dict[str, bool]]:
    """``{task: {metric: higher_is_better}}`` from ``Task`` objects or an explicit mapping of that shape.

    Within a task the first metric is the primary one (``Task.metrics[0]``; a mapping's first key).
    """
    if isinstance(tasks, Mapping):
        items = list(tasks.items())
    elif isinstance(tasks, Iterable) and not isinstance(tasks, (str, bytes)):
        items = []
        for task in tasks:
            if not (hasattr(task, "name") and hasattr(task, "metrics")):
                raise ConfigError(f"metric directions come from Task objects or a mapping; got {task!r}.")
            names = [m.name for m in task.metrics]
            if len(set(names)) != len(names):
                raise ConfigError(f"task '{task.name}' has two metrics of one name among {names}; rename one.")
            items.append((task.name, {m.name: m.higher_is_better for m in task.metrics}))
    else:
        raise ConfigError(
            f"metric directions come from a list of Tasks or a mapping {{task: {{metric: higher_is_better}}}}; "
            f"got {tasks!r}."
        )
    if not items:
        raise ConfigError("delta_m needs at least one task with metric directions; got none.")
    out: dict[str, dict[str, bool]] = {}
    for task, metrics in items:
        if not isinstance(metrics, Mapping) or not metrics:
            raise ConfigError(
                f"task '{task}' needs at least one metric with its direction, {{metric: higher_is_better}}; got {metrics!r}."
            )
        for metric, higher in metrics.items():
            if not isinstance(higher, bool):
                raise ConfigError(
                    f"direction of metric '{metric}' of task '{task}' is {higher!r}; "
                    "give True (higher is better) or False (lower is better)."
                )
        out[str(task)] = {str(m): h for m, h in metrics.items()}
    return out


def _needed(directions: dict[str, dict[str, bool]], variant: str) -> dict[str, dict[str, bool]]:
    if variant == "per_task_primary":
        return {t: dict([next(iter(ms.items()))]) for t, ms in directions.items()}
    return directions


def relative_changes(results: Values, baseline, tasks, variant: str = "all_metrics") -> dict[str, dict[str, float]]:
    """Signed relative change ``s * (M_m - M_b) / M_b`` (a fraction, positive = better) of every metric the variant uses."""
    variant = _check_variant(variant)
    base = _as_baseline(baseline)
    needed = _needed(metric_directions(tasks), variant)
    if not isinstance(results, Mapping):
        raise DataError(f"results must be {{task: {{metric: value}}}} as Trainer.evaluate returns; got {results!r}.")
    changes: dict[str, dict[str, float]] = {}
    for task, metrics in needed.items():
        if task not in base.values:
            raise DataError(
                f"{base.where()} has no task '{task}' (it has {sorted(base.values)}); delta_m variant '{variant}' "
                f"needs metrics {list(metrics)} of it: the baseline file/dict must contain \"{task}\": "
                "{metric: value, ...}."
            )
        if task not in results or not isinstance(results[task], Mapping):
            raise DataError(
                f"the results have no task '{task}' (they have {sorted(results)}); evaluate every task whose "
                f"metrics delta_m '{variant}' uses, or leave it out of the tasks."
            )
        changes[task] = {}
        for metric, higher in metrics.items():
            if metric not in base.values[task]:
                raise DataError(
                    f"{base.where()} has no metric '{metric}' for task '{task}' (it has {sorted(base.values[task])}); "
                    f"delta_m variant '{variant}' needs it: the baseline file/dict must contain "
                    f"\"{task}\": {{\"{metric}\": value}}."
                )
            if metric not in results[task]:
                raise DataError(
                    f"the results of task '{task}' have no metric '{metric}' (they have {sorted(results[task])}), "
                    f"which delta_m variant '{variant}' needs."
                )
            b = base.values[task][metric]
            m = _number(results[task][metric], f"the result for metric '{metric}' of task '{task}'")
            if b == 0:
                raise DataError(
                    f"{base.where()} has value 0 for metric '{metric}' of task '{task}': a relative change "
                    "against 0 is undefined. Fix the baseline, or use a variant or task set without that metric."
                )
            ratio = abs(m / b) if m != 0 else 1.0
            if 20 <= ratio or ratio <= 0.05:
                logger.warning(
                    "delta_m: metric '%s' of task '%s' is %g against %g in %s, a factor of %.3g: "
                    "check that both use the same units (fractions vs percent).",
                    metric, task, m, b, base.where(), ratio,
                )
            changes[task][metric] = (1.0 if higher else -1.0) * (m - b) / b
    return changes


def delta_m(results: Values, baseline, tasks, variant: str) -> float:
    """delta_m in percent (positive = better than the baseline) for the named variant.

    ``results``: ``{task: {metric: value}}`` of the multi-task model (``Trainer.evaluate``);
    ``baseline``: a ``Baseline`` (``load_baseline``) or a plain dict of the same shape;
    ``tasks``: the ``Task`` objects, or ``{task: {metric: higher_is_better}}``, naming the tasks and
    metrics that count, their directions and (first metric) each task's primary metric;
    ``variant``: ``"per_task_primary"``, ``"all_metrics"`` or ``"per_task_average"``.
    """
    variant = _check_variant(variant)
    changes = relative_changes(results, baseline, tasks, variant)
    if variant == "all_metrics":
        values = [r for metrics in changes.values() for r in metrics.values()]
        return 100.0 * sum(values) / len(values)
    per_task = [sum(metrics.values()) / len(metrics) for metrics in changes.values()]
    return 100.0 * sum(per_task) / len(per_task)


def format_delta_m(value: float, variant: str, baseline: Baseline | str) -> str:
    """``delta_m (all_metrics, vs single-task baseline 'stl-resnet50') = -1.23% (positive = better)``."""
    variant = _check_variant(variant)
    name = baseline.name if isinstance(baseline, Baseline) else str(baseline)
    return f"delta_m ({variant}, vs single-task baseline '{name}') = {value:+.2f}% (positive = better)"


def report_delta_m(results: Values, baseline: Baseline, tasks, variant: str) -> str:
    """``delta_m`` computed and formatted in one call."""
    return format_delta_m(delta_m(results, baseline, tasks, variant), variant, baseline)
