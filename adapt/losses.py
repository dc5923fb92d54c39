"""Losses for domain adaptation, as plain ``nn.Module``s and small functions.

Each one can be dropped into any training loop; the methods in ``adapt/methods``
combine them. Contents:

- ``GradientReversal`` / ``grad_reverse``, ``dann_lambda``, ``dann_lr_factor``: DANN
  (Ganin & Lempitsky 2015; Ganin et al. 2016).
- ``GaussianMMD``: multi-kernel Gaussian MMD^2 (Gretton et al. 2012; Long et al. 2015).
- ``CORAL``: Deep CORAL (Sun & Saenko 2016).
- ``TargetEntropy``: mean prediction entropy (RTN; also an unsupervised validator).
- ``DifferenceLoss``, ``ScaleInvariantMSE``: Domain Separation Networks (Bousmalis et al. 2016).
- ``discriminator_loss``, ``generator_loss``, ``AdversarialLoss``: ADDA / CyCADA.

Every loss returns a scalar tensor. Bad arguments and badly shaped inputs raise
``mtl.errors.ConfigError`` with a message saying what was wrong and how to fix it.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from mtl.errors import ConfigError

__all__ = [
    "GradientReversal",
    "grad_reverse",
    "dann_lambda",
    "dann_lr_factor",
    "GaussianMMD",
    "CORAL",
    "TargetEntropy",
    "DifferenceLoss",
    "ScaleInvariantMSE",
    "ADVERSARIAL_KINDS",
    "discriminator_loss",
    "generator_loss",
    "AdversarialLoss",
]


# --------------------------------------------------------------------------- helpers


def _check_tensor(name: str, t) -> None:
    """Raise unless ``t`` is a floating-point tensor (losses need gradients and real arithmetic)."""
    if not isinstance(t, torch.Tensor):
        raise ConfigError(
            f"{name} must be a torch.Tensor, got {type(t).__name__}. Pass the batch as a tensor."
        )
    if not t.is_floating_point():
        raise ConfigError(
            f"{name} must be a floating-point tensor, got dtype {t.dtype}. Convert it with .float()."
        )


def _check_same_shape(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor, fix: str) -> None:
    if a.shape != b.shape:
        raise ConfigError(f"{name_a} has shape {tuple(a.shape)} but {name_b} has shape {tuple(b.shape)}; {fix}")


def _check_matrix(name: str, t, min_rows: int = 1) -> None:
    """Raise unless ``t`` is a floating (N, D) matrix with at least ``min_rows`` rows."""
    _check_tensor(name, t)
    if t.dim() != 2:
        raise ConfigError(
            f"{name} must be a 2-D (batch, features) tensor, got shape {tuple(t.shape)}. "
            "Flatten the features first, e.g. x.flatten(1)."
        )
    if t.shape[0] < min_rows:
        raise ConfigError(
            f"{name} has {t.shape[0]} sample(s) (shape {tuple(t.shape)}), but this loss needs at least "
            f"{min_rows}. Use a larger batch."
        )


def _same_width(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.shape[1] != b.shape[1]:
        raise ConfigError(
            f"{name_a} has {a.shape[1]} features (shape {tuple(a.shape)}) but {name_b} has {b.shape[1]} "
            f"(shape {tuple(b.shape)}). Both must come from the same feature layer."
        )


def _full_precision(t: torch.Tensor) -> torch.Tensor:
    """Upcast fp16 / bf16 to fp32: distances, exponentials and covariances lose too much in half precision."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _check_progress(progress) -> float:
    """Training progress p must lie in [0, 1] (a fraction of the WHOLE run, not of an epoch)."""
    try:
        p = float(progress)
    except (TypeError, ValueError):
        raise ConfigError(f"progress must be a number in [0, 1], got {progress!r}.") from None
    if not 0.0 <= p <= 1.0:  # also rejects NaN
        raise ConfigError(
            f"progress must be in [0, 1], got {progress!r}. Pass the fraction of the whole run done so far: "
            "step / total_steps over all epochs."
        )
    return p


