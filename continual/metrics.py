"""The accuracy matrix of a continual run and the standard metrics computed from it.

``R[i][j]`` is the test accuracy on experience ``j`` after training experience ``i``
(0-based, a fraction in [0, 1], NaN where not measured). A run usually fills the lower
triangle (every seen experience after each step); the cells just above the diagonal,
``R[j-1][j]``, are needed for forward transfer, together with the baseline ``b[j]``: the
accuracy of the model at initialisation on experience ``j``.

Definitions (T experiences; with ``after=k-1`` the same formulas on the first k):

- ACC = 1/T sum_j R[T-1][j]                        (Lopez-Paz & Ranzato 2017, GEM)
- BWT = 1/(T-1) sum_{j<T-1} (R[T-1][j] - R[j][j])   (Lopez-Paz & Ranzato 2017)
- FWT = 1/(T-1) sum_{j>=1} (R[j-1][j] - b[j])       (Lopez-Paz & Ranzato 2017)
- forgetting = 1/(T-1) sum_{j<T-1} (max_{l<T-1} R[l][j] - R[T-1][j])
                                                    (Chaudhry et al. 2018, RWalk)
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

from mtl.errors import ConfigError, DataError


def _missing(value) -> bool:
    """True for the marks of an unmeasured cell: None or NaN."""
    return value is None or (isinstance(value, (float, np.floating)) and math.isnan(value))


def _check_accuracy(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise DataError(f"{where}: an accuracy must be a number in [0, 1], got {value!r}.")
    value = float(value)
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        hint = " Give accuracies as fractions (0.93, not 93)." if math.isfinite(value) and value > 1 else ""
        raise DataError(f"{where}: accuracy {value!r} is outside [0, 1].{hint}")
    return value


class AccuracyMatrix:
    """``T x T`` test accuracies of a continual run, plus an optional random-init baseline.

    Fill it with ``record(after, on, accuracy)`` and ``record_baseline(on, accuracy)``;
    read cells with ``matrix[i, j]`` (NaN when not measured). ``to_dict`` / ``from_dict``
    give a JSON-safe form (NaN as None) for checkpoints and result files.
    """

    def __init__(self, num_experiences: int):
        if isinstance(num_experiences, bool) or not isinstance(num_experiences, (int, np.integer)) \
                or num_experiences < 1:
            raise ConfigError(f"num_experiences must be a positive integer, got {num_experiences!r}.")
        self.num_experiences = int(num_experiences)
        self._values = np.full((self.num_experiences, self.num_experiences), np.nan)
        self._baseline: np.ndarray | None = None

    @classmethod
    def from_values(cls, values, baseline=None) -> "AccuracyMatrix":
        """A matrix from a square array-like (NaN or None where not measured) and an optional baseline."""
        try:
            rows = [list(row) for row in values]
        except TypeError:
            raise DataError(f"an accuracy matrix must be a T x T list of rows, got {values!r}.") from None
        if not rows or any(len(row) != len(rows) for row in rows):
            raise DataError(f"an accuracy matrix must be square (T x T, T >= 1); got rows of lengths "
                            f"{[len(row) for row in rows]}.")
        matrix = cls(len(rows))
        for i, row in enumerate(rows):
            for j, v in enumerate(row):
                if not _missing(v):
                    matrix.record(i, j, v)
        if baseline is not None:
            baseline = list(baseline)
            if len(baseline) != len(rows):
                raise DataError(f"the baseline has {len(baseline)} entries but the matrix {len(rows)} experiences; "
                                "give one random-init accuracy per experience.")
            for j, v in enumerate(baseline):
                if not _missing(v):
                    matrix.record_baseline(j, v)
        return matrix

    def _index(self, value, name: str) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) \
                or not 0 <= value < self.num_experiences:
            raise ConfigError(f"{name} must be an experience index 0..{self.num_experiences - 1}, got {value!r}.")
        return int(value)

    def record(self, after: int, on: int, accuracy: float) -> None:
        """Store the accuracy on experience ``on`` measured after training experience ``after``."""
        i, j = self._index(after, "after"), self._index(on, "on")
        self._values[i, j] = _check_accuracy(accuracy, f"R[{i}][{j}]")

    def record_baseline(self, on: int, accuracy: float) -> None:
        """Store the accuracy of the model at initialisation on experience ``on`` (for FWT)."""
        j = self._index(on, "on")
        if self._baseline is None:
            self._baseline = np.full(self.num_experiences, np.nan)
        self._baseline[j] = _check_accuracy(accuracy, f"b[{j}]")

    def __getitem__(self, cell: tuple[int, int]) -> float:
        i, j = cell
        return float(self._values[self._index(i, "row"), self._index(j, "column")])

    @property
    def values(self) -> np.ndarray:
        """A copy of the ``T x T`` float array (NaN where not measured)."""
        return self._values.copy()

    @property
    def baseline(self) -> np.ndarray | None:
        """A copy of the baseline vector (NaN where not measured), or None if none was recorded."""
        return None if self._baseline is None else self._baseline.copy()

    @property
    def completed(self) -> int:
        """Number of experiences trained so far: one past the last row holding a measurement."""
        measured = np.flatnonzero(~np.isnan(self._values).all(axis=1))
        return int(measured[-1]) + 1 if len(measured) else 0

    def to_dict(self) -> dict:
        """JSON-safe form: ``{"values": T x T lists, "baseline": list or None}``, NaN written as None."""
        def clean(row):
            return [None if math.isnan(v) else float(v) for v in row]

        return {"values": [clean(row) for row in self._values],
                "baseline": None if self._baseline is None else clean(self._baseline)}

    @classmethod
    def from_dict(cls, data: dict) -> "AccuracyMatrix":
        """Rebuild a matrix from ``to_dict``'s output; a malformed dict is a DataError naming the problem."""
        if not isinstance(data, dict) or not isinstance(data.get("values"), list):
            raise DataError(f"an accuracy-matrix dict needs a 'values' list of rows (as to_dict writes); "
                            f"got {type(data).__name__} with keys {sorted(data) if isinstance(data, dict) else '-'}.")
        if any(not isinstance(row, list) for row in data["values"]):
            raise DataError("an accuracy-matrix dict's 'values' must be a list of lists (rows).")
        return cls.from_values(data["values"], data.get("baseline"))

    def __repr__(self) -> str:
        return f"AccuracyMatrix(num_experiences={self.num_experiences}, completed={self.completed})"


