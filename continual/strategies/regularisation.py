"""Regularisation strategies: a quadratic pull towards the weights that solved past experiences.

All of them add ``penalty = sum_k sum_i Omega_k,i (theta_i - theta*_k,i)^2`` over stored
anchors k, and differ in the importance Omega and in how anchors are kept:

- ``l2``: Omega = 1 (the baseline of Kirkpatrick et al. 2017, Fig. 2).
- ``ewc``: Omega = the diagonal empirical Fisher on the experience's training data, one
  anchor per experience (Kirkpatrick et al., PNAS 2017, eq. 3 and the multi-task
  sum below it).
- ``online_ewc``: one anchor, Fisher F <- gamma F + F_new (Schwarz et al., ICML 2018,
  "Progress & Compress", section 2.3).
- ``ewc_pp``: EWC++ (Chaudhry et al., ECCV 2018, eq. 6): one anchor, the Fisher a moving
  average updated during training, F <- alpha F_batch + (1 - alpha) F.
- ``mas``: Omega = mean over samples of |d ||f(x)||_2^2 / d theta| (Aljundi et al., ECCV
  2018, eq. 4), accumulated over experiences, one anchor.
- ``si``: the path integral omega = sum over steps of -g * delta theta, then
  Omega += omega / (Delta^2 + xi) (Zenke et al., ICML 2017, eq. 5), one anchor.
- ``rwalk``: EWC++'s Fisher plus the path score of Chaudhry et al. (2018, eq. 7-9).

The loss weight is the method's coefficient: lambda / 2 for the Fisher methods (the
papers' lambda/2 sum F (theta - theta*)^2), c for SI and lambda for MAS and RWalk,
which have no 1/2. Parameters added after an anchor (a new head) are not penalised;
a grown Class-IL head is penalised on its old rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mtl.errors import ConfigError

from ..fisher import empirical_fisher
from .base import Strategy, named_trainable


def _leading(current: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The part of ``current`` an anchor of ``shape`` covers (a grown head keeps its old rows first)."""
    if current.shape == shape:
        return current
    return current[tuple(slice(0, s) for s in shape)]


def _positive(name: str, value: float) -> float:
    if not value > 0:
        raise ConfigError(f"{name} must be > 0, got {value}.")
    return float(value)


