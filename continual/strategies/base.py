"""What every continual strategy shares: hooks around each experience, extra losses.

A strategy is a small ``nn.Module`` (its state -- Fisher information, importances, a
replay buffer -- goes into the run's checkpoints through ``get_extra_state``):

- ``check(stream)``: refuse a setting the method cannot run in, with the reason;
- ``configure(learner)``: once, before the run: architecture changes (a cosine classifier,
  progressive columns);
- ``before_experience(learner, experience)``: after the model got the experience's
  head / classes (snapshots of the old model, anchors);
- ``train_data(learner, experience)``: what the experience trains on (the joint
  baseline trains on every experience seen so far);
- ``extra_losses(learner, model, batch, z, logits)``: named losses beside ``"current"``,
  the cross-entropy on the current batch;
- ``joint_batch(learner, batch)``: samples trained as part of the current batch, in the same
  forward pass and the same ``"current"`` mean (ER's memory batch: one step on B u B_M);
- ``weighting(learner, loss_names)``: how the losses become a gradient (a static sum by default;
  A-GEM and GEM project the gradient instead);
- ``after_step(learner, model)``: after every optimizer step (path integrals);
- ``after_experience(learner, experience)``: importances, Fisher, exemplars;
- ``scores(learner, model, x, task_ids)``: what evaluation takes the argmax of (None: the logits).

``ContinualObjective`` turns a strategy into the ``mtl.objective.Objective`` the
Trainer runs, so every strategy trains through the one training loop.
"""

from __future__ import annotations

import torch
from torch import nn

from mtl.errors import ConfigError
from mtl.objective import Objective
from mtl.weighting import build_weighting

CURRENT = "current"


def named_trainable(model) -> dict[str, nn.Parameter]:
    """The parameters that train, by name (through a DDP wrapper too)."""
    net = getattr(model, "module", model)
    return {name: p for name, p in net.named_parameters() if p.requires_grad}


class Strategy(nn.Module):
    name = "finetune"
    #: the settings the method works in
    settings: tuple[str, ...] = ("task", "class", "domain")
    #: the names of the losses ``extra_losses`` returns
    extra_loss_names: tuple[str, ...] = ()

    def check(self, stream) -> None:
        if stream.setting not in self.settings:
            raise ConfigError(f"strategy '{self.name}' cannot run in the {stream.setting}-incremental setting "
                              f"(it supports: {', '.join(self.settings)}); choose another --setting or strategy.")

    def configure(self, learner) -> None:
        """Once, before the first experience (and before a resumed run loads its state): change the
        learner's architecture here (LUCIR's cosine classifier, PNN's columns)."""

    def before_experience(self, learner, experience) -> None:
        pass

    def train_data(self, learner, experience):
        from ..learner import ExperienceData

        return ExperienceData(experience, learner, "train")

    def extra_losses(self, learner, model, batch, z, logits) -> dict[str, torch.Tensor]:
        return {}

    def joint_batch(self, learner, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """``(inputs, targets, task_ids)`` trained together with the current batch as one batch, or None.

        They go through the model in the same forward pass (layers that mix a batch, such as batch
        norm, see both) and into the same ``"current"`` cross-entropy, one mean over all rows."""
        return None

    def loss_weights(self) -> dict[str, float]:
        """The weight of each extra loss in the static sum (1 unless the method has a coefficient)."""
        return dict.fromkeys(self.extra_loss_names, 1.0)

    def weighting(self, learner, loss_names: list[str]):
        weights = {CURRENT: 1.0, **self.loss_weights()}
        return build_weighting("static", loss_names, weights={n: weights[n] for n in loss_names})

    def scores(self, learner, model, x, task_ids):
        """Class scores for evaluation, or None to use the model's logits (iCaRL classifies by the
        nearest mean of exemplars instead)."""
        return None

    def after_step(self, learner, model) -> None:
        """After every optimizer step, gradients still present (SI's path integral, EWC++'s Fisher)."""

    def after_experience(self, learner, experience) -> None:
        pass

    # ----- checkpoints: override both to keep state beyond registered buffers -------------------
    def get_extra_state(self):
        return {}

    def set_extra_state(self, state) -> None:
        pass


class ContinualObjective(Objective):
    """``{"current": cross-entropy, **strategy.extra_losses(...)}`` for batches ``(x, target, task_id)``."""

    own_optimizer = True  # a strategy's tensors (old weights, Fisher) are not trained

    def __init__(self, strategy: Strategy, learner):
        super().__init__()
        self.strategy, self.learner = strategy, learner
        self.loss_names = [CURRENT, *strategy.extra_loss_names]

    def losses(self, model, batch):
        x, y, task_ids = batch[:3]  # a strategy's own data may add fields (LwF's recorded outputs)
        joint = self.strategy.joint_batch(self.learner, batch)
        if joint is not None:  # the joint rows follow the current ones
            x, y, task_ids = (torch.cat(pair) for pair in zip((x, y, task_ids), joint))
        rep = self.learner.encode(model, x, task_ids)
        logits = self.learner.logits(model, rep, task_ids)
        losses = {CURRENT: self.learner.loss(logits, y)}
        rows = len(batch[1])  # the strategy's own losses see the current batch's rows only
        z, logits = (rep, logits) if joint is None else (rep[:rows], logits[:rows])
        losses.update(self.strategy.extra_losses(self.learner, model, batch, z, logits))
        return losses, rep

    def after_step(self, model) -> None:
        self.strategy.after_step(self.learner, model)
