"""Per-task gradient norms of one layer's weight, without T backward passes to that weight.

For a linear or convolution layer, ``grad_W L_t = sum_n g_t[n] x[n]^T``: ``x[n]`` is the
layer's input at position ``n`` (an unfolded patch for a convolution; positions run
over the batch and the output pixels) and ``g_t[n]`` the gradient of ``L_t`` at the
layer's output there. So the T norms need only the T output gradients, which the
per-task backward passes give while stopping at the layer's output (they never enter
the layer or anything before it), and then either

- the Gram identity ``||grad_W L_t||^2 = sum_nm (x_n . x_m)(g_t[n] . g_t[m])``
  (Goodfellow 2015, "Efficient per-example gradient computations"), cheap when there
  are few positions (a late layer of a classifier: 64 positions at T = 40 on ResNet-18
  costs 0.1 GFLOP against 6 GFLOP for the gradients themselves), or
- the T gradients built by one batched matrix product, when there are many positions.

The layer is found in the autograd graph of the losses, so nothing has to be hooked
into the model before the forward pass. Weights used by other operations, or more than
once, are not handled here: ``find_layer`` returns ``None`` and the caller falls back to
plain per-task gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.graph import GradientEdge

from .gradients import per_task_gradients
from .graph import consumer_map

# Nodes a weight passes through unchanged on its way into its layer: a dtype cast under
# autocast, and the transpose inside ``F.linear``.
_PASS_THROUGH = {"ToCopyBackward0", "TBackward0"}
# Layer nodes, and the input slot the weight enters them by.
_WEIGHT_SLOT = {"ConvolutionBackward0": 1, "AddmmBackward0": 2, "MmBackward0": 1}


@dataclass
class LayerUse:
    """Where a weight is used in one forward pass: the layer's autograd node and its saved input."""

    node: object
    inputs: torch.Tensor  # (N, D_in): one row per output position

    def output_gradients(self, losses: list[torch.Tensor], batched: bool = False) -> torch.Tensor:
        """``(T, N, D_out)``: each loss's gradient at the layer's output, one row per position."""
        grads = per_task_gradients(losses, [GradientEdge(self.node, 0)], batched=batched)[0]
        T = grads.shape[0]
        if grads.dim() == 3:  # linear: (T, N, D_out)
            return grads
        return grads.flatten(3).transpose(2, 3).reshape(T, -1, grads.shape[2])  # conv: (T, B, C, *S) -> (T, B*S, C)


def find_layer(losses: list[torch.Tensor], weight: torch.Tensor) -> LayerUse | None:
    """The single linear or 2-d convolution (``groups=1``) that uses ``weight`` in the graph of ``losses``."""
    consumers = consumer_map(loss.grad_fn for loss in losses)
    accumulator = next((n for n in consumers if getattr(n, "variable", None) is weight), None)
    node, slot = _single(consumers.get(accumulator, []))
    while node is not None and type(node).__name__ in _PASS_THROUGH:
        node, slot = _single(consumers.get(node, []))
    if node is None or _WEIGHT_SLOT.get(type(node).__name__) != slot:
        return None
    name = type(node).__name__
    if name == "ConvolutionBackward0":
        x = node._saved_input
        if x.dim() != 4 or node._saved_groups != 1 or node._saved_transposed:
            return None
        patches = F.unfold(x, kernel_size=node._saved_weight.shape[2:], dilation=node._saved_dilation,
                           padding=node._saved_padding, stride=node._saved_stride)  # (B, D_in, S)
        return LayerUse(node, patches.transpose(1, 2).reshape(-1, patches.shape[1]))
    x = node._saved_mat1 if name == "AddmmBackward0" else node._saved_self
    return LayerUse(node, x)


def weight_gradient_norms(inputs: torch.Tensor, output_grads: torch.Tensor, route: str | None = None) -> torch.Tensor:
    """``||sum_n output_grads[t, n] inputs[n]^T||`` for each t.

    ``route`` is ``"gram"`` or ``"product"``; by default whichever costs fewer operations.
    """
    T, N, d_out = output_grads.shape
    d_in = inputs.shape[1]
    if route is None:
        route = "gram" if N * N * (d_in + T * d_out) <= T * N * d_in * d_out else "product"
    if route == "gram":
        x = inputs.double()
        g = output_grads.double()
        kernel = x @ x.T  # (N, N)
        squared = ((kernel @ g) * g).sum(dim=(1, 2))
        return squared.clamp_min(0).sqrt().float()
    grads = output_grads.float().transpose(1, 2) @ inputs.float()  # (T, D_out, D_in)
    return grads.flatten(1).norm(dim=1)


def _single(consumers):
    return consumers[0] if len(consumers) == 1 else (None, None)
