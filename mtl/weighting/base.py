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


_UNITS: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def _unit(loss: torch.Tensor) -> torch.Tensor:
    """A scalar 1 of the loss's dtype and device, made once. The engine never writes to its seed gradient,
    and holding a reference keeps it from handing this tensor to a leaf as its ``.grad``."""
    key = (loss.dtype, loss.device)
    unit = _UNITS.get(key)
    if unit is None:
        unit = _UNITS[key] = torch.ones((), dtype=loss.dtype, device=loss.device)
    return unit


class Weighting(nn.Module):
    #: set by methods that need ``shared_params`` or ``rep`` in ``backward``
    needs_shared_params: bool = False
    needs_rep: bool = False
    #: True for methods that update their learned weights with an optimizer of their own (GradNorm);
    #: otherwise the Trainer optimises the weighting's parameters with the model's.
    own_optimizer: bool = False

    def __init__(self, task_names: Iterable[str]):
        super().__init__()
        self.task_names = list(task_names)
        if not self.task_names:
            raise ConfigError("a weighting needs at least one task name.")
        self.accelerator = None
        self._plain_backward = True

    def run_backward(self, loss: torch.Tensor) -> None:
        if self.accelerator is not None and not self._plain_backward:
            self.accelerator.backward(loss)
        elif loss.ndim == 0:
            # loss.backward() with the seed gradient given: Tensor.backward's checks and the ones_like
            # it makes cost more than a small network's whole backward pass on a CPU
            torch.autograd.backward((loss,), (_unit(loss),))
        else:
            loss.backward()  # the error for a non-scalar loss

    def apply_gradients(self, tensors: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        """Back-propagate ``grads`` from ``tensors`` in one backward pass.

        Leaves (parameters) receive their gradient as it is; an inner tensor (the shared
        representation) passes its gradient on through the graph below it. One pass
        through ``run_backward`` keeps DDP's gradient averaging and Accelerate's
        gradient-accumulation scaling, which setting ``.grad`` by hand would bypass.
        """
        surrogate = sum((x * g.detach().to(x.dtype)).sum() for x, g in zip(tensors, grads))
        self.run_backward(surrogate)

    @property
    def num_processes(self) -> int:
        return self.accelerator.num_processes if self.accelerator is not None else 1

    def all_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """Mean over processes (identity on one process): ``autograd.grad`` results are not averaged by DDP."""
        if self.num_processes == 1:
            return tensor
        return self.accelerator.reduce(tensor.contiguous(), reduction="mean")

    def all_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.num_processes == 1:
            return tensor
        return self.accelerator.reduce(tensor.contiguous(), reduction="sum")

    def all_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every process's rows (dim 0) concatenated; shorter blocks are padded with zero rows."""
        if self.num_processes == 1:
            return tensor
        padded = self.accelerator.pad_across_processes(tensor.contiguous(), dim=0)
        return self.accelerator.gather(padded)

    def refuse_fp16(self) -> None:
        """For methods built on ``autograd.grad``, which bypasses fp16's loss scaler."""
        if self.accelerator is not None and self.accelerator.mixed_precision == "fp16":
            raise ConfigError(
                f"{type(self).__name__} computes per-task gradients with autograd.grad, which fp16's loss "
                "scaler does not cover (small gradients would underflow); use mixed_precision='bf16'."
            )

    def bind(self, accelerator) -> None:
        """Route backward passes through ``accelerator`` (loss scaling, DDP)."""
        self.accelerator = accelerator
        self._plain_backward = plain_backward(accelerator)
        self.on_bind()

    def on_bind(self) -> None:
        """Hook for methods that must check the accelerator's settings."""

    def check_losses(self, losses: dict[str, torch.Tensor]) -> None:
        if set(losses) != set(self.task_names):
            raise ConfigError(
                f"{type(self).__name__} was built for tasks {self.task_names} but got losses "
                f"for {sorted(losses)}; build the weighting with the same task names as the model."
            )

    def backward(self, losses: dict[str, torch.Tensor], shared_params: list[nn.Parameter] | None = None,
                 rep: torch.Tensor | None = None) -> dict[str, float]:
        raise NotImplementedError

    def ordered(self, losses: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """The losses in ``task_names`` order."""
        self.check_losses(losses)
        return [losses[t] for t in self.task_names]

    def stacked(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """The losses as one vector, in ``task_names`` order."""
        return torch.stack(self.ordered(losses))

    def as_dict(self, weights: torch.Tensor) -> dict[str, float]:
        return dict(zip(self.task_names, weights.detach().float().cpu().tolist()))


class LinearWeighting(Weighting):
    """Methods whose update is the gradient of ``sum_t w_t L_t + regulariser``."""

    def weights(self) -> dict[str, torch.Tensor | float]:
        raise NotImplementedError

    def regulariser(self) -> torch.Tensor | float:
        return 0.0

    def backward(self, losses, shared_params=None, rep=None):
        self.check_losses(losses)
        weights = self.weights()
        total = weighted_sum([(weights[t], losses[t]) for t in self.task_names] + [(1.0, self.regulariser())])
        self.run_backward(total)
        return {t: float(weights[t].detach() if torch.is_tensor(weights[t]) else weights[t]) for t in self.task_names}


def plain_backward(accelerator) -> bool:
    """Whether ``accelerator.backward(loss)`` would only call ``loss.backward()``.

    Without a loss scaler (fp16), gradient accumulation, DeepSpeed or Megatron it divides the
    loss by 1 and calls ``loss.backward()``; DDP averages gradients inside ``backward`` itself.
    Calling ``loss.backward()`` directly then gives the same gradients without the extra node.
    """
    return (getattr(accelerator, "scaler", None) is None and getattr(accelerator, "mixed_precision", "no") != "fp16"
            and getattr(accelerator, "gradient_accumulation_steps", 1) == 1
            and getattr(accelerator, "distributed_type", "NO") not in ("DEEPSPEED", "MEGATRON_LM")  # a str enum
            and not getattr(accelerator, "has_lomo_optimizer", False))


def weighted_sum(terms: list[tuple[torch.Tensor | float, torch.Tensor | float]]) -> torch.Tensor:
    """``sum_k w_k x_k``, left to right, with no graph node for a weight of 1 or a term of 0.

    The same value, bit for bit, as the plain sum: ``1.0 * x == x`` and ``x + 0.0 == x``.
    Fewer nodes matter at small batches, where each one costs as much as the arithmetic.
    """
    total = None
    for weight, value in terms:
        if isinstance(value, (int, float)) and value == 0:
            continue
        term = value if isinstance(weight, (int, float)) and weight == 1 else weight * value
        total = term if total is None else total + term
    if total is None:
        raise ConfigError("every loss term is a plain zero; a weighting needs at least one loss tensor.")
    return total
