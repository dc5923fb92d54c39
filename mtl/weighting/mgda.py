"""MGDA and MGDA-UB (Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018).

Both find the minimum-norm point of the convex hull of the task gradients (the
min-norm solver in ``min_norm.py``, on the T x T Gram matrix) and use its weights
alpha_t for the shared parameters; as in the paper's Algorithm 2 the task-specific
parameters (the heads) take their own task's gradient, unweighted. The gradient
normalisation (``l2``, ``loss``, ``loss+``, ``none``) is applied inside the solver
only; the update uses the raw gradients.

- ``MGDAWeighting`` (exact): per-task gradients on all shared parameters, in one
  batched backward pass where torch allows it (the heads' gradients come from the
  same passes). On several processes they are averaged across processes
  (``autograd.grad`` is not averaged by DDP) before the Gram matrix, so every
  process solves the same problem.
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
from .gradients import gram_matrix, split_gradients
from .graph import walk_to_boundary
from .min_norm import NORMALIZATIONS, solve


class _MinNormWeighting(Weighting):
    #: exact MGDA's passes go through the whole encoder, where vmap saves per-operation overhead; MGDA-UB's stay in
    #: the heads, where a batched pass would send all T cotangents through every head (``benchmarks/results``)
    batched_by_default = True

    def __init__(self, task_names, normalization: str = "none", batched: bool | None = None):
        super().__init__(task_names)
        if normalization not in NORMALIZATIONS:
            raise ConfigError(f"unknown gradient normalisation '{normalization}'; choose one of: "
                              f"{', '.join(NORMALIZATIONS)}.")
        self.normalization = normalization
        self.batched = self.batched_by_default if batched is None else batched

    def on_bind(self):
        self.refuse_fp16()

    def solve(self, gram: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        return solve(gram.double(), losses=self.all_mean(losses.detach().double()), normalization=self.normalization)


class MGDAWeighting(_MinNormWeighting):
    needs_shared_params = True

    def backward(self, losses, shared_params=None, rep=None):
        per_task = self.ordered(losses)
        params = [p for p in (shared_params or []) if p.requires_grad]
        if not params:
            raise ConfigError("MGDA needs trainable shared parameters, and the model's encoder has none.")
        shared_ids = {id(p) for p in params}
        heads = [p for p in walk_to_boundary(per_task, [])[0] if id(p) not in shared_ids]
        grads, head_grads = split_gradients(per_task, params, heads, batched=self.batched)
        grads = [self.all_mean(g) for g in grads]
        alpha = self.solve(gram_matrix(grads), torch.stack(per_task))  # float64, without a (T, P) copy
        combined = [torch.tensordot(alpha.to(g.dtype), g, dims=1) for g in grads]
        # the shared parameters get sum_t alpha_t g_t, the heads their own task's gradient
        self.apply_gradients(params + heads, combined + head_grads)
        return self.as_dict(alpha)


class MGDAUBWeighting(_MinNormWeighting):
    """``rep``: the shared representation, one tensor or a list of feature maps (dense encoders).

    One backward pass per task through its own head gives both the task's gradient at the
    representation and the head's gradient; then one backward pass through the encoder,
    from the representation with ``sum_t alpha_t dL_t/dz``. The heads are not differentiated
    twice, so a step costs about what equal weighting's does plus the T x T Gram matrix.
    """

    needs_rep = True
    batched_by_default = False

    def backward(self, losses, shared_params=None, rep=None):
        per_task = self.ordered(losses)
        heads, reps = walk_to_boundary(per_task, self._differentiable_parts(rep))
        if not reps:
            raise ConfigError("MGDA-UB: no task's loss depends on the shared representation the model returned; "
                              "the heads must read the representation z that forward(return_rep=True) gives.")
        dzs, head_grads = split_gradients(per_task, reps, heads, batched=self.batched)  # dzs: (T, *z.shape) each
        R = self.num_processes
        gram = self.all_sum(gram_matrix(dzs)) / (R * R)
        alpha = self.solve(gram, torch.stack(per_task))
        combined = [torch.tensordot(alpha.to(dz.dtype), dz, dims=1) for dz in dzs]
        self.apply_gradients(reps + heads, combined + head_grads)
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
