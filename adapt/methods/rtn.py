"""RTN: Residual Transfer Networks (Long, Zhu, Wang & Jordan, NIPS 2016, arXiv:1602.04433).

RTN drops the assumption that source and target share one classifier. The model's
``"label"`` head is the TARGET classifier f_T (what the Trainer evaluates on the target
domain); this objective holds a small residual block Delta f, and the SOURCE classifier is

    f_S(x) = f_T(x) + Delta f(f_T(x))      (Sec. 3.2 "Classifier Adaptation", Fig. 1 right:
                                             the block's input x := f_T(x), its output F(x) := f_S(x))

with Delta f = fc2(ReLU(fc1(.))) on the logits (f_S and f_T are the outputs before the
softmax). The three losses (Sec. 3.3, the overall objective):

    classification = mean over the source batch of CE(f_S(x_s), y_s)
    entropy        = mean over the target batch of H(softmax(f_T(x_t)))      (weight gamma)
    mmd            = MMD^2 between the source and target fused features z    (weight lambda)

where z = vec(bottleneck features (x) classifier outputs) is the tensor product of the
layers L = {fcb, fcc} (Sec. 3.1 "Feature Adaptation", tensor MMD). Only the classification
loss reaches the residual block: the entropy and the MMD act on f_T.

The weights come from the caller's static weighting; ``PAPER_WEIGHTS`` holds the paper's
lambda = gamma = 0.3 (Sec. 4, fixed for all experiments). The authors' released Caffe model
instead weights the MMD 1 and the entropy 0.1, the entropy's gradient ramped up over the
first 2,000 iterations; we follow the paper. The learning rate follows the annealing RTN
takes from RevGrad (Sec. 4): mu_p = mu_0 / (1 + 10 p)^0.75.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from mtl.errors import ConfigError

from ..losses import GaussianMMD, TargetEntropy, dann_lr_factor
from .base import LABEL, AdaptationMethod, split_batch, unwrap

#: the paper's loss weights (Sec. 4): lambda = 0.3 on the tensor MMD, gamma = 0.3 on the entropy
PAPER_WEIGHTS = {"classification": 1.0, "entropy": 0.3, "mmd": 0.3}
#: what the tensor product takes from the classifier layer fcc
FUSE_MODES = ("logits", "softmax")


def _positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return value


class ResidualBlock(nn.Module):
    """Delta f: fc1 -> ReLU -> fc2 on the target classifier's C logits, back to C (Sec. 3.2).

    Both layers are C wide by default, as in the authors' released Caffe model (fc1, fc2 with
    31 units for Office-31). Initialisation: the paper does not state one; the released model
    draws both weight matrices from N(0, 0.01^2) with zero biases, so Delta f starts small but
    not zero, and we do the same. ``zero_init=True`` zeroes fc2 instead, so that f_S == f_T
    exactly at the start (fc2 still receives gradients, so the block trains).
    """

    def __init__(self, num_classes: int, hidden: int | None = None, init_std: float = 0.01,
                 zero_init: bool = False):
        super().__init__()
        self.num_classes = _positive_int("num_classes", num_classes, minimum=2)
        hidden = self.num_classes if hidden is None else _positive_int("residual_hidden", hidden)
        try:
            std = float(init_std)
        except (TypeError, ValueError):
            std = -1.0
        if not math.isfinite(std) or std < 0:
            raise ConfigError(f"init_std must be a finite number >= 0, got {init_std!r}; the paper's code uses 0.01.")
        self.fc1 = nn.Linear(self.num_classes, hidden)
        self.fc2 = nn.Linear(hidden, self.num_classes)
        for layer in (self.fc1, self.fc2):
            nn.init.normal_(layer.weight, 0.0, std)
            nn.init.zeros_(layer.bias)
        if zero_init:
            nn.init.zeros_(self.fc2.weight)

    def forward(self, target_logits: torch.Tensor) -> torch.Tensor:
        """Delta f(f_T(x)): the residual, not yet added."""
        return self.fc2(F.relu(self.fc1(target_logits)))


def split_head(head: nn.Module, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(bottleneck features, logits)`` of the label head on the shared features ``z``.

    The bottleneck is the paper's fcb, the layer the classifier fcc reads: the input of the
    head's last linear layer (a ``ClassificationHead``'s hidden layer when it has one, else the
    encoder's output). A head of another shape is called whole, with ``z`` as its bottleneck.
    """
    net = getattr(head, "net", None)
    if isinstance(net, nn.Sequential) and len(net) > 0 and isinstance(net[-1], nn.Linear):
        bottleneck = net[:-1](z) if len(net) > 1 else z
        return bottleneck.flatten(1), net[-1](bottleneck)
    return z.flatten(1), head(z)


