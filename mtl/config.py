"""TrainerConfig: every setting of the training loop, validated up front."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from .errors import ConfigError

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULERS = ("none", "step", "cosine")
PRECISIONS = ("no", "bf16", "fp16")
NONFINITE_POLICIES = ("error", "skip")

#: settings that do not change what a run computes, so a resumed run may change them
RESUMABLE_CHANGES = frozenset({"progress", "checkpoint_every", "checkpoint_epochs", "num_workers", "tensorboard"})


@dataclass
class TrainerConfig:
    epochs: int = 10
    batch_size: int = 256
    eval_batch_size: int | None = None  # defaults to batch_size
    drop_last: bool = False
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9  # sgd only
    adam_beta1: float = 0.9  # adam / adamw only
    adam_beta2: float = 0.999
    scheduler: str = "none"  # stepped once per epoch
    step_size: int = 30  # epochs between decays, for "step"
    gamma: float = 0.1
    grad_clip: float | None = None  # max global L2 norm
    mixed_precision: str = "no"
    seed: int = 0
    deterministic: bool = False
    checkpoint_every: int = 0  # steps; 0 = only at the end of each epoch
    checkpoint_epochs: bool = True  # False: no checkpoint at epoch ends (a caller that checkpoints itself)
    on_nonfinite: str = "error"
    log_every: int = 10  # steps between history/tracker records
    progress: bool = True
    tensorboard: bool = True
    num_workers: int = 0
    cpu: bool = False  # force the CPU even when a GPU is there

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("scheduler", self.scheduler, SCHEDULERS)
        _choice("mixed_precision", self.mixed_precision, PRECISIONS)
        _choice("on_nonfinite", self.on_nonfinite, NONFINITE_POLICIES)
        for name in ("epochs", "batch_size", "log_every", "step_size"):
            _positive_int(name, getattr(self, name))
        if self.eval_batch_size is not None:
            _positive_int("eval_batch_size", self.eval_batch_size)
        for name in ("checkpoint_every", "num_workers"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}.")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"learning rate must be a positive number, got {self.lr}.")
        if self.weight_decay < 0 or not 0 < self.gamma <= 1:
            raise ConfigError(f"need weight_decay >= 0 and 0 < gamma <= 1, got {self.weight_decay}, {self.gamma}.")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}.")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ConfigError(f"grad_clip must be > 0 (or None to disable), got {self.grad_clip}.")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainerConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def _choice(name, value, allowed):
    if value not in allowed:
        raise ConfigError(f"unknown {name} '{value}'; choose one of: {', '.join(allowed)}.")


def _positive_int(name, value):
    if not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}.")
