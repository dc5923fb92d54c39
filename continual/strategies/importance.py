"""Importance-weighted quadratic penalties beyond EWC: MAS, EWC++ and RWalk.

All three are ``QuadraticPenalty`` strategies with one anchor (the weights at the end of the
last experience); they differ in the importance Omega of ``sum_i Omega_i (theta_i - theta*_i)^2``:

- ``mas``: Memory Aware Synapses (Aljundi et al., ECCV 2018, section 3): the mean over the
  experience's training samples of |d ||f(x)||_2^2 / d theta|, per sample; summed over
  experiences; penalty lambda * sum Omega (theta - theta*)^2 (no 1/2).
- ``ewc_pp``: EWC++ (Chaudhry et al., ECCV 2018, "Riemannian Walk", section 4.1, eq. 6): the
  diagonal Fisher is a moving average updated during training, F <- alpha F_batch + (1 - alpha) F;
  the penalty uses F at the end of the experience, lambda/2 sum F (theta - theta*)^2.
- ``rwalk``: RWalk (same paper, sections 4.2-4.3, eq. 7-8): EWC++'s Fisher plus a path score
  s accumulated along the optimisation trajectory; penalty lambda * sum (F + s) (theta - theta*)^2,
  with F and s each normalised to [0, 1].

``per_sample_gradients`` is the generic torch.func (functional_call + grad + vmap) helper MAS
uses; ``continual.fisher`` computes its per-sample squares with the same three calls.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from mtl.errors import ConfigError

from ..fisher import empirical_fisher
from .base import named_trainable
from .regularisation import QuadraticPenalty


def per_sample_gradients(model: nn.Module, names, fn, inputs: torch.Tensor, *per_sample, chunk_size=None,
                         **model_kwargs) -> dict[str, torch.Tensor]:
    """``{name: (N, *parameter shape)}``: the gradient of ``fn(model(x_n), *args_n)`` for every sample n.

    ``fn`` gets the model's output on a batch of ONE sample (and the matching one-row slices of
    ``per_sample`` tensors, e.g. targets) and returns a scalar. Parameters not in ``names`` and
    buffers are held fixed. The caller chooses the module's mode (eval for importances).
    """
    wanted = set(names)
    selected = {n: p.detach() for n, p in model.named_parameters() if n in wanted}
    fixed = {n: p.detach() for n, p in model.named_parameters() if n not in wanted}
    fixed.update(dict(model.named_buffers()))

    def one_sample(params, x, *rest):
        out = functional_call(model, {**fixed, **params}, (x.unsqueeze(0),), model_kwargs)
        return fn(out, *(r.unsqueeze(0) for r in rest)).reshape(())

    in_dims = (None, 0, *([0] * len(per_sample)))
    return vmap(grad(one_sample), in_dims=in_dims, chunk_size=chunk_size)(selected, inputs, *per_sample)


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """Eval mode inside (BatchNorm reads its running statistics, dropout is off); every module's mode restored."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes.items():
            m.train(training)


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def _resized(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """``t`` laid into zeros shaped like ``like`` (a Class-IL head grew since ``t``); zeros for None."""
    out = torch.zeros_like(like)
    if t is not None:
        out[tuple(slice(0, s) for s in t.shape)] = t
    return out


def _global_max_normalised(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every tensor divided by the largest entry over all of them (so all lie in [0, 1]); zeros stay zeros."""
    top = max((float(v.max()) for v in values.values() if v.numel()), default=0.0)
    return {n: v / top if top > 0 else v.clone() for n, v in values.items()}


class MAS(QuadraticPenalty):
    """Memory Aware Synapses (Aljundi et al., ECCV 2018, section 3).

    Omega_i = (1 / N) sum_n | d ||f(x_n)||_2^2 / d theta_i |: the paper's importance (the mean
    over samples of the gradient's magnitude) with its global output function, the squared l2
    norm of the output. Here f(x) are the LOGITS of the experience's head (its Task-IL head, or
    every output of the Class-IL / Domain-IL head the model has so far), on the experience's N
    training samples, one gradient per sample (torch.func), model in eval mode. MAS needs no
    labels. Importances add up over experiences (one anchor, Omega <- Omega + Omega_new), and
    the penalty is lambda * sum_i Omega_i (theta_i - theta*_i)^2 (no 1/2).
    """

    name = "mas"
    half = False
    batch_size = 64  # samples per vmap call: bounds memory at batch x parameters values

    def importance(self, learner, experience):
        from ..learner import ExperienceData

        net = _unwrap(learner.model)
        head = learner.stream.head_name(experience)
        names = list(named_trainable(net))
        totals = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in named_trainable(net).items()}
        device, count = next(net.parameters()).device, 0

        def squared_norm(out):
            return out[head].float().square().sum()

        with _eval_mode(net):
            for x, _, _ in ExperienceData(experience, learner, "train").batches(self.batch_size):
                grads = per_sample_gradients(net, names, squared_norm, x.to(device), tasks=[head])
                for n in names:
                    totals[n] += grads[n].abs().sum(0, dtype=torch.float64)
                count += len(x)
        params = named_trainable(net)
        return {n: (total / max(count, 1)).to(params[n].dtype) for n, total in totals.items()}


class EWCPlusPlus(QuadraticPenalty):
    """EWC++ (Chaudhry et al., ECCV 2018, section 4.1): one Fisher, a moving average over training.

    Every ``update_every`` optimizer steps (counted from each experience's first step, which
    always updates), the training batch's empirical Fisher F_batch -- the mean over its samples
    of squared per-sample gradients of log p(y | x) with the true labels, from
    ``continual.fisher.empirical_fisher`` on the experience's head, at the weights before the
    step -- enters the running average (eq. 6)

        F <- alpha * F_batch + (1 - alpha) * F,

    which runs on across experiences (it starts at the first batch's Fisher, not at zeros).
    After an experience, the anchor is the current weights and the importance is the running F
    at that point (replacing, not adding to, the previous one: F already remembers the past);
    penalty lambda/2 sum_i F_i (theta_i - theta*_i)^2.

    Defaults alpha = 0.9 and update_every = 10: the MNIST settings of the first author's
    released code (facebookresearch/agem; 50 steps on CIFAR), which reports of the paper's
    supplementary (B.3) agree with. F_batch is the per-sample empirical Fisher of ONE batch
    every update_every steps (that code averages squared batch gradients over the interval
    instead). Parameters a batch does not reach (other Task-IL heads) get F_batch = 0, so
    their F decays: eq. 6 as written.
    """

    name = "ewc_pp"

    def __init__(self, strength: float = 1.0, alpha: float = 0.9, update_every: int = 10):
        super().__init__(strength)
        if not 0 < alpha <= 1:
            raise ConfigError(f"{self.name}'s alpha (the weight of each new batch's Fisher) must be in (0, 1], "
                              f"got {alpha}; the paper uses 0.9.")
        if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
            raise ConfigError(f"{self.name}'s update_every must be a positive integer number of steps, got "
                              f"{update_every!r}; the paper updates every 10 steps on MNIST.")
        self.alpha, self.update_every = float(alpha), update_every
        self.fisher: dict[str, torch.Tensor] = {}
        self.steps = 0
        self.head: str | None = None

    def before_experience(self, learner, experience) -> None:
        self.steps = 0
        self.head = learner.stream.head_name(experience)

    def extra_losses(self, learner, model, batch, z, logits):
        net = _unwrap(model)
        if net.training and self.steps % self.update_every == 0:
            self.update_fisher(net, batch[0], batch[1])
        return super().extra_losses(learner, model, batch, z, logits)

    def update_fisher(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
        """One step of eq. 6 with the empirical Fisher of the batch ``(x, y)`` on the current head."""
        head = self.head

        def log_likelihood(out, targets):
            return -F.cross_entropy(out[head].float(), targets, reduction="none")

        batch_fisher = empirical_fisher(net, (x, y), log_likelihood, params=list(named_trainable(net)))
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for f in batch_fisher.values():  # every rank keeps the Fisher of the global batch
                dist.all_reduce(f)
                f /= dist.get_world_size()
        self.fisher = {n: f if n not in self.fisher else self.alpha * f + (1 - self.alpha) * _resized(self.fisher[n], f)
                       for n, f in batch_fisher.items()}

    def after_step(self, learner, model) -> None:
        self.steps += 1

    def importance(self, learner, experience):
        return {n: _resized(self.fisher.get(n), p.detach()) for n, p in named_trainable(learner.model).items()}

    def merge(self, old, new):
        return new  # the moving average already carries the past experiences

    def get_extra_state(self):
        return {**super().get_extra_state(), "fisher": self.fisher}

    def set_extra_state(self, state) -> None:
        super().set_extra_state(state)
        self.fisher = dict(state["fisher"])

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        self.fisher = {n: fn(t) for n, t in self.fisher.items()}
        return self


class RWalk(EWCPlusPlus):
    """RWalk (Chaudhry et al., ECCV 2018, sections 4.2-4.3): EWC++'s Fisher plus a path score.

    Along training, the loss decrease each parameter caused, -g_i * delta theta_i (g: the
    gradient the optimizer applied, ``.grad`` after the full backward, as in SI), is summed over
    an interval of ``update_every`` steps (the paper's Delta t, the same interval as the Fisher
    updates) and divided by the interval's KL distance along that parameter (eq. 7):

        s_i += sum_interval(-g_i * delta theta_i) / (1/2 F_i * (theta_i(t + Delta t) - theta_i(t))^2 + epsilon),

    F the running EWC++ Fisher. With update_every = 1 this is the per-step
    (-g delta theta) / (1/2 F delta theta^2 + epsilon). At the end of an experience the
    experience's score is clipped at 0 (a parameter whose moves raised the loss gets no
    importance; the authors' code clips each interval's term instead) and averaged with the
    score so far, s <- (s_old + s_new) / 2 (section 4.3; the first experience, and entries
    with no old score, take s_new). The importance is

        Omega = F / max(F) + s / max(s),

    F at the end of the experience. The paper brings F and s to one scale, [0, 1]; lacking a
    formula we could confirm, each is divided by its largest entry over all parameters (the
    authors' code uses (x - min) / (max - min), the same when the minimum is 0). Penalty
    lambda * sum_i Omega_i (theta_i - theta*_i)^2 (eq. 8, no 1/2). epsilon = 1e-3 as in the
    authors' code.
    """

    name = "rwalk"
    half = False

    def __init__(self, strength: float = 1.0, alpha: float = 0.9, update_every: int = 10, epsilon: float = 1e-3):
        super().__init__(strength, alpha, update_every)
        if not epsilon > 0:
            raise ConfigError(f"RWalk's epsilon (the damping of the score's denominator) must be > 0, got {epsilon}; "
                              "try 1e-3.")
        self.epsilon = float(epsilon)
        self.score: dict[str, torch.Tensor] = {}  # averaged over the experiences so far, clipped
        self.path: dict[str, torch.Tensor] = {}  # this experience's score, not yet clipped
        self.gain: dict[str, torch.Tensor] = {}  # -g * delta theta summed over the open interval
        self.previous: dict[str, torch.Tensor] = {}  # the weights before the last step
        self.start: dict[str, torch.Tensor] = {}  # the weights at the start of the open interval

    def before_experience(self, learner, experience) -> None:
        super().before_experience(learner, experience)
        params = {n: p.detach() for n, p in named_trainable(learner.model).items()}
        self.previous = {n: p.clone() for n, p in params.items()}
        self.start = {n: p.clone() for n, p in params.items()}
        self.path = {n: torch.zeros_like(p) for n, p in params.items()}
        self.gain = {n: torch.zeros_like(p) for n, p in params.items()}

    def after_step(self, learner, model) -> None:
        params = named_trainable(model)
        for name, p in params.items():
            if p.grad is not None and name in self.gain:
                now = p.detach()
                self.gain[name] -= p.grad.detach() * (now - self.previous[name])
                self.previous[name] = now.clone()
        super().after_step(learner, model)
        if self.steps % self.update_every == 0:
            self.close_interval(params)

    def close_interval(self, params) -> None:
        """Add the open interval's eq.-7 term to this experience's score and open the next interval."""
        for name, gain in self.gain.items():
            if name not in params:
                continue
            now = params[name].detach()
            distance = 0.5 * _resized(self.fisher.get(name), now) * (now - self.start[name]) ** 2
            self.path[name] += gain / (distance + self.epsilon)
            gain.zero_()
            self.start[name] = now.clone()

    def importance(self, learner, experience):
        if self.steps % self.update_every:  # a last, shorter interval
            self.close_interval(named_trainable(learner.model))
        new = {n: s.clamp(min=0) for n, s in self.path.items()}
        self.score = {n: _averaged(self.score.get(n), s) for n, s in new.items()}
        fisher = _global_max_normalised(super().importance(learner, experience))
        score = _global_max_normalised(self.score)
        return {n: f + (score[n] if n in score else 0) for n, f in fisher.items()}

    def get_extra_state(self):
        return {**super().get_extra_state(), "score": self.score}

    def set_extra_state(self, state) -> None:
        super().set_extra_state(state)
        self.score = dict(state["score"])

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        self.score = {n: fn(t) for n, t in self.score.items()}
        return self


def _averaged(old: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
    """(old + new) / 2 where ``old`` has entries, ``new`` elsewhere (first experience, grown rows, new heads)."""
    out = new.clone()
    if old is not None:
        region = tuple(slice(0, s) for s in old.shape)
        out[region] = 0.5 * (old + new[region])
    return out


__all__ = ["EWCPlusPlus", "MAS", "RWalk", "per_sample_gradients"]
