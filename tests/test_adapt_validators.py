"""Unsupervised validators: hand-computed scores, and the epoch they select."""

from __future__ import annotations

import math

import pytest
import torch

from adapt.validators import select_epoch, validator_scores
from mtl.errors import ConfigError


def test_scores_of_confident_diverse_and_collapsed_predictions():
    big = 50.0
    diverse = torch.eye(4) * big  # confident, one image per class
    collapsed = torch.zeros(4, 4)
    collapsed[:, 0] = big  # confident, every image in class 0
    uniform = torch.zeros(4, 4)  # no confidence at all
    d, c, u = validator_scores(diverse), validator_scores(collapsed), validator_scores(uniform)
    assert d["entropy"] == pytest.approx(0.0, abs=1e-12) and c["entropy"] == pytest.approx(0.0, abs=1e-12)
    assert u["entropy"] == pytest.approx(-math.log(4))
    # information maximisation: H(mean p) - mean H(p)
    assert d["information_maximization"] == pytest.approx(math.log(4))
    assert c["information_maximization"] == pytest.approx(0.0, abs=1e-12)  # entropy alone cannot tell c from d
    assert u["information_maximization"] == pytest.approx(0.0, abs=1e-12)


def test_a_hand_computed_two_class_case():
    logits = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])  # p = (3/4, 1/4) and (1/2, 1/2)
    h = [-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)), math.log(2)]
    mean_p = (0.625, 0.375)
    h_mean = -(mean_p[0] * math.log(mean_p[0]) + mean_p[1] * math.log(mean_p[1]))
    scores = validator_scores(logits)
    assert scores["entropy"] == pytest.approx(-(h[0] + h[1]) / 2)
    assert scores["information_maximization"] == pytest.approx(h_mean - (h[0] + h[1]) / 2)


def test_select_epoch_picks_the_highest_score():
    history = {"epochs": [{"epoch": e, "validation": {"information_maximization": s, "entropy": -s}}
                          for e, s in ((1, 0.2), (2, 0.9), (3, 0.5))]}
    assert select_epoch(history, "information_maximization") == 2
    assert select_epoch(history, "entropy") == 1
    with pytest.raises(ConfigError, match="unknown validator 'accuracy'"):
        select_epoch(history, "accuracy")
    with pytest.raises(ConfigError, match="no validation scores"):
        select_epoch({"epochs": [{"epoch": 1}]}, "entropy")
    with pytest.raises(ConfigError, match=r"\(N, classes\) logits"):
        validator_scores(torch.zeros(3))