# -- metrics ---------------------------------------------------------------------------------


def _prefix(matrix, after: int | None, metric: str, need_two: bool) -> tuple[AccuracyMatrix, int]:
    """The matrix and k, the number of experiences the metric covers (``after + 1``)."""
    if not isinstance(matrix, AccuracyMatrix):
        matrix = AccuracyMatrix.from_values(matrix)
    if after is None:
        k = matrix.completed
        if k == 0:
            raise DataError(f"{metric}: the accuracy matrix holds no measurements yet.")
    else:
        k = matrix._index(after, "after") + 1
    if need_two and k < 2:
        raise DataError(f"{metric} compares experiences, so it needs at least 2 trained experiences; "
                        f"it was asked after experience {k - 1}.")
    return matrix, k


def _cell(matrix: AccuracyMatrix, i: int, j: int, metric: str) -> float:
    value = matrix[i, j]
    if math.isnan(value):
        raise DataError(f"{metric} needs R[{i}][{j}] (accuracy on experience {j} after training experience {i}), "
                        "which was not measured; evaluate every experience it needs and record it.")
    return value


def average_accuracy(matrix: AccuracyMatrix | Sequence, after: int | None = None) -> float:
    """ACC (Lopez-Paz & Ranzato 2017, GEM): mean accuracy over the first k experiences after training the k-th.

    ``after`` is the 0-based index of the last trained experience (k = after + 1); by
    default the last row holding a measurement, so a partial matrix gives ACC so far.
    """
    matrix, k = _prefix(matrix, after, "ACC", need_two=False)
    return sum(_cell(matrix, k - 1, j, "ACC") for j in range(k)) / k


def backward_transfer(matrix: AccuracyMatrix | Sequence, after: int | None = None) -> float:
    """BWT (Lopez-Paz & Ranzato 2017): mean change on earlier experiences since each was trained.

    1/(k-1) sum_{j<k-1} (R[k-1][j] - R[j][j]); negative values mean forgetting.
    """
    matrix, k = _prefix(matrix, after, "BWT", need_two=True)
    return sum(_cell(matrix, k - 1, j, "BWT") - _cell(matrix, j, j, "BWT") for j in range(k - 1)) / (k - 1)


