"""The two reference points of every continual table.

- ``finetune``: plain training on each experience in turn (the lower bound: it forgets).
- ``joint``: at each experience, training on the union of every experience seen so far
  (the upper bound of what the stream allows; trained in the stream's order so its
  accuracy matrix is comparable row by row).
"""

from __future__ import annotations

from torch.utils.data import ConcatDataset

from .base import Strategy


class FineTune(Strategy):
    name = "finetune"


class Joint(Strategy):
    name = "joint"

    def train_data(self, learner, experience):
        from ..learner import ExperienceData

        seen = [e for e in learner.stream if e.index <= experience.index]
        return ConcatDataset([ExperienceData(e, learner, "train") for e in seen])