class QuadraticPenalty(Strategy):
    """Base class: ``importance(learner, experience)`` gives Omega; ``separate`` keeps one anchor per experience."""

    extra_loss_names = ("penalty",)
    separate = False
    half = True  # the penalty's coefficient is strength / 2

    def __init__(self, strength: float = 1.0):
        super().__init__()
        self.strength = _positive(f"{self.name} strength", strength)
        self.anchors: list[dict[str, torch.Tensor]] = []
        self.importances: list[dict[str, torch.Tensor]] = []
        self._quadratic: FlatQuadratic | None = None  # the two above as one quadratic, built when first needed

    def loss_weights(self) -> dict[str, float]:
        return {"penalty": self.strength / 2 if self.half else self.strength}

    def importance(self, learner, experience) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def merge(self, old: dict[str, torch.Tensor], new: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One anchor: the importance of past experiences plus the new one's."""
        return {n: _add_into(v, old[n]) if n in old else v for n, v in new.items()}

    def after_experience(self, learner, experience) -> None:
        params = named_trainable(learner.model)
        anchor = {n: p.detach().clone() for n, p in params.items()}
        omega = {n: v.detach().clone() for n, v in self.importance(learner, experience).items()}
        if self.separate or not self.anchors:
            self.anchors.append(anchor)
            self.importances.append(omega)
        else:
            self.anchors[0] = anchor
            self.importances[0] = self.merge(self.importances[0], omega)
        self._quadratic = None

    def extra_losses(self, learner, model, batch, z, logits):
        if not self.anchors:
            return {"penalty": z.new_zeros(())}
        params = named_trainable(model)
        if self._quadratic is None or not self._quadratic.fits(params):
            self._quadratic = FlatQuadratic(combine_quadratics(self.anchors, self.importances), params)
        penalty = self._quadratic(params)
        return {"penalty": penalty if penalty is not None else z.new_zeros(())}

    def get_extra_state(self):
        return {"anchors": self.anchors, "importances": self.importances}

    def set_extra_state(self, state) -> None:
        self.anchors, self.importances = list(state["anchors"]), list(state["importances"])
        self._quadratic = None

    def _apply(self, fn, *args, **kwargs):  # keep anchors on the model's device
        super()._apply(fn, *args, **kwargs)
        self.anchors = [{n: fn(t) for n, t in a.items()} for a in self.anchors]
        self.importances = [{n: fn(t) for n, t in a.items()} for a in self.importances]
        self._quadratic = None
        return self


class FlatQuadratic:
    """``sum_i A_i (theta_i - m_i)^2 + c`` over the parameters the anchors cover, as one flat vector.

    The parameters (their leading rows, for a head that grew since the anchor) are joined into
    one vector per step: a handful of operations instead of several per parameter.
    """

    def __init__(self, combined: dict[str, tuple[torch.Tensor, torch.Tensor, float]], params: dict[str, torch.Tensor]):
        self.covered = set(combined)
        self.names = [n for n in combined if n in params]
        self.penalised = set(self.names)
        self.shapes = [combined[n][1].shape for n in self.names]
        self.a = torch.cat([combined[n][0].reshape(-1) for n in self.names]) if self.names else None
        self.m = torch.cat([combined[n][1].reshape(-1) for n in self.names]) if self.names else None
        self.c = sum(combined[n][2] for n in self.names)

    def fits(self, params: dict[str, torch.Tensor]) -> bool:
        """Whether it was built for these trainable parameters (freezing one changes what is penalised)."""
        return self.covered.intersection(params) == self.penalised

    def __call__(self, params: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The penalty at ``params``; None when no trainable parameter is covered."""
        if not self.names:
            return None
        theta = torch.cat([_leading(params[n], shape).reshape(-1) for n, shape in zip(self.names, self.shapes)])
        penalty = _WeightedSquares.apply(theta, self.a, self.m)
        return penalty + self.c if self.c else penalty


class _WeightedSquares(torch.autograd.Function):
    """``sum a (theta - m)^2`` with the gradient ``2 a (theta - m)`` in one graph node: three passes over the
    vector forward and one backward, where the same expression through autograd takes about twice as many."""

    @staticmethod
    def forward(ctx, theta, a, m):
        with torch.autocast(theta.device.type, enabled=False):  # a penalty sums ~1e5 terms: keep float32
            moved = theta - m
            weighted = a * moved
            ctx.save_for_backward(weighted)
            return torch.dot(weighted, moved)

    @staticmethod
    def backward(ctx, grad):
        (weighted,) = ctx.saved_tensors
        return weighted * (2 * grad), None, None


def combine_quadratics(anchors: list[dict[str, torch.Tensor]], importances: list[dict[str, torch.Tensor]]
                       ) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """The anchors' penalties as one quadratic per parameter: ``{name: (A, m, c)}`` with

        sum_k Omega_k (theta - theta*_k)^2 = A (theta - m)^2 + c,
        A = sum_k Omega_k,  m = sum_k Omega_k theta*_k / A  (0 where A = 0),  c = sum(sum_k Omega_k theta*_k^2 - A m^2),

    completing the square: a step costs one quadratic per parameter however many anchors
    there are, with the same value and gradient as the sum over anchors. An anchor that
    covers only the first rows of a grown head adds to those rows. Computed in float64; with
    one anchor m is theta* exactly and c is 0.
    """
    combined = {}
    for name in dict.fromkeys(n for anchor in anchors for n in anchor):
        parts = [(anchor[name], omega[name]) for anchor, omega in zip(anchors, importances) if name in anchor]
        shape = tuple(max(sizes) for sizes in zip(*(theta.shape for theta, _ in parts)))
        like = parts[-1][0]
        a, b, cc = (torch.zeros(shape, dtype=torch.float64, device=like.device) for _ in range(3))
        for theta, omega in parts:
            rows = tuple(slice(0, size) for size in theta.shape)
            weighted = omega.double() * theta.double()
            a[rows] += omega.double()
            b[rows] += weighted
            cc[rows] += weighted * theta.double()
        m = torch.where(a > 0, b / a.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(b))
        combined[name] = (a.to(like.dtype), m.to(like.dtype), float((cc - a * m * m).sum()))
    return combined


def _add_into(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """new + old on the entries old covers (all of them, unless a Class-IL head grew in between)."""
    out = new.clone()
    out[tuple(slice(0, s) for s in old.shape)] += old
    return out


def experience_fisher(learner, experience, batch_size: int = 64) -> dict[str, torch.Tensor]:
    """The diagonal empirical Fisher of the learner's model on ``experience``'s training data (its head)."""
    from ..learner import ExperienceData

    head = learner.stream.head_name(experience)
    batches = ExperienceData(experience, learner, "train").batches(batch_size)
    return empirical_fisher(getattr(learner.model, "module", learner.model), batches,
                            lambda out, y: -F.cross_entropy(out[head].float(), y, reduction="none"))


class L2(QuadraticPenalty):
    name = "l2"

    def importance(self, learner, experience):
        return {n: torch.ones_like(p) for n, p in named_trainable(learner.model).items()}


class EWC(QuadraticPenalty):
    name = "ewc"
    separate = True

    def importance(self, learner, experience):
        return experience_fisher(learner, experience)


class OnlineEWC(QuadraticPenalty):
    name = "online_ewc"

    def __init__(self, strength: float = 1.0, gamma: float = 1.0):
        super().__init__(strength)
        if not 0 < gamma <= 1:
            raise ConfigError(f"online EWC's gamma must be in (0, 1], got {gamma}.")
        self.gamma = gamma

    def importance(self, learner, experience):
        return experience_fisher(learner, experience)

    def merge(self, old, new):
        return super().merge({n: self.gamma * v for n, v in old.items()}, new)


class SI(QuadraticPenalty):
    """Synaptic Intelligence: importance from each parameter's contribution to the loss drop.

    omega is accumulated from the gradient the optimizer applied (``.grad`` after the full
    backward, the penalty included) and the step it took, as the paper's running sum
    -sum_t g(t) * delta_theta(t) along the actual training trajectory.
    """

    name = "si"
    half = False

    def __init__(self, strength: float = 1.0, xi: float = 0.1):
        super().__init__(strength)
        self.xi = _positive("SI's damping xi", xi)
        self.start: dict[str, torch.Tensor] = {}
        self.previous: dict[str, torch.Tensor] = {}
        self.omega: dict[str, torch.Tensor] = {}

    def before_experience(self, learner, experience) -> None:
        params = named_trainable(learner.model)
        self.start = {n: p.detach().clone() for n, p in params.items()}
        self.previous = {n: p.detach().clone() for n, p in params.items()}
        self.omega = {n: torch.zeros_like(p) for n, p in params.items()}

    def after_step(self, learner, model) -> None:
        for name, p in named_trainable(model).items():
            if p.grad is not None and name in self.omega:
                now = p.detach()
                self.omega[name] -= p.grad.detach() * (now - self.previous[name])
                self.previous[name] = now.clone()

    def importance(self, learner, experience):
        params = named_trainable(learner.model)
        return {n: self.omega[n] / ((params[n].detach() - self.start[n]) ** 2 + self.xi) for n in self.omega}
