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

    def encode(self, x: torch.Tensor):
        return self.encoder(x)

    def decode(self, z, tasks: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        return {name: self.heads[name](z) for name in self._check_tasks(tasks)}

    def forward(self, x: torch.Tensor, tasks: Iterable[str] | None = None, return_rep: bool = False):
        z = self.encode(x)
        outputs = self.decode(z, tasks)
        return (outputs, z) if return_rep else outputs

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        return self.encoder.parameters()

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        return self.heads[task].parameters()

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
