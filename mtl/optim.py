"""Optimizer and per-epoch learning-rate schedule from a TrainerConfig."""

from __future__ import annotations

from typing import Callable

import torch
from torch.optim.sgd import sgd

from .config import TrainerConfig

try:  # the hooks torch.optim.register_optimizer_step_{pre,post}_hook fill (module-level dicts)
    from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks
    _GLOBAL_STEP_HOOKS = (_global_optimizer_pre_hooks, _global_optimizer_post_hooks)
except ImportError:  # another torch: treat every step as observed, i.e. always call optimizer.step()
    _GLOBAL_STEP_HOOKS = (None,)


#: devices torch has fused SGD / Adam / AdamW kernels for
FUSED_DEVICES = ("cpu", "cuda")


def build_optimizer(params, cfg: TrainerConfig, device: torch.device | str | None = None) -> torch.optim.Optimizer:
    """``params``: parameters, or groups ``{"params": [...], "lr_scale": s}`` trained at ``s * cfg.lr``.

    ``device``: where the parameters will train. On a CPU or CUDA device the optimizer uses
    torch's fused kernel (one kernel for every parameter's update: the same update rule,
    about half the time of the per-parameter loop at small batches); elsewhere, and when
    no device is given, torch's default implementation.
    """
    params = list(params)
    if params and isinstance(params[0], dict):
        params = [{"params": g["params"], "lr": cfg.lr * g.get("lr_scale", 1.0)} for g in params]
    fused = {"fused": True} if device is not None and torch.device(device).type in FUSED_DEVICES else {}
    if cfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, **fused)
        if fused and cfg.momentum:
            _zero_momentum(optimizer, device)
        return optimizer
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=betas, weight_decay=cfg.weight_decay, **fused)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=betas, weight_decay=cfg.weight_decay, **fused)


def _zero_momentum(optimizer: torch.optim.SGD, device) -> None:
    """A zero momentum buffer for every trainable parameter, made up front on ``device`` (where it will train).

    torch's fused SGD makes its buffers at a step only if no parameter has one yet, and fails at a later
    step that reaches a parameter without one: in Task-IL replay, an old task's head first reached by a
    replayed sample of its task. Without dampening (never set here) a zero buffer gives the update a
    missing one gives, bit for bit: momentum * 0 + g = g.
    """
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.requires_grad:
                optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p, device=device)


def build_scheduler(optimizer, cfg: TrainerConfig):
    """A scheduler stepped once per epoch, or None."""
    if cfg.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma)
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    return None


def direct_step(optimizer: torch.optim.Optimizer) -> Callable[[], None]:
    """``optimizer.step`` as a plain function: the same update without ``Optimizer.step``'s per-call bookkeeping.

    torch's ``Optimizer.step`` runs the step hooks inside a profiler annotation and switches
    TorchDynamo off on every call: on a CPU about 80 us, as long as the fused update of a small
    network itself. For a fused ``torch.optim.SGD`` the returned function runs the fused kernel
    that ``SGD.step`` runs (``torch._fused_sgd_``) on the same groups and state: directly where
    every parameter of a group with a gradient has a momentum buffer and the group is on one
    device in one dtype (then there is nothing to sort out), otherwise through the functional
    update ``SGD.step`` calls (``torch.optim.sgd.sgd``), storing the momentum buffers back as
    ``SGD.step`` does (tests compare both paths with ``SGD.step`` bit for bit). It defers to
    ``optimizer.step()`` whenever something expects that call: step hooks, a learning-rate
    scheduler's wrapper of ``step``, differentiable groups, any other optimizer.
    """
    if not (type(optimizer) is torch.optim.SGD and hasattr(optimizer, "_init_group")
            and all(g.get("fused") and not g.get("differentiable") for g in optimizer.param_groups)):
        return optimizer.step
    kernel = getattr(torch, "_fused_sgd_", None)
    one_kind: dict[int, bool] = {}  # id(group) -> whether its parameters share one device and dtype

    def step() -> None:
        if _step_is_observed(optimizer):
            optimizer.step()
            return
        with torch.no_grad():
            for group in optimizer.param_groups:
                momentum = group["momentum"]
                params = [p for p in group["params"] if p.grad is not None]  # SGD.step skips the others too
                grads = [p.grad for p in params]
                buffers = [optimizer.state.get(p, _NO_STATE).get("momentum_buffer") for p in params] if momentum else []
                if id(group) not in one_kind:
                    one_kind[id(group)] = len({(p.device, p.dtype) for p in group["params"]}) <= 1
                if kernel is None or not one_kind[id(group)] or any(b is None for b in buffers):
                    _functional_step(optimizer, group)
                    continue
                if params:
                    kernel(params, grads, buffers, weight_decay=group["weight_decay"], momentum=momentum,
                           lr=group["lr"], dampening=group["dampening"], nesterov=group["nesterov"],
                           maximize=group["maximize"], is_first_step=False)

    return step


_NO_STATE: dict = {}  # what a parameter the optimizer has not stepped yet has (not added to its state)


def _functional_step(optimizer: torch.optim.SGD, group: dict) -> None:
    """One group's update as ``SGD.step`` does it (the first step, parameters without a gradient, mixed devices)."""
    params, grads, buffers = [], [], []
    sparse = optimizer._init_group(group, params, grads, buffers)
    sgd(params, grads, buffers, weight_decay=group["weight_decay"], momentum=group["momentum"],
        lr=group["lr"], dampening=group["dampening"], nesterov=group["nesterov"],
        maximize=group["maximize"], has_sparse_grad=sparse, foreach=None, fused=True,
        grad_scale=None, found_inf=None)
    if group["momentum"] != 0:
        for p, buffer in zip(params, buffers):
            optimizer.state[p]["momentum_buffer"] = buffer


def _step_is_observed(optimizer: torch.optim.Optimizer) -> bool:
    """Whether something runs on ``optimizer.step()`` besides the update: hooks, or a wrapper set on the instance
    (a learning-rate scheduler's step counter)."""
    hooks = (getattr(optimizer, "_optimizer_step_pre_hooks", None), getattr(optimizer, "_optimizer_step_post_hooks", None),
             *_GLOBAL_STEP_HOOKS)
    return any(h is None or len(h) for h in hooks) or "step" in vars(optimizer)


def clear_grads(optimizer: torch.optim.Optimizer) -> None:
    """``optimizer.zero_grad(set_to_none=True)`` without its profiler annotation."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = None
