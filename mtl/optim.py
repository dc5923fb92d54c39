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
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, **fused)
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=betas, weight_decay=cfg.weight_decay, **fused)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=betas, weight_decay=cfg.weight_decay, **fused)


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
    network itself. For a fused ``torch.optim.SGD`` the returned function calls the functional
    update that ``SGD.step`` calls (``torch.optim.sgd.sgd``) on the same groups and state, and
    stores the momentum buffers back as ``SGD.step`` does (tests compare the two bit for bit).
    It defers to ``optimizer.step()`` whenever something expects that call: step hooks, a
    learning-rate scheduler's wrapper of ``step``, differentiable groups, any other optimizer.
    """
    if not (type(optimizer) is torch.optim.SGD and hasattr(optimizer, "_init_group")
            and all(g.get("fused") and not g.get("differentiable") for g in optimizer.param_groups)):
        return optimizer.step

    def step() -> None:
        if _step_is_observed(optimizer):
            optimizer.step()
            return
        with torch.no_grad():
            for group in optimizer.param_groups:
                params, grads, buffers = [], [], []
                sparse = optimizer._init_group(group, params, grads, buffers)
                sgd(params, grads, buffers, weight_decay=group["weight_decay"], momentum=group["momentum"],
                    lr=group["lr"], dampening=group["dampening"], nesterov=group["nesterov"],
                    maximize=group["maximize"], has_sparse_grad=sparse, foreach=None, fused=True,
                    grad_scale=None, found_inf=None)
                if group["momentum"] != 0:
                    for p, buffer in zip(params, buffers):
                        optimizer.state[p]["momentum_buffer"] = buffer

    return step


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
