"""Source only: the label loss on the source domain, no adaptation (the lower baseline).

Target only, the oracle that trains on labelled target data, is the same objective on
a pairing whose "source" is the labelled target training split (``adapt_digits.py``
builds it so); no other method ever receives target labels.
"""

from __future__ import annotations

from .base import AdaptationMethod, encode, split_batch


class SourceOnly(AdaptationMethod):
    loss_names = ["classification"]

    def losses(self, model, batch):
        x_s, y_s, _ = split_batch(batch)  # the target images are not used
        z_s = encode(model, x_s)
        return {"classification": self.classification(model, z_s, y_s)}, z_s