def _check_nonnegative(name: str, value, strict: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a real number, got {value!r}.") from None
    if not math.isfinite(v) or v < 0 or (strict and v == 0):
        bound = "> 0" if strict else ">= 0"
        raise ConfigError(f"{name} must be a finite number {bound}, got {value!r}.")
    return v


# --------------------------------------------------------------------------- DANN


class _ReverseGradient(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by -lambda_."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, lambda_: float) -> torch.Tensor:
        ctx.lambda_ = lambda_
        return x.view_as(x)  # a view, so autograd records this node instead of passing x through

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return grad_output * (-ctx.lambda_), None  # no gradient for lambda_


def grad_reverse(x: torch.Tensor, lambda_: float = 1.0) -> torch.Tensor:
    """Functional gradient reversal: returns ``x``; gradients flowing back are scaled by ``-lambda_``."""
    _check_tensor("x", x)
    return _ReverseGradient.apply(x, _check_nonnegative("lambda_", lambda_))


class GradientReversal(nn.Module):
    """Gradient reversal layer (Ganin & Lempitsky, ICML 2015; Ganin et al., JMLR 2016).

    Put it between the feature extractor and the domain classifier: the classifier
    learns to tell the domains apart while the features receive the opposite gradient
    and learn to confuse it. ``lambda_`` can be changed during training, usually to
    ``dann_lambda(progress)``.
    """

    def __init__(self, lambda_: float = 1.0):
        super().__init__()
        self.lambda_ = lambda_

    @property
    def lambda_(self) -> float:
        return self._lambda

    @lambda_.setter
    def lambda_(self, value: float) -> None:
        # Negative values would make this an ordinary (non-reversed) layer: almost surely a bug.
        self._lambda = _check_nonnegative("GradientReversal.lambda_", value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_tensor("GradientReversal input", x)
        return _ReverseGradient.apply(x, self._lambda)

    def extra_repr(self) -> str:
        return f"lambda_={self._lambda}"


def dann_lambda(progress: float, gamma: float = 10.0) -> float:
    """DANN's adaptation factor lambda_p = 2 / (1 + exp(-gamma * p)) - 1.

    It grows from 0 to almost 1 so the noisy domain classifier does not disturb early
    training (Ganin et al. JMLR 2016, training procedure of the experiments, gamma = 10).
    ``progress`` p is the fraction of the WHOLE run done so far, in [0, 1] — not the
    fraction of the current epoch.
    """
    p = _check_progress(progress)
    g = _check_nonnegative("gamma", gamma, strict=True)
    return 2.0 / (1.0 + math.exp(-g * p)) - 1.0


def dann_lr_factor(progress: float, alpha: float = 10.0, beta: float = 0.75) -> float:
    """DANN's learning-rate annealing factor 1 / (1 + alpha * p)^beta, so that mu_p = mu_0 * factor.

    Ganin et al. JMLR 2016, same passage as ``dann_lambda`` (mu_0 = 0.01, alpha = 10, beta = 0.75);
    p is progress over the whole run.
    Use it with ``torch.optim.lr_scheduler.LambdaLR(opt, lambda step: dann_lr_factor(step / total))``.
    """
    p = _check_progress(progress)
    a = _check_nonnegative("alpha", alpha)
    b = _check_nonnegative("beta", beta)
    return 1.0 / (1.0 + a * p) ** b


# --------------------------------------------------------------------------- MMD


class GaussianMMD(nn.Module):
    """Squared maximum mean discrepancy between two feature batches, with a family of Gaussian kernels.

    The kernel is k(a, b) = mean_u exp(-||a - b||^2 / (gamma * m_u)) over the multipliers m_u in
    ``kernel_multipliers``: an equal-weight member of DAN's convex kernel family
    (Long et al. 2015, Sec. 3: weights beta_u >= 0 summing to 1). The base bandwidth gamma is
    the mean squared distance between two different samples of the pooled (source + target)
    batch, detached so that the features cannot shrink the loss by moving the bandwidth.
    Pass ``base_bandwidth`` to fix it.

    Default multipliers (0.25, 0.5, 1, 2, 4): five bandwidths a factor 2 apart, centred on the base,
    as in the DAN authors' released code (kernel_mul=2, kernel_num=5, mean-distance base). The
    paper describes a wider family, 2^-8 .. 2^8 times a median-heuristic base in steps of 2^(1/2)
    (33 kernels); pass ``kernel_multipliers=[2 ** (i / 2) for i in range(-16, 17)]`` for it.

    Estimators (Gretton et al. JMLR 2012):

    - ``"quadratic"`` (default): the unbiased U-statistic MMD_u^2 (Lemma 6, eq. 3), which leaves
      out the i = j terms. Chosen over the biased V-statistic because its expectation is exactly 0
      when both batches come from one distribution, whatever the batch size; the V-statistic adds a
      positive, batch-size-dependent bias. The price: on a finite batch it can be slightly negative.
      Needs at least 2 samples in each batch.
    - ``"linear"``: the linear-time estimator MMD_l^2 (Sec. 6, Lemma 14) over consecutive pairs
      (x_{2i-1}, x_{2i}), (y_{2i-1}, y_{2i}). Needs equal batch sizes; an odd last sample is
      dropped (floor(N / 2) pairs, as in the paper), so it needs N >= 2. Also unbiased, with a
      larger variance.
    """

    ESTIMATORS = ("quadratic", "linear")

    def __init__(
        self,
        kernel_multipliers: Sequence[float] = (0.25, 0.5, 1.0, 2.0, 4.0),
        estimator: str = "quadratic",
        base_bandwidth: float | None = None,
    ):
        super().__init__()
        if estimator not in self.ESTIMATORS:
            raise ConfigError(
                f"unknown MMD estimator {estimator!r}. Choose one of: {', '.join(self.ESTIMATORS)}."
            )
        try:
            multipliers = tuple(float(m) for m in kernel_multipliers)
        except (TypeError, ValueError):
            raise ConfigError(
                f"kernel_multipliers must be a sequence of positive numbers, got {kernel_multipliers!r}."
            ) from None
        if not multipliers or any(not math.isfinite(m) or m <= 0 for m in multipliers):
            raise ConfigError(
                f"kernel_multipliers must be a non-empty sequence of finite positive numbers, got "
                f"{kernel_multipliers!r}. Example: (0.25, 0.5, 1.0, 2.0, 4.0)."
            )
        self.kernel_multipliers = multipliers
        self.estimator = estimator
        if base_bandwidth is not None:
            base_bandwidth = _check_nonnegative("base_bandwidth", base_bandwidth, strict=True)
        self.base_bandwidth = base_bandwidth

    def extra_repr(self) -> str:
        return (
            f"kernel_multipliers={self.kernel_multipliers}, estimator={self.estimator!r}, "
            f"base_bandwidth={self.base_bandwidth}"
        )

    def _base(self, pooled: torch.Tensor) -> torch.Tensor | float:
        if self.base_bandwidth is not None:
            return self.base_bandwidth
        # Mean of ||z_i - z_j||^2 over pairs i != j equals 2 * (sum of the unbiased per-feature
        # variances): an O(N D) identity, so the linear estimator stays linear-time.
        base = 2.0 * pooled.detach().var(dim=0, unbiased=True).sum()
        # All samples identical -> base 0; any positive value then gives kernel 1 and MMD 0.
        return base.clamp_min(torch.finfo(pooled.dtype).tiny)

    def _kernel(self, sq_dist: torch.Tensor, base) -> torch.Tensor:
        """Mean of the Gaussian kernels exp(-d^2 / (base * m)) over the multipliers m."""
        return torch.stack([torch.exp(-sq_dist / (base * m)) for m in self.kernel_multipliers]).mean(0)

    def forward(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """MMD^2 between ``source`` (N, D) and ``target`` (M, D) features; a scalar."""
        quadratic = self.estimator == "quadratic"
        _check_matrix("source features", source)
        _check_matrix("target features", target)
        _same_width("source features", source, "target features", target)
        if quadratic and (source.shape[0] < 2 or target.shape[0] < 2):
            raise ConfigError(
                f"the unbiased quadratic MMD needs at least 2 samples per batch, got {source.shape[0]} "
                f"source and {target.shape[0]} target samples. Use larger batches."
            )
        if not quadratic and source.shape[0] != target.shape[0]:
            raise ConfigError(
                f"the linear MMD estimator pairs source and target samples one to one, so it needs equal "
                f"batch sizes; got {source.shape[0]} source and {target.shape[0]} target samples. Use equal "
                "batch sizes or estimator='quadratic'."
            )
        if not quadratic and source.shape[0] < 2:
            raise ConfigError(
                f"the linear MMD estimator needs at least one pair of samples per domain, got batch size "
                f"{source.shape[0]}. Use a batch of at least 2 (even sizes use every sample)."
            )
        source, target = _full_precision(source), _full_precision(target)
        base = self._base(torch.cat([source, target]))
        return self._quadratic(source, target, base) if quadratic else self._linear(source, target, base)

    def _quadratic(self, x: torch.Tensor, y: torch.Tensor, base) -> torch.Tensor:
        n, m = x.shape[0], y.shape[0]
        z = torch.cat([x, y])
        sq_norms = (z * z).sum(1)
        # ||a - b||^2 = |a|^2 + |b|^2 - 2 a.b: one matrix product instead of an (N+M)^2 x D tensor.
        sq_dist = (sq_norms[:, None] + sq_norms[None, :] - 2.0 * (z @ z.T)).clamp_min(0.0)
        k = self._kernel(sq_dist, base)
        k_xx, k_yy, k_xy = k[:n, :n], k[n:, n:], k[:n, n:]
        # Gretton et al. 2012, eq. 3: within-domain averages leave out the diagonal (i = j).
        within_x = (k_xx.sum() - k_xx.diagonal().sum()) / (n * (n - 1))
        within_y = (k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
        return within_x + within_y - 2.0 * k_xy.mean()

    def _linear(self, x: torch.Tensor, y: torch.Tensor, base) -> torch.Tensor:
        pairs = x.shape[0] // 2  # floor: an odd last sample is not used
        x1, x2 = x[0 : 2 * pairs : 2], x[1 : 2 * pairs : 2]
        y1, y2 = y[0 : 2 * pairs : 2], y[1 : 2 * pairs : 2]

        def k(a, b):  # kernel between matching rows only
            return self._kernel(((a - b) ** 2).sum(1), base)

        # Gretton et al. 2012, Lemma 14: h = k(x, x') + k(y, y') - k(x, y') - k(x', y).
        h = k(x1, x2) + k(y1, y2) - k(x1, y2) - k(x2, y1)
        return h.mean()


# --------------------------------------------------------------------------- CORAL


class CORAL(nn.Module):
    """Deep CORAL loss ||C_S - C_T||_F^2 / (4 d^2) (Sun & Saenko 2016, eq. 1).

    C_S and C_T are the unbiased (divide by n - 1) feature covariances of the source and
    target batches (eqs. 2-3); d is the feature width. Batch sizes may differ; each needs >= 2.
    """

    def forward(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _check_matrix("source features", source, min_rows=2)
        _check_matrix("target features", target, min_rows=2)
        _same_width("source features", source, "target features", target)
        source, target = _full_precision(source), _full_precision(target)
        d = source.shape[1]
        diff = self._covariance(source) - self._covariance(target)
        return (diff * diff).sum() / (4.0 * d * d)

    @staticmethod
    def _covariance(x: torch.Tensor) -> torch.Tensor:
        # Centre first, then X^T X / (n - 1): same as eq. 2, without its cancellation.
        centred = x - x.mean(dim=0, keepdim=True)
        return centred.T @ centred / (x.shape[0] - 1)


# --------------------------------------------------------------------------- entropy


class TargetEntropy(nn.Module):
    """Mean Shannon entropy (nats) of softmax(logits) over the samples of a (N, C) batch.

    Minimised on the target domain by RTN (Long et al. 2016) to push decision boundaries
    into low-density regions; its value on held-out target data is also a label-free
    validation score (lower = more confident).
    """

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        _check_matrix("logits", logits)
        if logits.shape[1] < 2:
            raise ConfigError(
                f"logits must have at least 2 classes (columns), got shape {tuple(logits.shape)}. "
                "For one binary logit z, pass torch.stack([torch.zeros_like(z), z], 1)."
            )
        logits = _full_precision(logits)
        # log_softmax is stable for large logits. A -inf logit (masked class) gives p = 0 and
        # log p = -inf; clamping log p keeps 0 * log p = 0 and its gradient finite.
        log_p = F.log_softmax(logits, dim=1).clamp_min(torch.finfo(logits.dtype).min)
        return -(log_p.exp() * log_p).sum(dim=1).mean()


# --------------------------------------------------------------------------- DSN


class DifferenceLoss(nn.Module):
    """DSN's soft orthogonality loss ||S^T P||_F^2 (Bousmalis et al. 2016, Sec. 3.1, L_difference).

    S and P are the shared and private codes of ONE domain, (N, D) each. As in the authors'
    implementation, each code matrix is first centred (the batch mean is subtracted) and then
    every row is scaled to unit L2 norm, so the loss measures the correlation between the two
    subspaces and cannot be reduced by shrinking the codes. It is 0 when they are orthogonal.
    Call it once per domain and add the results (the paper sums source and target terms).

    Note: the authors' code averages the squared entries of S^T P (divides by D * D); we keep
    the paper's squared Frobenius norm (a sum), which only rescales the loss weight.
    """

    def forward(self, shared: torch.Tensor, private: torch.Tensor) -> torch.Tensor:
        _check_tensor("shared code", shared)
        _check_tensor("private code", private)
        _check_same_shape("shared code", shared, "private code", private,
                          "DifferenceLoss needs two (N, D) codes of the same shape, from the same batch. Make the "
                          "shared and private encoders output the same width.")
        _check_matrix("shared code", shared, min_rows=2)  # centring a batch of one leaves only zeros
        shared, private = self._prepare(_full_precision(shared)), self._prepare(_full_precision(private))
        correlation = shared.T @ private
        return (correlation * correlation).sum()

    @staticmethod
    def _prepare(code: torch.Tensor) -> torch.Tensor:
        centred = code - code.mean(dim=0, keepdim=True)
        return F.normalize(centred, p=2, dim=1)  # rows to unit norm (an all-zero row stays zero)


class ScaleInvariantMSE(nn.Module):
    """DSN's scale-invariant MSE (Bousmalis et al. 2016, Sec. 3.1, L_si_mse; after Eigen et al. 2014).

    Per sample, with d = x - x_hat flattened to k elements:
        (1/k) ||d||^2 - (1/k^2) (sum d)^2,
    then the mean over the batch. The second term is SUBTRACTED (a public port adds it, which
    breaks the invariance): the loss ignores a constant offset x_hat = x + c, so the
    reconstruction is judged on shape, not on absolute intensity.
    """

    def forward(self, x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``x_hat``: reconstruction, ``x``: input; both (N, ...) with the same shape."""
        _check_tensor("reconstruction", x_hat)
        _check_tensor("input", x)
        _check_same_shape("reconstruction", x_hat, "the input", x, "they must match. Check the decoder's output size.")
        if x.dim() < 2 or x.numel() == 0:
            raise ConfigError(
                f"ScaleInvariantMSE expects a non-empty batch (N, ...) with N >= 1 and >= 1 element per "
                f"sample, got shape {tuple(x.shape)}. Add a batch dimension, e.g. x.unsqueeze(0)."
            )
        diff = (_full_precision(x) - _full_precision(x_hat)).flatten(1)
        # (1/k)||d||^2 - (1/k^2)(sum d)^2 is the (biased) variance of d's elements; computing it
        # as mean((d - mean d)^2) gives the same value without cancelling two large numbers.
        centred = diff - diff.mean(dim=1, keepdim=True)
        return (centred * centred).mean(dim=1).mean()


# --------------------------------------------------------------------------- ADDA / CyCADA

ADVERSARIAL_KINDS = ("bce", "lsgan")


def _check_kind(kind: str) -> None:
    if kind not in ADVERSARIAL_KINDS:
        raise ConfigError(
            f"unknown adversarial loss kind {kind!r}. Choose one of: {', '.join(ADVERSARIAL_KINDS)}."
        )


def _check_logits(name: str, logits) -> torch.Tensor:
    _check_tensor(name, logits)
    if logits.numel() == 0:
        raise ConfigError(f"{name} is empty (shape {tuple(logits.shape)}); pass the discriminator's outputs.")
    return _full_precision(logits)


def _towards(logits: torch.Tensor, label: float, kind: str) -> torch.Tensor:
    """Mean loss for pushing the discriminator outputs ``logits`` towards ``label`` (0 or 1)."""
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, label))
    # Least squares (Mao et al. 2017, LSGAN with a = 0, b = c = 1, as in CycleGAN, on which CyCADA's
    # pixel-level step builds); we drop LSGAN's 1/2 factors: each term is a plain mean.
    return ((logits - label) ** 2).mean()


def discriminator_loss(
    real_logits: torch.Tensor, fake_logits: torch.Tensor, kind: str = "bce"
) -> torch.Tensor:
    """Discriminator loss: ``real_logits`` labelled 1, ``fake_logits`` labelled 0; the two means are summed.

    "bce": binary cross-entropy on logits. "lsgan": mean (D - 1)^2 on real + mean D^2 on fake.
    In ADDA the source features are "real" and the target features "fake" (Tzeng et al. 2017, Sec. 3).
    The shapes of the two may differ (different batch sizes, patch discriminators).
    """
    _check_kind(kind)
    real = _check_logits("real_logits", real_logits)
    fake = _check_logits("fake_logits", fake_logits)
    return _towards(real, 1.0, kind) + _towards(fake, 0.0, kind)


def generator_loss(fake_logits: torch.Tensor, kind: str = "bce") -> torch.Tensor:
    """Generator / target-encoder loss with inverted labels: ``fake_logits`` labelled as real (1).

    This is the GAN loss ADDA uses (Tzeng et al. 2017, Sec. 3), which gives stronger gradients than
    maximising the discriminator's loss. "lsgan": mean (D - 1)^2.
    """
    _check_kind(kind)
    return _towards(_check_logits("fake_logits", fake_logits), 1.0, kind)


class AdversarialLoss(nn.Module):
    """The two adversarial losses with a fixed ``kind`` ("bce" or "lsgan").

    ``loss.discriminator_loss(real, fake)`` trains the discriminator; ``loss.generator_loss(fake)``
    (also what calling ``loss(fake)`` returns) trains the generator / target encoder.
    """

    def __init__(self, kind: str = "bce"):
        super().__init__()
        _check_kind(kind)
        self.kind = kind

    def discriminator_loss(self, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
        return discriminator_loss(real_logits, fake_logits, self.kind)

    def generator_loss(self, fake_logits: torch.Tensor) -> torch.Tensor:
        return generator_loss(fake_logits, self.kind)

    def forward(self, fake_logits: torch.Tensor) -> torch.Tensor:
        return self.generator_loss(fake_logits)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}"
