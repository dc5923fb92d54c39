"""Per-task gradients of a loss vector, in one batched pass where torch allows it."""

from __future__ import annotations

import torch


def per_task_gradients(losses: torch.Tensor, inputs: list[torch.Tensor], batched: bool = True) -> list[torch.Tensor]:
    """Gradients of each ``losses[t]`` w.r.t. each input: one tensor ``(T, *input.shape)`` per input.

    ``batched=True`` back-propagates the T unit vectors together
    (``autograd.grad(..., is_grads_batched=True)``, vmap over the backward pass).
    Operations without a batching rule (on the CPU: convolution, batch-norm and
    max-pool backward) then run once per task inside that call, so the gain over
    the per-task loop is per-operation overhead only (about 1.2x for ResNet-18 at
    T = 40, ``benchmarks/results/weighting.md``). A call that fails outright falls
    back to one backward per task. The graph is kept for the caller's later
    backward pass. Inputs a task does not reach get zeros.
    """
    T = losses.shape[0]
    if batched and T > 1:
        eye = torch.eye(T, dtype=losses.dtype, device=losses.device)
        try:
            grads = torch.autograd.grad(losses, inputs, grad_outputs=eye, retain_graph=True,
                                        allow_unused=True, is_grads_batched=True)
            return [_zeros_if_none(g, x, T) for g, x in zip(grads, inputs)]
        except RuntimeError:
            pass
    per_task = [torch.autograd.grad(losses[t], inputs, retain_graph=True, allow_unused=True) for t in range(T)]
    return [torch.stack([_zeros_if_none(per_task[t][i], x, None) for t in range(T)])
            for i, x in enumerate(inputs)]


def _zeros_if_none(grad, like, T):
    if grad is not None:
        return grad
    shape = like.shape if T is None else (T, *like.shape)
    return torch.zeros(shape, dtype=like.dtype, device=like.device)


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
