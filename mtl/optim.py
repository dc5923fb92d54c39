"""Optimizer and per-epoch learning-rate schedule from a TrainerConfig."""

from __future__ import annotations

import torch

from .config import TrainerConfig


def build_optimizer(params, cfg: TrainerConfig) -> torch.optim.Optimizer:
    """``params``: parameters, or groups ``{"params": [...], "lr_scale": s}`` trained at ``s * cfg.lr``."""
    params = list(params)
    if params and isinstance(params[0], dict):
        params = [{"params": g["params"], "lr": cfg.lr * g.get("lr_scale", 1.0)} for g in params]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=betas, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=betas, weight_decay=cfg.weight_decay)


def build_scheduler(optimizer, cfg: TrainerConfig):
    """A scheduler stepped once per epoch, or None."""
    if cfg.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma)
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    return None
