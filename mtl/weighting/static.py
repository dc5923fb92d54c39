"""Static weighting: fixed, user-given non-negative weights."""

from __future__ import annotations

import math

from ..errors import ConfigError
from .base import LinearWeighting


class StaticWeighting(LinearWeighting):
    """``weights`` maps every task to a weight >= 0; tasks left out get ``default``."""

    def __init__(self, task_names, weights: dict[str, float], default: float | None = None):
        super().__init__(task_names)
        unknown = sorted(set(weights) - set(self.task_names))
        if unknown:
            raise ConfigError(
                f"static weights name unknown task(s) {unknown}; the tasks are {self.task_names}. "
                "Write them as task=weight, e.g. --static-weights left=1.0,right=0.5."
            )
        missing = [t for t in self.task_names if t not in weights]
        if missing and default is None:
            raise ConfigError(f"static weights give no weight for task(s) {missing}; give every task a weight.")
        self.fixed = {t: float(weights.get(t, default)) for t in self.task_names}
        bad = {t: w for t, w in self.fixed.items() if not math.isfinite(w) or w < 0}
        if bad:
            raise ConfigError(f"static weights must be finite and >= 0, got {bad}.")
        if not any(self.fixed.values()):
            raise ConfigError("static weights are all zero: nothing would be trained; give one task a positive weight.")

    def weights(self):
        return dict(self.fixed)
