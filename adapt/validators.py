"""Unsupervised model selection: scores of a model's predictions on unlabelled target data.

Target labels are not available in unsupervised adaptation, so checkpoints and
hyper-parameters have to be chosen from the target images alone. Both scores are
higher-is-better and read only the model's class probabilities p(y | x_t):

- ``entropy``: minus the mean prediction entropy, -E_x[H(p(.|x))]. Confident predictions
  on the target score high (the criterion entropy minimisation optimises; Morerio et al.
  2018 use it for model selection).
- ``information_maximization``: H(E_x[p(.|x)]) - E_x[H(p(.|x))], the mutual information
  between inputs and predicted labels (Gomes, Krause & Perona 2010; Shi & Sha 2012):
  confident AND diverse predictions. Entropy alone is fooled by a model that puts every
  target image in one class; the first term punishes that.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from mtl.errors import ConfigError

VALIDATORS = ("entropy", "information_maximization")


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * p.clamp_min(1e-12).log()).sum(-1)


def validator_scores(logits: torch.Tensor) -> dict[str, float]:
    """Both scores of one set of target predictions, ``logits`` of shape (N, C)."""
    if logits.dim() != 2 or len(logits) == 0:
        raise ConfigError(f"validators need (N, classes) logits of at least one image, got shape {tuple(logits.shape)}.")
    p = logits.double().softmax(dim=1)
    mean_entropy = float(_entropy(p).mean())
    return {"entropy": -mean_entropy, "information_maximization": float(_entropy(p.mean(0))) - mean_entropy}


@torch.no_grad()
def score_unlabelled(model, images, head: str = "label", batch_size: int = 256) -> dict[str, float]:
    """The validators on a data set of unlabelled images (e.g. ``Unlabelled(target_train)``)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    logits = [model(x.to(device), tasks=[head])[head].float().cpu()
              for x in DataLoader(images, batch_size=batch_size, shuffle=False)]
    model.train(was_training)
    return validator_scores(torch.cat(logits))


def select_epoch(history: dict, validator: str) -> int:
    """The (1-based) epoch whose recorded validation score under ``validator`` is highest."""
    if validator not in VALIDATORS:
        raise ConfigError(f"unknown validator '{validator}'; choose one of: {', '.join(VALIDATORS)}.")
    scores = [(record["validation"][validator], record["epoch"]) for record in history["epochs"]
              if "validation" in record]
    if not scores:
        raise ConfigError("the history has no validation scores; train with the validation hook "
                          "(adapt_digits.py records them every epoch).")
    return max(scores)[1]
