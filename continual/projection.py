"""GEM and A-GEM: continual learning's gradient projections, as weightings over ``{current, memory}``.

Both methods take the gradient ``g`` of the loss on the current batch and, when it
would increase the loss on the replay memory (to first order), change it as little
as possible so that it no longer does:

- A-GEM (Chaudhry, Ranzato, Rohrbach & Elhoseiny, "Efficient Lifelong Learning with
  A-GEM", ICLR 2019, eq. 11): one constraint, from the gradient ``g_ref`` of the loss
  on a batch drawn from the whole memory. If ``g . g_ref >= 0`` the update is ``g``;
  otherwise ``g~ = g - (g . g_ref / g_ref . g_ref) g_ref``.
- GEM (Lopez-Paz & Ranzato, "Gradient Episodic Memory for Continual Learning",
  NeurIPS 2017, section 3): one constraint per past experience k, from the gradient
  ``g_k`` of the loss on that experience's memory (the rows of G). If ``G g >= 0`` the
  update is ``g``; otherwise the closest vector to ``g`` that satisfies every
  constraint, ``min ||g~ - g||^2 s.t. G g~ >= 0``, found through its dual
  ``min_{v >= 0} 1/2 v^T G G^T v + (G g)^T v`` and ``g~ = G^T v + g``.

They are ``Weighting``s (``mtl.weighting.base``), so a continual strategy hands them
to the Trainer like any multi-task weighting. The losses are named ``"current"`` and
``"memory"``; the update is ``g~`` alone (the memory loss only constrains it, it is
not added). Gradients are taken with ``torch.autograd.grad`` on the parameters that
the ``parameters`` callable returns (read again at every step, because a continual
learner adds heads during the run), averaged over processes (``autograd.grad``
bypasses DDP), and the projected gradient is applied with ONE backward pass
(``apply_gradients``), so DDP's hooks and Accelerate see a normal backward.

Empty memory: a memory loss that does not depend on the parameters (``torch.zeros(())``
before anything was stored) has a zero gradient, hence no constraint; for GEM a
zero-length vector (``torch.zeros(0)``, no past experience) means the same.

Limitation: ``mtl.trainer.Trainer``'s step stacks every loss as one number (for its
non-finite check and history), so through it GEM's memory must be a scalar (one past
experience) for now; ``GEMWeighting.backward`` itself takes any length.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch
from scipy.optimize import nnls
from torch import nn

from mtl.errors import ConfigError, SolverError
from mtl.weighting.base import Weighting
from mtl.weighting.gradients import flat_matrix, gram_matrix, per_task_gradients

log = logging.getLogger(__name__)

TASK_NAMES = ("current", "memory")


@dataclass(frozen=True)
class Projection:
    """What the last step did, for inspection and tests (one entry per memory gradient row)."""

    projected: bool  # False when every constraint already held and g was used as it is
    dots_before: tuple[float, ...]  # g . g_ref (A-GEM) or G g (GEM)
    dots_after: tuple[float, ...]  # the same with the update g~ in place of g (from the float64 Gram matrix)
    coefficients: tuple[float, ...]  # g~ = g + sum_i coefficients[i] * (memory gradient i)


class _ProjectionWeighting(Weighting):
    """Shared machinery: per-loss gradients, their Gram matrix, one combined backward pass.

    Subclasses say how the memory loss becomes scalar rows (``_memory_rows``) and how the
    (1 + k) x (1 + k) Gram matrix of ``[g; G]`` becomes the coefficients on the rows of G
    (``_coefficients``).
    """

    def __init__(self, task_names: Iterable[str] = TASK_NAMES, *, parameters: Callable[[], Iterable[nn.Parameter]],
                 batched: bool = False):
        names = list(task_names)
        if len(names) != 2 or set(names) != set(TASK_NAMES):
            raise ConfigError(
                f"{type(self).__name__} weighs exactly the losses {list(TASK_NAMES)}, got task names {names}; "
                f"have the continual objective return {{'current': ..., 'memory': ...}} and build the weighting "
                f"with task_names={TASK_NAMES}."
            )
        super().__init__(TASK_NAMES)
        if not callable(parameters) or isinstance(parameters, nn.Module):
            raise ConfigError(
                f"parameters must be a zero-argument callable returning the parameters to project over, got "
                f"{type(parameters).__name__}; pass model.parameters (the method, not model.parameters(), which "
                "is a one-shot generator), so that heads added later in the run are included."
            )
        # not named ``parameters``: that would hide nn.Module.parameters, through which the Trainer looks
        # for a weighting's own learned weights (these methods have none)
        self.project_over = parameters
        self.batched = bool(batched)
        self.last_projection: Projection | None = None

    def on_bind(self):
        self.refuse_fp16()

    # ----- subclass hooks --------------------------------------------------------------
    def _memory_rows(self, memory: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError

    def _coefficients(self, gram: torch.Tensor) -> torch.Tensor:
        """``gram``: float64 Gram matrix of ``[g; G]``. Returns the float64 coefficients on G's rows."""
        raise NotImplementedError

    # ----- the step --------------------------------------------------------------------
    def backward(self, losses, shared_params=None, rep=None):
        """Fill ``.grad`` with the projected gradient; return ``{"current": 1.0, "memory": sum of coefficients}``.

        ``shared_params`` and ``rep`` are ignored: the parameters come from the ``parameters`` callable.
        """
        self.check_losses(losses)
        current = _as_tensor(losses["current"], "current")
        if current.numel() != 1:
            raise ConfigError(f"losses['current'] must be a scalar, got shape {tuple(current.shape)}; reduce the "
                              "current batch's loss with .mean() or .sum().")
        if not current.requires_grad:
            raise ConfigError("losses['current'] does not depend on any parameter (is the model frozen or run "
                              "under torch.no_grad()?); it must be the loss of a forward pass that tracks gradients.")
        rows = [current.reshape(())] + self._memory_rows(_as_tensor(losses["memory"], "memory"))
        params = self._params()
        matrix = self.all_mean(self._gradient_matrix(rows, params))  # (1 + k, P): g, then G
        gram = gram_matrix([matrix])  # float64
        if not torch.isfinite(gram).all():
            bad = [("current" if i == 0 else f"memory[{i - 1}]") for i in range(len(rows))
                   if not torch.isfinite(matrix[i]).all()]
            raise SolverError(f"{type(self).__name__}: the gradient of {', '.join(bad) or 'a loss'} is not finite; "
                              "lower the learning rate or clip the gradients (grad_clip).")
        coefficients = self._coefficients(gram) if len(rows) > 1 else gram.new_zeros(0)
        self.last_projection = self._record(gram, coefficients)
        full = torch.cat([coefficients.new_ones(1), coefficients]).to(matrix.dtype)
        update = full @ matrix  # g + G^T coefficients
        self.apply_gradients(params, [u.view_as(p) for u, p in zip(update.split([p.numel() for p in params]), params)])
        return {"current": 1.0, "memory": float(coefficients.sum())}

    def _params(self) -> list[nn.Parameter]:
        params, seen = [], set()
        for p in self.project_over():
            if not isinstance(p, torch.Tensor):
                raise ConfigError(f"the parameters callable returned a {type(p).__name__}, not a tensor; pass "
                                  "model.parameters.")
            if p.requires_grad and id(p) not in seen:  # tied weights count once
                seen.add(id(p))
                params.append(p)
        if not params:
            raise ConfigError(f"{type(self).__name__}: the parameters callable returned no trainable parameter; "
                              "pass model.parameters of a model with unfrozen parameters.")
        return params

    def _gradient_matrix(self, rows: list[torch.Tensor], params: list[nn.Parameter]) -> torch.Tensor:
        """The gradient of each scalar row w.r.t. ``params``, flattened: ``(len(rows), P)``; zeros for constant rows.

        One backward pass per row by default: the current and memory losses usually come from
        separate forward passes, and a pass per loss then visits each graph once, where a batched
        pass would send every row's cotangent through every graph.
        """
        live = [i for i, r in enumerate(rows) if r.requires_grad]
        grads = flat_matrix(per_task_gradients([rows[i] for i in live], params, batched=self.batched))
        if len(live) == len(rows):
            return grads
        matrix = grads.new_zeros(len(rows), grads.shape[1])
        matrix[live] = grads
        return matrix

    def _record(self, gram: torch.Tensor, coefficients: torch.Tensor) -> Projection:
        before = gram[1:, 0]  # G g
        after = before + gram[1:, 1:] @ coefficients  # G g~ = G g + G G^T c
        return Projection(projected=bool((coefficients != 0).any()), dots_before=_floats(before),
                          dots_after=_floats(after), coefficients=_floats(coefficients))


