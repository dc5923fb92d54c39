"""Progressive Neural Networks (Rusu et al., 2016, arXiv:1606.04671, section 2).

- ``pnn``: one column (a fully connected network) per task. When task k first appears a
  new column is added and every earlier column is frozen; column k's hidden layers read
  its own previous layer and, through lateral connections, the previous layer of every
  earlier column (section 2's lateral equation):

      h_i^(k) = f(W_i^(k) h_{i-1}^(k) + sum_{j<k} U_i^(k:j) h_{i-1}^(j)),   i >= 2

  (layer 1 reads the image, which every column shares, so it has no laterals). Task k's
  head reads column k's last hidden layer. Frozen columns and heads never change, so the
  accuracy on an old task stays exactly what it was: no forgetting by construction, at
  the price of a model that grows with every task and needs the task id at test time.

This is the plain, linear lateral form: the paper's non-linear adapters (section 2, a
learned scale alpha and a dimensionality-reducing projection V before U) are left out,
and the heads are plain linear layers on the column's last hidden layer (so the output
layer has no laterals).
"""

from __future__ import annotations

import logging
import numbers

import torch
from torch import nn
from torch.nn import functional as F

from mtl.encoders import MLPEncoder
from mtl.errors import ConfigError

from .base import Strategy

log = logging.getLogger(__name__)

DEFAULT_HIDDEN = (100, 100)


class ProgressiveColumn(nn.Module):
    """Column k: its own layers W_i^(k) and, for layers i >= 2, one lateral U_i^(k:j) per earlier column j."""

    def __init__(self, in_features: int, hidden: tuple[int, ...], index: int):
        super().__init__()
        widths = (in_features, *hidden)
        self.layers = nn.ModuleList(nn.Linear(widths[i], widths[i + 1]) for i in range(len(hidden)))
        # laterals[i - 2][j] = U_i^(k:j) for layers i = 2..L (counted from 1): layer i - 1 of column j -> layer i
        # No bias: W_i^(k) already has one, a second would add nothing but parameters.
        self.laterals = nn.ModuleList(
            nn.ModuleList(nn.Linear(hidden[i - 1], hidden[i], bias=False) for _ in range(index))
            for i in range(1, len(hidden))
        )


class ProgressiveEncoder(nn.Module):
    """A per-task encoder of progressive columns: ``forward(x, tasks) -> {task: column output}``.

    ``add_task(task)`` (called by ``ContinualLearner.prepare`` when a task's head is added) adds a column for a new task and freezes the earlier ones
    (``requires_grad`` off, so they get no gradient and no optimizer moves them).
    """

    per_task = True

    def __init__(self, input_shape: tuple[int, ...], hidden: tuple[int, ...] = DEFAULT_HIDDEN):
        super().__init__()
        if not hidden or any(not isinstance(h, numbers.Integral) or h <= 0 for h in hidden):
            raise ConfigError(f"PNN's hidden widths must be positive integers, got {hidden}; e.g. hidden=(100, 100).")
        self.in_features = int(torch.Size(input_shape).numel())
        self.hidden = tuple(int(h) for h in hidden)
        self.out_features = self.hidden[-1]
        self.columns = nn.ModuleDict()

    @property
    def tasks(self) -> list[str]:
        return list(self.columns.keys())

    def add_task(self, task: str) -> ProgressiveColumn:
        if task in self.columns:
            raise ConfigError(f"PNN already has a column for task '{task}'; each task gets one column.")
        for column in self.columns.values():
            column.requires_grad_(False)
        column = ProgressiveColumn(self.in_features, self.hidden, index=len(self.columns))
        old = next(self.parameters(), None)
        if old is not None:
            column.to(old.device, old.dtype)
        self.columns[task] = column
        return column

    def forward(self, x: torch.Tensor, tasks) -> dict[str, torch.Tensor]:
        tasks = list(tasks)
        missing = [t for t in tasks if t not in self.columns]
        if missing:
            raise ConfigError(f"PNN has no column for task(s) {missing} (columns: {self.tasks}); a column is added "
                              "when the learner prepares the task's experience (learner.prepare).")
        if x[0].numel() != self.in_features:
            raise ConfigError(f"PNN's columns were built for inputs of {self.in_features} values, got shape "
                              f"{tuple(x.shape[1:])}; build the strategy for the stream the images come from.")
        order = self.tasks
        last = max(order.index(t) for t in tasks)
        columns = [self.columns[name] for name in order[: last + 1]]  # the asked-for ones and those they read
        inputs = [x.flatten(1)] * len(columns)  # h_0: the image, shared by every column
        for i in range(len(self.hidden)):
            outputs = []
            for k, column in enumerate(columns):
                pre = column.layers[i](inputs[k])
                if i > 0:
                    for j in range(k):  # the lateral sum over the earlier columns
                        pre = pre + column.laterals[i - 1][j](inputs[j])
                outputs.append(F.relu(pre))
            inputs = outputs
        return {t: inputs[order.index(t)] for t in tasks}


def _mlp_widths(encoder: nn.Module) -> tuple[int, ...] | None:
    if isinstance(encoder, MLPEncoder):
        return tuple(m.out_features for m in encoder.net if isinstance(m, nn.Linear))
    return None


class PNN(Strategy):
    """Progressive Neural Networks: a frozen column per finished task, laterals into the new one.

    ``hidden``: the columns' hidden widths; None takes those of the learner's mlp encoder
    ((100, 100) for any other encoder, whose weights PNN does not use).
    """

    name = "pnn"
    settings = ("task",)

    def __init__(self, hidden: tuple[int, ...] | None = None):
        super().__init__()
        if hidden is not None:
            hidden = tuple(hidden)
            if not hidden or any(not isinstance(h, numbers.Integral) or h <= 0 for h in hidden):
                raise ConfigError(f"PNN's hidden widths must be positive integers, got {hidden}; e.g. (100, 100).")
        self.hidden = hidden

    def before_experience(self, learner, experience) -> None:
        """Freeze every head but this task's (the encoder froze the old columns when it added this one)."""
        current = learner.stream.head_name(experience)
        for name, head in getattr(learner.model, "module", learner.model).heads.items():
            head.requires_grad_(name == current)

    def check(self, stream) -> None:
        if stream.setting != "task":
            raise ConfigError(f"strategy 'pnn' cannot run in the {stream.setting}-incremental setting: it trains one "
                              "column per task and needs the task id at test time to pick the column; use "
                              "--setting task, or a strategy with one shared model (e.g. lwf, er) for class/domain.")

    def configure(self, learner) -> None:
        self.check(learner.stream)
        net = getattr(learner.model, "module", learner.model)
        if not isinstance(net.encoder, ProgressiveEncoder):  # else configured already
            if learner.prepared >= 0:
                raise ConfigError("PNN must be configured before the first experience is prepared: build the "
                                  "StreamRunner (which calls configure) right after the learner.")
            hidden = self.hidden or _mlp_widths(net.encoder)
            if hidden is None:
                log.warning("PNN replaces the %s encoder by fully connected columns of widths %s",
                            type(net.encoder).__name__, DEFAULT_HIDDEN)
                hidden = DEFAULT_HIDDEN
            device = next(net.parameters()).device
            net.encoder = ProgressiveEncoder(learner.stream.input_shape, hidden).to(device)
            # the learner sized its first head for the encoder just replaced
            for name in list(net.heads.keys()):
                net.heads[name] = learner.head_factory(net.encoder.out_features, learner.width).to(device)
