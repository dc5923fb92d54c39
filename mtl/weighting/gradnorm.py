"""GradNorm (Chen, Badrinarayanan, Lee & Rabinovich, ICML 2018).

Task weights w_t (initialised to 1) are learned so that the gradient norms of the
weighted losses at the last shared layer W, G_t = ||grad_W w_t L_t||, move towards
a common scale set by each task's relative inverse training rate:

    target_t = mean_s(G_s) * r_t^alpha,   r_t = (L_t / L_t(0)) / mean_s(L_s / L_s(0)),
    L_grad   = sum_t |G_t - target_t|      (target held constant, eq. 2 of the paper).

Each step: the network gets the gradient of sum_t w_t L_t; the weights get
grad_w L_grad from their own optimizer; then the weights are renormalised to sum
to T (section 3.2). Since G_t = w_t ||grad_W L_t|| exactly, only the T gradient
norms of the unweighted losses at W are needed, not a second-order graph. When W
belongs to a linear or convolution layer they come from the layer's input and the T
gradients at its output (``layer_gradients.py``), which costs a fraction of T
backward passes to W; otherwise from the per-task gradients at W.

On several processes the norms are those of the global batch's gradients: the
layer's inputs and output gradients (or the per-task gradients at W) of every
process are combined before the norms are taken, so every process computes the
same weight update.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from .base import Weighting
from .gradients import per_task_gradients
from .layer_gradients import find_layer, weight_gradient_norms


class GradNormWeighting(Weighting):
    needs_shared_params = True
    own_optimizer = True

    def __init__(self, task_names, alpha: float = 1.5, lr: float = 0.025, batched: bool = False):
        super().__init__(task_names)
        if alpha < 0:
            raise ConfigError(f"GradNorm's asymmetry alpha must be >= 0, got {alpha} (the paper uses 0.12 to 3).")
        if not lr > 0:
            raise ConfigError(f"GradNorm's weight learning rate must be > 0, got {lr}.")
        self.alpha, self.batched = float(alpha), batched
        T = len(self.task_names)
        self.task_weights = nn.Parameter(torch.ones(T))
        self.register_buffer("initial_losses", torch.full((T,), float("nan")))
        self.optimizer = torch.optim.Adam([self.task_weights], lr=lr)

    def on_bind(self):
        self.refuse_fp16()

    def get_extra_state(self):
        return {"optimizer": self.optimizer.state_dict()}

    def set_extra_state(self, state):
        self.optimizer.load_state_dict(state["optimizer"])

    def _apply(self, fn, *args, **kwargs):  # keep the optimizer's state on the weights' device
        super()._apply(fn, *args, **kwargs)
        for state in self.optimizer.state.values():
            for k, v in state.items():
                if torch.is_tensor(v) and v.dim() > 0:
                    state[k] = fn(v)
        return self

    @staticmethod
    def last_shared_weight(shared_params) -> nn.Parameter:
        weights = [p for p in (shared_params or []) if p.requires_grad and p.dim() >= 2]
        if not weights:
            raise ConfigError(
                "GradNorm needs the weight of the last shared layer (a trainable parameter with >= 2 "
                "dimensions among the shared parameters), and the model has none; give the model a shared "
                "encoder with a trainable layer, or use another weighting."
            )
        return weights[-1]

    def gradient_norms(self, losses: list[torch.Tensor], W: nn.Parameter) -> torch.Tensor:
        """``||grad_W L_t||`` for each task, of the global batch's mean loss."""
        layer = find_layer(losses, W)
        if layer is None:
            grads = per_task_gradients(losses, [W], batched=self.batched)[0].flatten(1)  # (T, |W|), a view: no copy
            return self.all_mean(grads.detach().float()).norm(dim=1)
        inputs = self.all_rows(layer.inputs.detach())
        output_grads = layer.output_gradients(losses, self.batched).detach()  # (T, N, D_out)
        output_grads = self.all_rows(output_grads.transpose(0, 1)).transpose(0, 1)  # rows of every process
        # each process's loss is a mean over its share of the batch: the global one is their mean
        return weight_gradient_norms(inputs, output_grads) / self.num_processes

    def backward(self, losses, shared_params=None, rep=None):
        per_task = self.ordered(losses)
        L = torch.stack(per_task)
        norms = self.gradient_norms(per_task, self.last_shared_weight(shared_params))
        global_losses = self.all_mean(L.detach().float())
        if torch.isnan(self.initial_losses).any():
            self.initial_losses.copy_(global_losses)

        w = self.task_weights
        weights_used = w.detach().clone()
        self.run_backward((weights_used.to(L.dtype) * L).sum())  # the network's gradient

        G = w * norms
        ratios = global_losses / self.initial_losses
        target = (G.mean() * (ratios / ratios.mean()) ** self.alpha).detach()
        grad_loss = (G - target).abs().sum()
        self.optimizer.zero_grad(set_to_none=True)
        w.grad = torch.autograd.grad(grad_loss, w)[0]
        self.optimizer.step()
        with torch.no_grad():
            w.mul_(len(self.task_names) / w.sum())
        return self.as_dict(weights_used)