class AGEMWeighting(_ProjectionWeighting):
    """A-GEM (Chaudhry et al., ICLR 2019, eq. 11): project g when it conflicts with the memory gradient.

    ``losses["current"]``: the loss on the current batch; ``losses["memory"]``: a scalar, the loss
    on a batch drawn from the replay memory, whose gradient is ``g_ref``. The update is
    ``g~ = g - (g . g_ref / g_ref . g_ref) g_ref`` when ``g . g_ref < 0``, else ``g``: the memory
    loss constrains the step and is not added to it. The returned weight for ``"memory"`` is the
    coefficient put on ``g_ref`` (``-g . g_ref / ||g_ref||^2``, or 0), ``"current"`` is always 1.

    ``parameters``: a zero-argument callable returning the parameters to project over, read at
    every step; typically ``model.parameters``. Only these parameters receive a gradient.
    ``batched``: compute the two gradients in one vmapped backward pass; worth it only when both
    losses come from one forward pass (current and memory samples in one batch).
    """

    def _memory_rows(self, memory):
        if memory.numel() != 1:
            raise ConfigError(
                f"A-GEM's losses['memory'] must be one scalar (the loss on a batch drawn from the whole memory), "
                f"got shape {tuple(memory.shape)}; average it with .mean(), or use GEMWeighting for one loss per "
                "past experience."
            )
        return [memory.reshape(())]

    def _coefficients(self, gram):
        dot, ref = gram[1, 0], gram[1, 1]
        if dot >= 0:  # also when g_ref = 0 (empty memory): no constraint to enforce
            return gram.new_zeros(1)
        return (-dot / ref).reshape(1)


