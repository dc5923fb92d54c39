"""MultiTaskModel: one shared encoder, one head per task."""

from __future__ import annotations

from typing import Iterable, Iterator

import torch
from torch import nn

from .errors import ConfigError


class MultiTaskModel(nn.Module):
    """Shared encoder + ``nn.ModuleDict`` of task heads.

    ``forward(x, tasks)`` returns ``{task: output}``; with ``return_rep=True`` it also
    returns the shared representation ``z`` so that weightings working on ``z``
    (MGDA-UB) get it from the same forward pass, which under DDP must go through the
    wrapped module's ``forward``.

    An encoder with ``per_task = True`` (cross-stitch columns, per-task patches) is
    called as ``encoder(x, tasks)`` and returns ``{task: representation}``; each head
    then reads its own task's entry.

    A module anywhere in the model may set ``lr_scale``: its parameters then train with
    ``lr_scale`` times the base learning rate (see ``parameter_groups``).
    """

    def __init__(self, encoder: nn.Module, heads: dict[str, nn.Module] | nn.ModuleDict):
        super().__init__()
        if not heads:
            raise ConfigError("MultiTaskModel needs at least one head; pass heads={'task': module}.")
        self.encoder = encoder
        self.heads = nn.ModuleDict(heads)

    @property
    def task_names(self) -> list[str]:
        return list(self.heads.keys())

    def encode(self, x: torch.Tensor, tasks: Iterable[str] | None = None):
        if getattr(self.encoder, "per_task", False):
            return self.encoder(x, self._check_tasks(tasks))
        return self.encoder(x)

    def decode(self, z, tasks: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        return {name: self.heads[name](z[name] if isinstance(z, dict) else z) for name in self._check_tasks(tasks)}

    def forward(self, x: torch.Tensor, tasks: Iterable[str] | None = None, return_rep: bool = False):
        tasks = self._check_tasks(tasks)
        z = self.encode(x, tasks)
        if return_rep:
            # The heads read the very tensors returned, in float32: Accelerate turns low-precision
            # outputs into float32 copies, which the heads would not have used (no gradient).
            # Feature maps are nested (each computed from the one before); reading fresh tensors
            # also makes a gradient with respect to them the heads' own (partial) one. A single
            # representation feeds nothing but the heads, so it needs no fresh view.
            if isinstance(z, (list, tuple)):
                z = [_head_input(f, fresh=True) for f in z]
            else:
                z = _head_input(z, fresh=False)
        outputs = self.decode(z, tasks)
        return (outputs, z) if return_rep else outputs

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        return self.encoder.parameters()

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        return self.heads[task].parameters()

    def parameter_groups(self) -> list[dict]:
        """The parameters grouped by learning-rate scale: ``[{"params": [...], "lr_scale": s}, ...]``.

        A parameter takes the ``lr_scale`` of its closest enclosing module that sets one (1.0 by default).
        """
        scale_of: dict[int, float] = {}
        for _, module in sorted(self.named_modules(), key=lambda item: item[0].count(".") if item[0] else -1):
            scale = getattr(module, "lr_scale", None)
            if scale is not None:
                for p in module.parameters():
                    scale_of[id(p)] = float(scale)  # deeper modules come later and win
        groups: dict[float, list[nn.Parameter]] = {}
        for p in self.parameters():
            groups.setdefault(scale_of.get(id(p), 1.0), []).append(p)
        return [{"params": params, "lr_scale": scale} for scale, params in groups.items()]

    def add_head(self, name: str, head: nn.Module) -> None:
        if name in self.heads:
            raise ConfigError(f"a head named '{name}' already exists; choose a new task name.")
        self.heads[name] = head

    def _check_tasks(self, tasks: Iterable[str] | None) -> list[str]:
        if tasks is None:
            return self.task_names
        tasks = list(tasks)
        unknown = [t for t in tasks if t not in self.heads]
        if unknown:
            raise ConfigError(f"unknown task(s) {unknown}; this model has heads {self.task_names}.")
        return tasks


def _head_input(f, fresh: bool):
    if not isinstance(f, torch.Tensor):
        return f
    if f.dtype in (torch.float16, torch.bfloat16):
        return f.float()
    return f.view_as(f) if fresh else f
