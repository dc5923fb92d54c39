"""Walking the autograd graph of a forward pass: who uses a tensor, and which leaves a loss reaches."""

from __future__ import annotations

from typing import Iterable

import torch


def consumer_map(roots: Iterable) -> dict[object, list[tuple[object, int]]]:
    """For every node under the ``roots`` (graph nodes), the ``(node, input slot)`` pairs that take it as an input."""
    consumers, seen, stack = {}, set(), [r for r in roots if r is not None]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for slot, (child, _) in enumerate(node.next_functions):
            if child is not None:
                consumers.setdefault(child, []).append((node, slot))
                stack.append(child)
    return consumers


def walk_to_boundary(losses: Iterable[torch.Tensor],
                     boundary: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """What the losses reach before a ``boundary`` (the shared representation): ``(leaves, boundary tensors)``.

    ``leaves``: the leaf tensors requiring grad reached without passing through a
    boundary tensor (the heads' parameters, and anything else a loss reads besides
    the representation); the boundary tensors: those some loss reads. Both in a fixed order.
    """
    stop: dict[object, list[int]] = {}
    for i, z in enumerate(boundary):
        if z.grad_fn is not None:
            stop.setdefault(z.grad_fn, []).append(i)
    boundary_ids = {id(z): i for i, z in enumerate(boundary)}
    leaves, reached, seen = {}, set(), set()
    stack = [loss.grad_fn for loss in losses if loss.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node in stop:
            reached.update(stop[node])
            continue
        variable = getattr(node, "variable", None)
        if variable is not None:
            if id(variable) in boundary_ids:
                reached.add(boundary_ids[id(variable)])
            else:
                leaves.setdefault(id(variable), variable)
        stack.extend(child for child, _ in node.next_functions if child is not None)
    return list(leaves.values()), [boundary[i] for i in sorted(reached)]