class GEMWeighting(_ProjectionWeighting):
    """GEM (Lopez-Paz & Ranzato, NeurIPS 2017, section 3): one constraint per past experience.

    ``losses["memory"]``: a 1-D tensor with one loss per past experience (the loss on that
    experience's episodic memory), the rows of G; a 0-d tensor counts as one past experience, and
    a zero-length one (the first experience) means no constraint. If ``G g >= 0`` the update is
    ``g``; otherwise ``g~ = G^T v + g`` with ``v`` the exact solution of the dual QP
    ``min_{v >= margin} 1/2 v^T G G^T v + (G g)^T v``, so that ``G g~ >= 0``. The returned weight for
    ``"memory"`` is ``sum(v)``, the total weight put on the memory gradients (0 when not projected).

    ``margin`` (the paper's gamma, the authors' ``memory_strength``): the paper reports that adding
    a small constant gamma >= 0 to ``v`` favours updates with positive backward transfer. As in the
    authors' code it is a lower bound ``v >= margin`` in the dual, which keeps ``G g~ >= 0`` exact
    (adding gamma after solving would not). Default 0, the plain projection; the authors'
    projection routine defaults to 0.5.

    Cost: one backward pass per row of G on top of the current loss's. Each pass starts from one
    entry of the memory vector, so when the k losses come from k forward passes stacked together
    every pass also runs through the other k - 1 graphs (on zero gradients): keep memories small.
    ``parameters`` and ``batched`` as in ``AGEMWeighting``.
    """

    def __init__(self, task_names: Iterable[str] = TASK_NAMES, *, parameters, margin: float = 0.0,
                 batched: bool = False):
        super().__init__(task_names, parameters=parameters, batched=batched)
        try:
            value = float(margin)
        except (TypeError, ValueError):
            value = math.nan
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"GEM's margin must be a finite number >= 0 (the paper's gamma), got {margin!r}.")
        self.margin = value

    def _memory_rows(self, memory):
        if memory.dim() == 0:
            return [memory]
        if memory.dim() != 1:
            raise ConfigError(
                f"GEM's losses['memory'] must be a 1-D tensor with one loss per past experience (torch.stack of "
                f"the per-experience losses; zero-length before any), got shape {tuple(memory.shape)}."
            )
        return list(memory.unbind(0))

    def _coefficients(self, gram):
        dots = gram[1:, 0]
        if (dots >= 0).all():
            return torch.zeros_like(dots)
        v = gem_dual(gram[1:, 1:], dots, self.margin)
        self._check_constraints(gram, v)
        return v

    def _check_constraints(self, gram: torch.Tensor, v: torch.Tensor) -> None:
        # G g~ = G g + G G^T v must be >= 0, up to the solver's rounding (see gem_dual), relative to |G_i| |g|
        # (not |g~|, which is 0 when g~ = 0 is the only feasible direction); |g~| can exceed |g| with a margin
        G_G, dots = gram[1:, 1:], gram[1:, 0]
        after = dots + G_G @ v
        norm_update = abs(float(gram[0, 0] + 2 * dots @ v + v @ G_G @ v)) ** 0.5  # |g~|
        scale = max(float(gram[0, 0]) ** 0.5, norm_update)
        tol = 1e-6 * G_G.diagonal().clamp_min(0).sqrt() * scale
        if (after < -tol).any():
            log.warning("GEM: the projected gradient violates a memory constraint by %.3g (G g~ = %s); the memory "
                        "gradients are probably nearly linearly dependent.",
                        float((-after - tol).max()), _floats(after))


