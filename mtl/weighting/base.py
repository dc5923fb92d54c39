"""The contract every loss-balancing method shares.

``weighting.backward(losses, shared_params, rep) -> weights``:
- ``losses``: ``{task: scalar loss}`` for the current batch (summed, never averaged,
  unless the method's weights say so);
- ``shared_params``: the shared encoder's parameters, for methods that look at
  per-task gradients on them (GradNorm, MGDA);
- ``rep``: the shared representation ``z`` from the same forward pass, for methods
  that work on gradients with respect to it (MGDA-UB);
- it fills ``.grad`` of every parameter that should be updated and returns the
  weight it gave each task, as plain floats, for the training history.

A weighting is an ``nn.Module``: learned weights are parameters, saved in its
``state_dict`` and handed to the optimizer with the model's parameters.
The Trainer binds it to the ``Accelerator`` so that backward passes get the mixed
precision loss scaling and distributed reductions they need.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from ..errors import ConfigError


class Weighting(nn.Module):
    #: set by methods that need ``shared_params`` or ``rep`` in ``backward``
    needs_shared_params: bool = False
    needs_rep: bool = False

    def __init__(self, task_names: Iterable[str]):
        super().__init__()
        self.task_names = list(task_names)
        if not self.task_names:
            raise ConfigError("a weighting needs at least one task name.")
        self.accelerator = None

    def bind(self, accelerator) -> None:
        """Route backward passes through ``accelerator`` (loss scaling, DDP)."""
        self.accelerator = accelerator

    def run_backward(self, loss: torch.Tensor) -> None:
        if self.accelerator is not None:
            self.accelerator.backward(loss)
        else:
            loss.backward()

    def check_losses(self, losses: dict[str, torch.Tensor]) -> None:
        if set(losses) != set(self.task_names):
            raise ConfigError(
                f"{type(self).__name__} was built for tasks {self.task_names} but got losses "
                f"for {sorted(losses)}; build the weighting with the same task names as the model."
            )

    def backward(self, losses: dict[str, torch.Tensor], shared_params: list[nn.Parameter] | None = None,
                 rep: torch.Tensor | None = None) -> dict[str, float]:
        raise NotImplementedError


class LinearWeighting(Weighting):
    """Methods whose update is the gradient of ``sum_t w_t L_t + regulariser``."""

    def weights(self) -> dict[str, torch.Tensor | float]:
        raise NotImplementedError

    def regulariser(self) -> torch.Tensor | float:
        return 0.0

    def backward(self, losses, shared_params=None, rep=None):
        self.check_losses(losses)
        weights = self.weights()
        total = sum(weights[t] * losses[t] for t in self.task_names) + self.regulariser()
        self.run_backward(total)
        return {t: float(weights[t].detach() if torch.is_tensor(weights[t]) else weights[t]) for t in self.task_names}