def forward_transfer(matrix: AccuracyMatrix | Sequence, after: int | None = None) -> float:
    """FWT (Lopez-Paz & Ranzato 2017): how much training on earlier experiences helps a new one before it is trained.

    1/(k-1) sum_{j=1}^{k-1} (R[j-1][j] - b[j]), with b the random-init baseline
    (``record_baseline``): it needs the cells just above the diagonal and the baseline.
    """
    matrix, k = _prefix(matrix, after, "FWT", need_two=True)
    baseline = matrix.baseline
    if baseline is None:
        raise DataError("FWT needs the random-init baseline b[j] (accuracy of the untrained model on each "
                        "experience); record it with record_baseline(j, accuracy) before training.")
    total = 0.0
    for j in range(1, k):
        if math.isnan(baseline[j]):
            raise DataError(f"FWT needs the baseline b[{j}] (untrained model on experience {j}), which was not "
                            "recorded; use record_baseline.")
        total += _cell(matrix, j - 1, j, "FWT") - float(baseline[j])
    return total / (k - 1)


def forgetting(matrix: AccuracyMatrix | Sequence, after: int | None = None) -> float:
    """Average forgetting (Chaudhry et al. 2018, RWalk): best earlier accuracy minus the current one.

    1/(k-1) sum_{j<k-1} (max_{l<k-1} R[l][j] - R[k-1][j]). The max runs over the measured
    cells of column j in rows 0..k-2 (rows before j count if they were measured, as in the
    paper's definition); R[j][j] must be among them.
    """
    matrix, k = _prefix(matrix, after, "forgetting", need_two=True)
    values = matrix.values
    total = 0.0
    for j in range(k - 1):
        _cell(matrix, j, j, "forgetting")
        best = float(np.nanmax(values[: k - 1, j]))
        total += best - _cell(matrix, k - 1, j, "forgetting")
    return total / (k - 1)


def summarize(matrix: AccuracyMatrix | Sequence, after: int | None = None) -> dict[str, float | None]:
    """ACC, BWT, FWT and forgetting in one dict; None where a metric does not apply yet.

    BWT, FWT and forgetting are None after a single experience, FWT also without a baseline;
    a cell that a metric needs but that was not measured is still an error.
    """
    if not isinstance(matrix, AccuracyMatrix):
        matrix = AccuracyMatrix.from_values(matrix)
    _, k = _prefix(matrix, after, "summary", need_two=False)
    after = k - 1
    several = k >= 2
    return {
        "acc": average_accuracy(matrix, after),
        "bwt": backward_transfer(matrix, after) if several else None,
        "fwt": forward_transfer(matrix, after) if several and matrix.baseline is not None else None,
        "forgetting": forgetting(matrix, after) if several else None,
    }


# -- plot ------------------------------------------------------------------------------------


def plot_accuracy_matrix(matrix: AccuracyMatrix | Sequence, path: str | Path,
                         title: str | None = "accuracy matrix") -> Path:
    """Heat map of R in percent, each measured cell written in; rows: after training i, columns: tested on j.

    Unmeasured cells stay blank. The PNG is written atomically (a crash never leaves half a file).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mtl.plotting import save_figure

    if not isinstance(matrix, AccuracyMatrix):
        matrix = AccuracyMatrix.from_values(matrix)
    values = 100.0 * matrix.values
    t = matrix.num_experiences
    side = max(4.0, 0.6 * t + 2.0)
    fig, ax = plt.subplots(figsize=(side + 1.0, side))
    image = ax.imshow(np.ma.masked_invalid(values), cmap="viridis", vmin=0.0, vmax=100.0)
    fig.colorbar(image, ax=ax, label="test accuracy (%)")
    if t <= 30:  # beyond that the numbers would not fit in their cells
        for i in range(t):
            for j in range(t):
                if not math.isnan(values[i, j]):
                    ax.text(j, i, f"{values[i, j]:.1f}", ha="center", va="center", fontsize=8,
                            color="black" if values[i, j] > 60 else "white")
    ticks = list(range(t)) if t <= 30 else list(range(0, t, max(1, t // 10)))
    ax.set(xticks=ticks, yticks=ticks, xlabel="evaluated on experience j", ylabel="after training experience i")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    save_figure(fig, path)
    return Path(path)