def gem_dual(gram: torch.Tensor, dots: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """Exact solution of GEM's dual QP ``min_{v >= margin} 1/2 v^T A v + c^T v``, ``A = G G^T``, ``c = G g``.

    Solved as non-negative least squares. Factor ``A = M^T M`` (from its eigendecomposition,
    ``M = diag(sqrt(s)) U^T``). Because ``c = G g`` lies in the range of ``A``, ``c = M^T d`` with
    ``d = diag(1/sqrt(s)) U^T c``, and
        1/2 v^T M^T M v + d^T M v = 1/2 ||M v + d||^2 - 1/2 ||d||^2
    (the Cholesky form ``A = L L^T`` gives the same with ``M = L^T``, ``d = L^{-1} c``).
    With ``v = margin + u``, ``u >= 0``: ``min_{u >= 0} ||M u + (d + margin M 1)||^2``, an NNLS
    problem of size k x k (scipy's Lawson-Hanson, exact up to rounding).

    Two details keep it exact where ``A`` is badly conditioned:
    - the rows of G are scaled to unit length first (a constraint ``G_i g~ >= 0`` does not change
      when ``G_i`` is scaled), so memory gradients of very different sizes (1e-4 next to 1e4) do
      not make ``A`` numerically singular; zero rows constrain nothing and get ``v_i = margin``;
    - no ridge is added: a ridge ``eps I`` would move the solution and break the constraints by up
      to ``eps * v``. Instead eigenvalues below ``1e-12 * max`` are dropped, which is exact when
      ``A`` is singular (repeated memory gradients, or k > P) and otherwise changes the scaled
      ``G g~`` by about ``1e-6 * |g~|`` at most.
    """
    A = gram.detach().double().cpu().numpy()
    c = dots.detach().double().cpu().numpy()
    k = len(c)
    norms = np.sqrt(np.clip(np.diag(A), 0.0, None))
    live = norms > 0
    v = np.full(k, margin)
    if live.any():
        n = norms[live]
        A1 = A[np.ix_(live, live)] / np.outer(n, n)  # Gram matrix of the unit rows G_i / |G_i|
        c1 = c[live] / n
        s, U = np.linalg.eigh(0.5 * (A1 + A1.T))
        keep = s > s.max() * 1e-12  # s.max() >= 1: the trace is the number of rows
        root = np.sqrt(s[keep])
        M = root[:, None] * U[:, keep].T
        d = (U[:, keep].T @ c1) / root
        lower = margin * n  # v_i >= margin  <=>  (coefficient on the unit row) >= margin |G_i|
        try:
            u, _ = nnls(M, -(d + M @ lower), maxiter=max(100, 50 * k))
        except RuntimeError as e:  # iteration cap: not expected for k x k problems
            raise SolverError(f"GEM's dual QP (k = {k} past experiences) did not converge: {e}") from None
        v[live] = (u + lower) / n
    return torch.as_tensor(v, dtype=torch.float64, device=gram.device)


def _as_tensor(loss, name: str) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor):
        raise ConfigError(f"losses['{name}'] must be a tensor, got {type(loss).__name__}; for an empty memory use "
                          "torch.zeros(()) (A-GEM) or torch.zeros(0) (GEM), which mean no constraint.")
    return loss


def _floats(x: torch.Tensor) -> tuple[float, ...]:
    return tuple(x.detach().double().cpu().tolist())
