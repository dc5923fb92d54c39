"""Equal weighting: the plain sum of the task losses."""

from .base import LinearWeighting


class EqualWeighting(LinearWeighting):
    def weights(self):
        return {t: 1.0 for t in self.task_names}
