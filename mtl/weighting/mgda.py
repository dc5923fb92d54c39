"""MGDA and MGDA-UB (Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018).

Both find the minimum-norm point of the convex hull of the task gradients (the
min-norm solver in ``min_norm.py``, on the T x T Gram matrix) and use its weights
alpha_t for the shared parameters; as in the paper's Algorithm 2 the task-specific
parameters (the heads) take their own task's gradient, unweighted. The gradient
normalisation (``l2``, ``loss``, ``loss+``, ``none``) is applied inside the solver
only; the update uses the raw gradients.

- ``MGDAWeighting`` (exact): per-task gradients on all shared parameters, in one
  batched backward pass where torch allows it. On several processes they are
  averaged across processes (``autograd.grad`` is not averaged by DDP) before the
  Gram matrix, so every process solves the same problem.
- ``MGDAUBWeighting`` (the paper's upper bound, section 3.3): per-task gradients
  with respect to the shared representation z only, which costs one pass through
  the heads. The global batch's z is the processes' pieces side by side, so the
  global Gram matrix is the sum of the per-process ones (scaled by 1/R^2 because
  each process's loss is a mean over its 1/R share): an exact T x T all-reduce.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from .base import Weighting
from .gradients import flat_matrix, gram_matrix, per_task_gradients
from .min_norm import NORMALIZATIONS, solve


class _MinNormWeighting(Weighting):
    def __init__(self, task_names, normalization: str = "none", batched: bool = True):
        super().__init__(task_names)
        if normalization not in NORMALIZATIONS:
            raise ConfigError(f"unknown gradient normalisation '{normalization}'; choose one of: "
                              f"{', '.join(NORMALIZATIONS)}.")
        self.normalization, self.batched = normalization, batched

    def on_bind(self):
        self.refuse_fp16()

    def solve(self, gram: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        return solve(gram.double(), losses=self.all_mean(losses.detach().double()), normalization=self.normalization)


class MGDAWeighting(_MinNormWeighting):
    needs_shared_params = True

    def backward(self, losses, shared_params=None, rep=None):
        L = self.stacked(losses)
        params = [p for p in (shared_params or []) if p.requires_grad]
        if not params:
            raise ConfigError("MGDA needs trainable shared parameters, and the model's encoder has none.")
        grads = [self.all_mean(g) for g in per_task_gradients(L, params, batched=self.batched)]
        alpha = self.solve(gram_matrix(grads), L)  # float64, without a (T, P) copy of the gradients
        # One ordinary backward gives the heads their own task's gradient (averaged by DDP) ...
        self.run_backward(L.sum())
        # ... and the shared parameters then get sum_t alpha_t g_t instead of sum_t g_t.
        alpha_p = alpha.to(grads[0].dtype)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.grad = torch.tensordot(alpha_p.to(g.dtype), g, dims=1).to(p.dtype)
        return self.as_dict(alpha)


class MGDAUBWeighting(_MinNormWeighting):
    """``rep``: the shared representation, one tensor or a list of feature maps (dense encoders)."""

    needs_rep = True

    def backward(self, losses, shared_params=None, rep=None):
        L = self.stacked(losses)
        reps = self._differentiable_parts(rep)
        dzs = per_task_gradients(L, reps, batched=self.batched)  # each (T, *z_k.shape)
        M = flat_matrix(dzs).double()
        R = self.num_processes
        gram = self.all_sum(M @ M.T) / (R * R)
        alpha = self.solve(gram, L)
        # Surrogate with the right gradient everywhere in one backward pass: the heads see
        # sum_t L_t (their own task's gradient), z sees sum_t alpha_t dL_t/dz.
        surrogate = L.sum()
        for z, dz in zip(reps, dzs):
            surrogate = surrogate + (z * torch.tensordot((alpha - 1).to(dz.dtype), dz, dims=1).detach()).sum()
        self.run_backward(surrogate)
        return self.as_dict(alpha)

    @staticmethod
    def _differentiable_parts(rep) -> list[torch.Tensor]:
        if isinstance(rep, torch.Tensor):
            parts = [rep]
        elif isinstance(rep, (list, tuple)) and all(isinstance(z, torch.Tensor) for z in rep):
            parts = list(rep)
        else:
            raise ConfigError(
                "MGDA-UB needs the shared representation z as one tensor (or a list of feature maps); this "
                f"model's encoder gives {type(rep).__name__} (per-task columns have no single shared z). "
                "Use 'mgda' instead."
            )
        parts = [z for z in parts if z.requires_grad]
        if not parts:
            raise ConfigError(
                "MGDA-UB differentiates the losses with respect to the encoder's output, which does not require "
                "grad (is the encoder frozen or run under no_grad?). Unfreeze the encoder or use another weighting."
            )
        return parts
