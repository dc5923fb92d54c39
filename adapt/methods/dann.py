"""DANN: domain-adversarial training (Ganin & Lempitsky 2015; Ganin et al., JMLR 2016).

The model is one ``MultiTaskModel`` with two heads on the shared features: ``"label"``
and ``"domain"``, a ``DomainClassifier`` behind a gradient-reversal layer. The domain
head learns to tell the domains apart; the reversed gradient pushes the encoder
towards features it cannot tell apart. Losses (JMLR eq. 9 / 18):

    classification = mean over the source batch of the label loss
    domain         = mean_source BCE(d, 0) + mean_target BCE(d, 1)

summed by a static weighting. The reversal's lambda follows the paper's schedule
lambda_p = 2 / (1 + exp(-10 p)) - 1 with p the progress over the whole run (section
5.2.2), and with ``anneal_lr`` the learning rate follows mu_p = mu_0 / (1 + 10 p)^0.75.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..losses import GradientReversal, dann_lambda, dann_lr_factor
from .base import AdaptationMethod, split_batch, unwrap

DOMAIN = "domain"


class DomainClassifier(nn.Module):
    """Gradient reversal, then an MLP to one logit (target = 1): the paper's domain regressor."""

    def __init__(self, in_features: int, hidden: int = 100, layers: int = 2):
        super().__init__()
        self.reversal = GradientReversal()
        blocks: list[nn.Module] = []
        width = in_features
        for _ in range(layers - 1):
            blocks += [nn.Linear(width, hidden), nn.ReLU(inplace=True)]
            width = hidden
        blocks.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*blocks)

    def forward(self, z):
        return self.net(self.reversal(z.flatten(1))).squeeze(1)


class DANN(AdaptationMethod):
    loss_names = ["classification", DOMAIN]

    def __init__(self, label_task, schedule: bool = True, anneal_lr: bool = True, gamma: float = 10.0):
        super().__init__(label_task)
        self.schedule, self.anneal_lr, self.gamma = schedule, anneal_lr, gamma
        self.lambda_ = 0.0 if schedule else 1.0

    def set_progress(self, progress: float) -> None:
        if self.schedule:
            self.lambda_ = dann_lambda(progress, self.gamma)

    def lr_factor(self, progress: float) -> float | None:
        return dann_lr_factor(progress) if self.anneal_lr else None

    def losses(self, model, batch):
        net = unwrap(model)
        self.check_model(net, heads=("label", DOMAIN))
        net.heads[DOMAIN].reversal.lambda_ = self.lambda_
        x_s, y_s, x_t = split_batch(batch)
        z, z_s, _ = self.features(model, x_s, x_t)
        logits = net.decode(z, [DOMAIN])[DOMAIN].float()
        n_s = len(x_s)
        domain = (F.binary_cross_entropy_with_logits(logits[:n_s], torch.zeros_like(logits[:n_s]))
                  + F.binary_cross_entropy_with_logits(logits[n_s:], torch.ones_like(logits[n_s:])))
        return {"classification": self.classification(model, z_s, y_s), DOMAIN: domain}, z
