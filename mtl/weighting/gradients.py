"""Per-task gradients of a loss vector, in one batched pass where torch allows it."""

from __future__ import annotations

from typing import Sequence

import torch


def per_task_gradients(losses: Sequence[torch.Tensor], inputs: list, batched: bool = True) -> list[torch.Tensor]:
    """Gradients of each scalar loss w.r.t. each input: one tensor ``(T, *input.shape)`` per input.

    ``losses`` are the tasks' own scalar losses, not slices of a stacked vector: a
    backward pass from ``stacked[t]`` would run every other task's head on zero
    gradients, while one from ``losses[t]`` visits task t's head only.

    ``batched=True`` back-propagates the T unit vectors together
    (``autograd.grad(..., is_grads_batched=True)``, vmap over the backward pass).
    Operations without a batching rule (on the CPU: convolution, batch-norm and
    max-pool backward) then run once per task inside that call, so the gain over
    the per-task loop is per-operation overhead only (about 1.1x for ResNet-18 at
    T = 40, ``benchmarks/results/weighting.md``), and every head sees all T
    cotangents. A call that fails outright falls back to one backward per task.
    The graph is kept for the caller's later backward pass. Inputs (tensors or
    ``GradientEdge``s) that a task does not reach get zeros.
    """
    return split_gradients(losses, inputs, [], batched)[0]


def split_gradients(losses: Sequence[torch.Tensor], per_task: list, summed: list[torch.Tensor],
                    batched: bool = True) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-task gradients w.r.t. ``per_task`` inputs and, from the same backward passes, ``sum_t grad L_t``
    w.r.t. ``summed`` inputs (the heads' parameters, which need no per-task split)."""
    losses = list(losses)
    T = len(losses)
    inputs = list(per_task) + list(summed)
    n = len(per_task)
    if batched and T > 1:
        stacked = torch.stack(losses)
        eye = torch.eye(T, dtype=stacked.dtype, device=stacked.device)
        try:
            grads = torch.autograd.grad(stacked, inputs, grad_outputs=eye, retain_graph=True,
                                        allow_unused=True, is_grads_batched=True)
            grads = [_zeros_if_none(g, x, T) for g, x in zip(grads, inputs)]
            return grads[:n], [g.sum(0) for g in grads[n:]]
        except RuntimeError:
            pass
    columns: list[list] = [[] for _ in per_task]
    totals: list = [None] * len(summed)
    for loss in losses:
        grads = torch.autograd.grad(loss, inputs, retain_graph=True, allow_unused=True)
        for column, g in zip(columns, grads[:n]):
            column.append(g)
        totals = [g if total is None else total if g is None else total + g for total, g in zip(totals, grads[n:])]
    return ([torch.stack(_zeros_for_none(column, x)) for column, x in zip(columns, per_task)],
            [torch.zeros_like(x) if g is None else g for g, x in zip(totals, summed)])


def _zeros_if_none(grad, like, T):
    if grad is not None:
        return grad
    return torch.zeros((T, *like.shape), dtype=like.dtype, device=like.device)


def _zeros_for_none(grads: list, like) -> list[torch.Tensor]:
    """One task's missing gradient is zeros shaped like another task's (``like`` may be a GradientEdge)."""
    model = next((g for g in grads if g is not None), like)
    if not isinstance(model, torch.Tensor):
        raise ValueError("no task reaches this gradient edge; pass only inputs that some loss reaches.")
    return [torch.zeros_like(model) if g is None else g for g in grads]


def flat_matrix(grads: list[torch.Tensor]) -> torch.Tensor:
    """``[(T, ...), ...]`` -> ``(T, P)``: each task's gradient as one row."""
    return torch.cat([g.reshape(g.shape[0], -1) for g in grads], dim=1)


def gram_matrix(grads: list[torch.Tensor], chunk: int = 1 << 18) -> torch.Tensor:
    """``M @ M.T`` in float64 for ``M = flat_matrix(grads)`` (``(T, T)``), without building ``M``.

    The rows go through one reused float64 buffer of ``T x chunk`` entries, a block of
    columns at a time, so the extra memory is that buffer instead of ``M`` and its float64
    copy (3 x T x P x 4 bytes; 5 GiB for ResNet-18 at T = 40, each step touching fresh pages).
    """
    T = grads[0].shape[0]
    device = grads[0].device
    gram = torch.zeros(T, T, dtype=torch.float64, device=device)
    width = max(1, min(chunk, max(g[0].numel() for g in grads)))
    buffer = torch.empty(T, width, dtype=torch.float64, device=device)
    for g in grads:
        rows = g.reshape(T, -1)
        for start in range(0, rows.shape[1], width):
            part = rows[:, start:start + width]
            block = buffer[:, :part.shape[1]]
            block.copy_(part)
            gram.addmm_(block, block.T)
    return gram