def fuse(features: torch.Tensor, logits: torch.Tensor, mode: str = "logits") -> torch.Tensor:
    """The fused feature vec(features (x) g), (N, D * C): entry [n, d * C + c] = features[n, d] * g[n, c].

    ``g`` is the classifier layer's output: the logits (``mode="logits"``, the activations of
    fcc, as in Sec. 3.1 and the authors' Caffe model) or softmax(logits) (``"softmax"``, the
    bounded variant CDAN later used). The width is D * C, e.g. 50 * 10 = 500 for the digit
    models here; the kernel matrix needs one (2N x D * C) product per step.
    """
    if mode not in FUSE_MODES:
        raise ConfigError(f"unknown fuse mode {mode!r}; choose one of: {', '.join(FUSE_MODES)}.")
    if features.dim() != 2 or logits.dim() != 2 or len(features) != len(logits):
        raise ConfigError(f"fuse needs (N, D) features and (N, C) logits of the same batch, got shapes "
                          f"{tuple(features.shape)} and {tuple(logits.shape)}.")
    features, logits = features.float(), logits.float()  # products of half-precision values lose too much
    g = logits if mode == "logits" else F.softmax(logits, dim=1)
    return (features.unsqueeze(2) * g.unsqueeze(1)).flatten(1)


class RTN(AdaptationMethod):
    """Residual Transfer Network: losses ``classification`` (on f_S), ``entropy`` (f_T on target), ``mmd``.

    ``num_classes``: the label head's number of logits (the residual block's width).
    ``residual_hidden``: fc1's width (default ``num_classes``). ``zero_init``: start with f_S == f_T.
    ``fuse_mode``: ``"logits"`` or ``"softmax"`` (see ``fuse``). ``kernel_multipliers`` / ``estimator``:
    the ``GaussianMMD``'s; the default five bandwidths base * 2^k, k = -2..2, match the authors'
    Caffe model (kernel_num 5, kernel_mul 2). Sec. 3.1 writes the MMD with every pair i, j (the
    V-statistic); the default ``"quadratic"`` estimator leaves out i = j (unbiased), the same
    population quantity without the positive, batch-size-dependent bias.
    ``anneal_lr``: mu_0 / (1 + 10 p)^0.75 (Sec. 4).
    """

    loss_names = ["classification", "entropy", "mmd"]

    def __init__(self, label_task, num_classes: int, residual_hidden: int | None = None, zero_init: bool = False,
                 init_std: float = 0.01, fuse_mode: str = "logits",
                 kernel_multipliers: Sequence[float] = (0.25, 0.5, 1.0, 2.0, 4.0), estimator: str = "quadratic",
                 anneal_lr: bool = True):
        super().__init__(label_task)
        if fuse_mode not in FUSE_MODES:
            raise ConfigError(f"unknown fuse_mode {fuse_mode!r} for RTN; choose one of: {', '.join(FUSE_MODES)}.")
        self.residual = ResidualBlock(num_classes, residual_hidden, init_std=init_std, zero_init=zero_init)
        self.fuse_mode, self.anneal_lr = fuse_mode, anneal_lr
        self.entropy = TargetEntropy()
        self.mmd = GaussianMMD(kernel_multipliers=kernel_multipliers, estimator=estimator)

    @property
    def num_classes(self) -> int:
        return self.residual.num_classes

    def lr_factor(self, progress: float) -> float | None:
        return dann_lr_factor(progress) if self.anneal_lr else None

    def source_logits(self, target_logits: torch.Tensor) -> torch.Tensor:
        """f_S = f_T + Delta f(f_T), from the target classifier's logits on source images (Sec. 3.2)."""
        self._check_width(target_logits)
        return target_logits + self.residual(target_logits)

    def _check_width(self, logits: torch.Tensor) -> None:
        if logits.dim() != 2 or logits.shape[1] != self.num_classes:
            raise ConfigError(
                f"RTN's residual block was built for {self.num_classes} classes, but the label head gives logits "
                f"of shape {tuple(logits.shape)}. Build RTN with num_classes equal to the label head's number of "
                "classes (adapt.methods.build_model(..., num_classes))."
            )

    def losses(self, model, batch):
        net = unwrap(model)
        self.check_model(net)
        x_s, y_s, x_t = split_batch(batch)
        z, _, _ = self.features(model, x_s, x_t)
        bottleneck, logits = split_head(net.heads[LABEL], z)  # f_T on both domains, one pass
        self._check_width(logits)
        n = len(x_s)
        fused = fuse(bottleneck, logits, self.fuse_mode)
        return {
            "classification": self.label_task.loss(self.source_logits(logits[:n]), y_s),
            "entropy": self.entropy(logits[n:]),  # f_T only: Delta f never sees target data (Sec. 3.3)
            "mmd": self.mmd(fused[:n], fused[n:]),
        }, z


__all__ = ["FUSE_MODES", "PAPER_WEIGHTS", "RTN", "ResidualBlock", "fuse", "split_head"]
