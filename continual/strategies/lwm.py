"""Learning without Memorizing (Dhar et al., CVPR 2019, arXiv:1811.08051, section 3).

- ``lwm``: LwF's distillation L_D (Li & Hoiem; see ``distillation.py``) plus the attention
  distillation loss L_AD: the old model M_{t-1} (a frozen snapshot taken before the
  experience) and the model being trained M_t should look at the same places of an image
  when they score the old model's top base class b:

      L_AD = || Q_old / ||Q_old||_2 - Q_new / ||Q_new||_2 ||_1

  where Q is the vectorised Grad-CAM map (Selvaraju et al., ICCV 2017, eq. 1-2) for class
  b at the last convolutional layer of the encoder. The whole objective is
  L_C + beta L_D + gamma L_AD. M_t's map keeps its graph (second-order terms), so L_AD
  trains the encoder through both the activations and the Grad-CAM weights.

Class-IL: b is the old model's top class among the old classes of the grown head. Task-IL:
every old task's head gives its own b, L_D and L_AD, summed over the old heads (as LwF
sums its distillation). The map is taken at the output of the last ``Conv1d/2d/3d``
module in the encoder's registration order (for multilenet: ``conv2``, before its
dropout, pooling and ReLU). Batches are independent rows (no BatchNorm coupling in train
mode is assumed), so one gradient of the summed scores gives every row its own map.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mtl.errors import ConfigError

from .base import Strategy
from .distillation import LwF, soft_cross_entropy

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def last_conv_layer(module: nn.Module) -> str:
    """The qualified name of the last convolution registered in ``module``."""
    names = [name for name, m in module.named_modules() if isinstance(m, CONV_TYPES)]
    if not names:
        raise ConfigError(f"LwM needs a convolutional encoder, e.g. --encoder multilenet; the "
                          f"{type(module).__name__} encoder has no convolutional layer to take Grad-CAM maps at.")
    return names[-1]


def grad_cam(activations: torch.Tensor, scores: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
    """Vectorised Grad-CAM maps, ``(N, spatial positions)``.

    ``activations``: ``(N, K, *spatial)`` feature maps A^k the ``scores`` were computed from;
    ``scores``: each row's score y^c for the class its map explains. Weights
    alpha_k = spatial mean of d y^c / d A^k; map = ReLU(sum_k alpha_k A^k). With
    ``create_graph`` the map can be differentiated again (the model being trained).
    """
    (grads,) = torch.autograd.grad(scores.sum(), activations, create_graph=create_graph, retain_graph=True)
    spatial = tuple(range(2, activations.dim()))
    weights = grads.mean(dim=spatial, keepdim=True)
    return F.relu((weights * activations).sum(1)).flatten(1)


def attention_distillation(old_maps: torch.Tensor, new_maps: torch.Tensor) -> torch.Tensor:
    """L_AD: mean over rows of || Q_old / ||Q_old||_2 - Q_new / ||Q_new||_2 ||_1 (an all-zero map stays zero)."""
    old, new = F.normalize(_full(old_maps), dim=1), F.normalize(_full(new_maps), dim=1)
    return (old - new).abs().sum(1).mean()


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t  # low precision -> float32


class ActivationProbe:
    """A forward hook keeping a module's output from the latest forward pass with gradients on.

    ``leaf``: detach the output and make it a leaf that requires grad, so a frozen model (the
    old one, whose parameters need no gradient) still gives d score / d activation.
    """

    def __init__(self, module: nn.Module, leaf: bool = False):
        self.leaf, self.output = leaf, None
        self.handle = module.register_forward_hook(self)

    def __call__(self, module, inputs, output):
        if not torch.is_grad_enabled():
            return None  # evaluation: nothing to keep
        if self.leaf:
            output = output.detach().requires_grad_(True)
        self.output = output
        return output

    def take(self) -> torch.Tensor | None:
        output, self.output = self.output, None  # do not hold a batch's graph past its step
        return output

    def remove(self) -> None:
        self.handle.remove()
        self.output = None


class LwM(LwF):
    """LwF + attention distillation. ``beta``: weight of L_D; ``attention``: gamma, the weight of L_AD;
    ``temperature``: L_D's softening (LwF's T = 2)."""

    name = "lwm"
    settings = ("task", "class")
    extra_loss_names = ("distillation", "attention")

    def __init__(self, beta: float = 1.0, attention: float = 1.0, temperature: float = 2.0):
        gamma = attention  # the paper's gamma
        for name, value, loss in (("beta", beta, "distillation loss L_D"), ("attention", gamma, "attention loss L_AD")):
            if not value >= 0:  # NaN too
                raise ConfigError(f"LwM's weight {name} (of the {loss}) must be a number >= 0, got {value}; e.g. 1.0.")
        super().__init__(alpha=beta, temperature=temperature)
        self.beta, self.gamma = beta, gamma
        self.conv_name: str | None = None
        self._probes: dict[str, ActivationProbe] = {}  # "old" / "new": hooks on the two models' last conv

    def loss_weights(self):
        return {"distillation": self.beta, "attention": self.gamma}

    def configure(self, learner) -> None:
        net = getattr(learner.model, "module", learner.model)
        self.conv_name = "encoder." + last_conv_layer(net.encoder)

    def before_experience(self, learner, experience) -> None:
        self._remove_probes()  # before the snapshot, so the old model does not copy the hook
        super().before_experience(learner, experience)
        if experience.index == 0:
            return
        if self.conv_name is None:
            self.configure(learner)
        net = getattr(learner.model, "module", learner.model)
        self._probes = {"old": ActivationProbe(self.teacher[0].get_submodule(self.conv_name), leaf=True),
                        "new": ActivationProbe(net.get_submodule(self.conv_name))}

    def train_data(self, learner, experience):
        # the old model runs on every batch anyway (its Grad-CAM needs the gradient): nothing to record
        return Strategy.train_data(self, learner, experience)

    def after_experience(self, learner, experience) -> None:
        self._remove_probes()

    def extra_losses(self, learner, model, batch, z, logits):
        new_activations = self._probes["new"].take() if self._probes else None
        if self.teacher is None or not self.old_heads:
            zero = logits.new_zeros((), dtype=torch.float32)
            return {"distillation": zero, "attention": zero}
        x = batch[0]
        if new_activations is None or len(new_activations) != len(x):
            raise RuntimeError(f"LwM found no activation of '{self.conv_name}' from this batch's forward pass; "
                               "extra_losses must follow the model's forward on the same batch.")
        teacher = self.teacher[0]
        net = getattr(model, "module", model)
        with torch.enable_grad():  # the old model's Grad-CAM needs d score / d activation
            old_z = teacher.encode(x)
            old_logits = {head: teacher.heads[head](old_z) for head in self.old_heads}
        old_activations = self._probes["old"].take()
        distillation, attention = [], []
        for head, old in old_logits.items():
            new = net.heads[head](z)
            if learner.setting == "class":
                old, new = old[:, : self.old_classes], new[:, : self.old_classes]
            base = old.argmax(1, keepdim=True)  # the old model's top base class, per row
            q_old = grad_cam(old_activations, old.gather(1, base)).detach()
            q_new = grad_cam(new_activations, new.gather(1, base), create_graph=True)
            distillation.append(soft_cross_entropy(new, old.detach(), self.temperature))
            attention.append(attention_distillation(q_old, q_new))
        return {"distillation": torch.stack(distillation).sum(), "attention": torch.stack(attention).sum()}

    def _remove_probes(self) -> None:
        for probe in self._probes.values():
            probe.remove()
        self._probes = {}
