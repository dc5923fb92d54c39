"""Feature alignment by a statistic of the two domains: MMD and CORAL.

- ``mmd``: the label loss plus the multi-kernel Gaussian MMD^2 between source and
  target features (Long et al. 2015, DAN; here on the encoder's output, the layer the
  heads read, where DAN aligns its last task-specific layers).
- ``coral``: the label loss plus Deep CORAL's distance between the feature
  covariances (Sun & Saenko 2016, eq. 1).

The alignment loss's weight is the static weighting's (``--align-weight``).
"""

from __future__ import annotations

from ..losses import CORAL, GaussianMMD
from .base import AdaptationMethod, split_batch


class FeatureAlignment(AdaptationMethod):
    """The label loss and ``distance(z_s, z_t)``, named ``name``."""

    def __init__(self, label_task, name: str, distance):
        super().__init__(label_task)
        self.loss_names = ["classification", name]
        self.name, self.distance = name, distance

    def losses(self, model, batch):
        x_s, y_s, x_t = split_batch(batch)
        z, z_s, z_t = self.features(model, x_s, x_t)
        return {"classification": self.classification(model, z_s, y_s),
                self.name: self.distance(z_s.flatten(1).float(), z_t.flatten(1).float())}, z


def mmd(label_task, estimator: str = "quadratic") -> FeatureAlignment:
    return FeatureAlignment(label_task, "mmd", GaussianMMD(estimator=estimator))


def coral(label_task) -> FeatureAlignment:
    return FeatureAlignment(label_task, "coral", CORAL())
