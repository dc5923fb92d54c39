"""Uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018).

Each task has a learned log-variance ``s_t = log sigma_t^2``. Following the paper's
eq. (7) and (10), a classification (softmax) likelihood contributes
``exp(-s) L + s / 2`` (the 1/sigma^2 L + log sigma form) and a Gaussian regression
likelihood ``exp(-s) L / 2 + s / 2`` (the 1/(2 sigma^2) L + log sigma form).
Some public implementations use the regression form for every task; we follow
the paper and pick the form from each task's likelihood.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from .base import LinearWeighting

_SCALE = {"classification": 1.0, "regression": 0.5}


class UncertaintyWeighting(LinearWeighting):
    def __init__(self, task_names, likelihoods: dict[str, str] | None = None, init_log_var: float = 0.0):
        super().__init__(task_names)
        likelihoods = likelihoods or {}
        bad = {t: k for t, k in likelihoods.items() if k not in _SCALE}
        if bad:
            raise ConfigError(f"unknown likelihood(s) {bad}; use 'classification' or 'regression'.")
        self.scales = [_SCALE[likelihoods.get(t, "classification")] for t in self.task_names]
        self.log_vars = nn.Parameter(torch.full((len(self.task_names),), float(init_log_var)))

    def weights(self):
        w = torch.exp(-self.log_vars)
        return {t: self.scales[i] * w[i] for i, t in enumerate(self.task_names)}

    def regulariser(self):
        return 0.5 * self.log_vars.sum()
