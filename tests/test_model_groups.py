"""Per-module learning-rate scales and per-task encoders in MultiTaskModel."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mtl.config import TrainerConfig
from mtl.model import MultiTaskModel
from mtl.errors import ConfigError
from mtl.optim import build_optimizer


class TwoColumns(nn.Module):
    """A toy per-task encoder: one linear column per task, mixed by a scaled unit."""

    per_task = True

    def __init__(self):
        super().__init__()
        self.columns = nn.ModuleDict({"a": nn.Linear(4, 3), "b": nn.Linear(4, 3)})
        self.mix = nn.Linear(3, 3)
        self.mix.lr_scale = 10.0
        self.calls = []

    def forward(self, x, tasks):
        self.calls.append(list(tasks))
        return {t: self.mix(self.columns[t](x)) for t in tasks}


def test_parameter_groups_follow_lr_scale_and_cover_every_parameter_once():
    model = MultiTaskModel(TwoColumns(), {"a": nn.Linear(3, 2), "b": nn.Linear(3, 2)})
    groups = model.parameter_groups()
    scales = {g["lr_scale"]: {id(p) for p in g["params"]} for g in groups}
    assert set(scales) == {1.0, 10.0}
    assert scales[10.0] == {id(p) for p in model.encoder.mix.parameters()}
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    opt = build_optimizer(groups, TrainerConfig(lr=0.01))
    assert sorted(g["lr"] for g in opt.param_groups) == pytest.approx([0.01, 0.1])


def test_per_task_encoder_feeds_each_head_its_own_representation():
    model = MultiTaskModel(TwoColumns(), {"a": nn.Linear(3, 2), "b": nn.Linear(3, 2)})
    x = torch.randn(5, 4)
    out = model(x, tasks=["b"])
    assert list(out) == ["b"] and model.encoder.calls == [["b"]]
    enc = model.encoder
    assert torch.allclose(out["b"], model.heads["b"](enc.mix(enc.columns["b"](x))))


def test_adam_betas_come_from_the_config():
    params = [nn.Parameter(torch.zeros(2))]
    assert build_optimizer(params, TrainerConfig()).param_groups[0]["betas"] == (0.9, 0.999)
    opt = build_optimizer(params, TrainerConfig(optimizer="adamw", adam_beta1=0.5))
    assert opt.param_groups[0]["betas"] == (0.5, 0.999)
    with pytest.raises(ConfigError, match=r"adam_beta2 must be in \[0, 1\), got 1.0"):
        TrainerConfig(adam_beta2=1.0)
