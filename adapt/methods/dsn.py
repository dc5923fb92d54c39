"""DSN: Domain Separation Networks (Bousmalis, Trigeorgis, Silberman, Krishnan & Erhan, NeurIPS 2016).

Each image gets two codes of the same size (paper Sec. 3):

- a shared code h_c = E_c(x), from the model's encoder (the one the ``"label"`` head reads),
  the same network for both domains;
- a private code h_p = E_p^s(x) or E_p^t(x), from the encoder private to the image's domain.

A shared decoder reconstructs the image from their sum, x_hat = D(E_c(x) + E_p(x)). The
objective is the paper's eq. 1,

    L = L_task + alpha L_recon + beta L_difference + gamma L_similarity,

returned as four named losses; the caller's static weighting holds alpha, beta and gamma:

- ``classification``: the label loss on the source shared codes (L_task);
- ``difference``: ``DifferenceLoss`` (soft subspace orthogonality) of shared vs private codes,
  source term + target term (Sec. 3.1, L_difference);
- ``reconstruction``: ``ScaleInvariantMSE`` of x_hat vs x, source term + target term (Sec. 3.1,
  L_recon with the scale-invariant L_si_mse);
- ``similarity``: on the shared codes only (Sec. 3.2), either ``"dann"``, a domain classifier
  behind gradient reversal (L_similarity^DANN), or ``"mmd"``, the Gaussian-kernel MMD^2 between
  the source and target shared codes (L_similarity^MMD).

The private encoders, the decoder and the domain classifier belong to this objective: they train
with the model's optimizer and are saved in its checkpoints. The private encoders see only their
own domain's images, so each one is trained only by its own domain's difference and
reconstruction terms; the classifier and the similarity loss never reach them.
"""

from __future__ import annotations

import copy
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mtl.errors import ConfigError

from ..losses import DifferenceLoss, GaussianMMD, ScaleInvariantMSE, dann_lambda
from .base import AdaptationMethod, split_batch, unwrap
from .dann import DomainClassifier

SIMILARITIES = ("dann", "mmd")
DOMAINS = ("source", "target")

__all__ = ["DSN", "DigitDecoder", "SIMILARITIES", "dsn_mmd", "fresh_copy"]


# --------------------------------------------------------------------------- building the parts


def fresh_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with the same architecture and newly drawn weights.

    Every sub-module that holds parameters of its own must have ``reset_parameters`` (all of
    torch's layers do); otherwise the copy would start equal to the original, so we refuse.
    """
    clone = copy.deepcopy(module)
    for name, sub in clone.named_modules():
        owns_parameters = any(True for _ in sub.parameters(recurse=False))
        if owns_parameters and not callable(getattr(sub, "reset_parameters", None)):
            where = f"sub-module '{name}'" if name else "the module itself"
            raise ConfigError(
                f"cannot re-initialise a copy of {type(module).__name__}: {where} ({type(sub).__name__}) holds "
                "parameters but has no reset_parameters(). Pass private_encoder as a factory instead, e.g. "
                "private_encoder=lambda: build_encoder('multilenet', in_channels=1, dropout=0.0)."
            )
        if callable(getattr(sub, "reset_parameters", None)):
            sub.reset_parameters()
    return clone


def _private_pair(spec) -> tuple[nn.Module, nn.Module]:
    """The two private encoders from a module (copied twice, re-initialised) or a factory (called twice)."""
    if spec is None:
        raise ConfigError(
            "DSN needs private_encoder: the shared encoder itself (it is copied and re-initialised, so the private "
            "encoders get its architecture and fresh weights) or a factory returning a new encoder, e.g. "
            "private_encoder=lambda: build_encoder('multilenet', in_channels=1, dropout=0.0)."
        )
    if isinstance(spec, nn.Module):
        return fresh_copy(spec), fresh_copy(spec)
    if not callable(spec):
        raise ConfigError(
            f"private_encoder must be an nn.Module or a factory returning one, got {type(spec).__name__}."
        )
    pair = spec(), spec()
    for made in pair:
        if not isinstance(made, nn.Module):
            raise ConfigError(
                f"the private_encoder factory must return an nn.Module, it returned {type(made).__name__}."
            )
    source_ids = {id(p) for p in pair[0].parameters()}
    if pair[0] is pair[1] or any(id(p) in source_ids for p in pair[1].parameters()):
        raise ConfigError(
            "the private_encoder factory returned the same module (or modules sharing parameters) twice; the source "
            "and target private encoders must be separate networks. Build a new encoder on every call."
        )
    return pair


def _check_image_shape(image_shape) -> tuple[int, int, int]:
    try:
        shape = tuple(int(s) for s in image_shape)
    except (TypeError, ValueError):
        shape = ()
    if len(shape) != 3 or min(shape) < 1 or shape != tuple(image_shape):
        raise ConfigError(
            f"image_shape must be (channels, height, width) as three positive integers, got {image_shape!r}; "
            "e.g. (1, 28, 28) for grey digits or (3, 28, 28) for MNIST-M."
        )
    return shape


def _code_size(encoder: nn.Module, image_shape: tuple[int, int, int]) -> int:
    """The width of the encoder's code, from one forward pass on a blank batch (eval mode, no gradient)."""
    was_training = encoder.training
    encoder.eval()
    try:
        param = next(encoder.parameters(), None)
        blank = torch.zeros(2, *image_shape, device=param.device if param is not None else None)
        with torch.no_grad():
            code = encoder(blank)
    except ConfigError:
        raise
    except Exception as e:  # a shape mismatch deep inside torch: say what it means here
        raise ConfigError(
            f"the private encoder ({type(encoder).__name__}) cannot encode images of shape {image_shape} "
            f"({type(e).__name__}: {e}). Give image_shape=(channels, height, width) of the training images."
        ) from None
    finally:
        encoder.train(was_training)
    if not isinstance(code, torch.Tensor) or code.dim() != 2:
        got = tuple(code.shape) if isinstance(code, torch.Tensor) else type(code).__name__
        raise ConfigError(
            f"DSN needs encoders that return a (batch, features) code vector; {type(encoder).__name__} returned "
            f"{got}. Use a pooled encoder (e.g. multilenet, resnet18, or smp:... with pooled=True)."
        )
    return code.shape[1]


class DigitDecoder(nn.Module):
    """The shared decoder D for small images: code -> image in [0, 1].

    A linear layer to a ``channels``-map at a quarter of the image size, then twice a nearest
    upsampling (to half, then full size) followed by a 3x3 convolution, and a sigmoid (the
    domains hold images in [0, 1]). In the spirit of the paper's small decoders (supplementary
    material: a fully connected layer reshaped to a small map, convolutions and nearest
    upsampling), sized for 28x28 digits. The paper rescales images to [-1, 1] and its decoders
    end linearly; our domains are in [0, 1], hence the sigmoid. The scale-invariant MSE ignores a
    constant offset either way.
    """

    def __init__(self, code_size: int, image_shape=(1, 28, 28), channels: int = 16):
        super().__init__()
        c, h, w = _check_image_shape(image_shape)
        self.image_shape = (c, h, w)
        self.start = (channels, math.ceil(h / 4), math.ceil(w / 4))
        self.middle = (math.ceil(h / 2), math.ceil(w / 2))
        self.fc = nn.Linear(code_size, channels * self.start[1] * self.start[2])
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.out = nn.Conv2d(channels, c, 3, padding=1)

    def forward(self, code: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc(code)).view(-1, *self.start)
        x = F.relu(self.conv1(F.interpolate(x, size=self.middle, mode="nearest")))
        x = F.relu(self.conv2(F.interpolate(x, size=self.image_shape[1:], mode="nearest")))
        return torch.sigmoid(self.out(x))


# --------------------------------------------------------------------------- the objective


class DSN(AdaptationMethod):
    """Domain Separation Networks as an objective over paired (source, target) batches.

    Args:
        label_task: the source label task (the model's ``"label"`` head).
        private_encoder: how to build E_p^s and E_p^t. An ``nn.Module`` (normally the model's own
            encoder) is deep-copied twice and re-initialised: the paper's private encoders have
            the shared encoder's architecture and their own weights. A zero-argument callable is
            called twice and must return a new module each time.
        image_shape: (channels, height, width) of the images, for the decoder and to size the codes.
        similarity: ``"dann"`` (domain classifier behind gradient reversal) or ``"mmd"``.
        decoder: a module mapping a code to an image of ``image_shape``; default ``DigitDecoder``.
        decoder_channels: width of the default decoder.
        domain_hidden: hidden width of the DANN domain classifier.
        schedule, gamma: DANN's reversal factor follows lambda_p = 2 / (1 + exp(-gamma p)) - 1 over
            the run (as ``adapt.methods.dann``); with ``schedule=False`` it stays 1.
        mmd_options: keyword arguments for ``GaussianMMD`` (``similarity="mmd"`` only).

    No learning-rate factor (``lr_factor`` stays None): unlike DANN, DSN does not anneal the
    learning rate as mu_0 / (1 + 10 p)^0.75; the authors' code (tensorflow/models,
    research/domain_adaptation/domain_separation/dsn_train.py) decays it stepwise, which the
    Trainer's own scheduler can do.
    """

    loss_names = ["classification", "difference", "reconstruction", "similarity"]

    def __init__(self, label_task, private_encoder: nn.Module | Callable[[], nn.Module] | None = None,
                 image_shape=(1, 28, 28), similarity: str = "dann", decoder: nn.Module | None = None,
                 decoder_channels: int = 16, domain_hidden: int = 100, schedule: bool = True, gamma: float = 10.0,
                 mmd_options: dict | None = None):
        super().__init__(label_task)
        if similarity not in SIMILARITIES:
            raise ConfigError(f"unknown DSN similarity {similarity!r}; choose one of: {', '.join(SIMILARITIES)}.")
        if mmd_options is not None and similarity != "mmd":
            raise ConfigError(f"mmd_options only apply to similarity='mmd', not {similarity!r}; drop them.")
        self.image_shape = _check_image_shape(image_shape)
        self.similarity_kind = similarity
        source, target = _private_pair(private_encoder)
        self.private = nn.ModuleDict({"source": source, "target": target})
        self.code_size = self._private_code_size()
        self.decoder = decoder if decoder is not None else DigitDecoder(self.code_size, self.image_shape,
                                                                        decoder_channels)
        self.difference_loss = DifferenceLoss()
        self.reconstruction_loss = ScaleInvariantMSE()
        self.schedule, self.gamma = schedule, gamma
        self.lambda_ = 0.0 if schedule else 1.0
        if similarity == "dann":
            self.domain_classifier = DomainClassifier(self.code_size, hidden=domain_hidden)
            self.domain_classifier.reversal.lambda_ = self.lambda_
        else:
            self.mmd = GaussianMMD(**(mmd_options or {}))
        self._checked_models: set[int] = set()

    def _private_code_size(self) -> int:
        sizes = {d: _code_size(self.private[d], self.image_shape) for d in DOMAINS}
        if sizes["source"] != sizes["target"]:
            raise ConfigError(f"the private encoders give codes of different sizes {sizes}; build them the same way.")
        return sizes["source"]

    # ----- schedule ------------------------------------------------------------------------
    def set_progress(self, progress: float) -> None:
        """DANN similarity: lambda_p over the whole run, as ``adapt.methods.dann`` (Ganin et al. 2016)."""
        if self.schedule:
            self.lambda_ = dann_lambda(progress, self.gamma)
        if self.similarity_kind == "dann":
            self.domain_classifier.reversal.lambda_ = self.lambda_

    # ----- checks --------------------------------------------------------------------------
    def check_model(self, model, heads: tuple[str, ...] = ("label",)) -> None:
        """The label head exists and the model's encoder shares no weights with the private ones."""
        super().check_model(model, heads)
        if id(model) in self._checked_models:
            return
        shared = {id(p) for p in model.encoder.parameters()}
        if any(id(p) in shared for p in self.private.parameters()):
            raise ConfigError(
                "a private encoder shares parameters with the model's (shared) encoder; DSN's private encoders "
                "need their own weights. Pass private_encoder=<the model's encoder> (it is copied) or a factory "
                "that builds a new encoder."
            )
        self._checked_models.add(id(model))

    def _check_images(self, images: torch.Tensor, domain: str) -> None:
        if tuple(images.shape[1:]) != self.image_shape:
            raise ConfigError(
                f"DSN was built for images of shape {self.image_shape} (image_shape), but the {domain} batch has "
                f"{tuple(images.shape[1:])}; give image_shape=(channels, height, width) of the training images."
            )

    def _check_code(self, shared: torch.Tensor) -> None:
        if not isinstance(shared, torch.Tensor) or shared.dim() != 2:
            got = tuple(shared.shape) if isinstance(shared, torch.Tensor) else type(shared).__name__
            raise ConfigError(f"DSN needs a shared encoder that returns a (batch, features) code; it returned {got}.")
        if shared.shape[1] != self.code_size:
            raise ConfigError(
                f"the shared code has {shared.shape[1]} features but the private codes have {self.code_size}; DSN "
                "adds them before decoding (x_hat = D(E_c(x) + E_p(x)), paper Sec. 3), so the sizes must be equal. "
                "Build the private encoders with the shared encoder's architecture (private_encoder=<the model's "
                "encoder>) or make both encoders output the same width."
            )

    # ----- the losses ----------------------------------------------------------------------
    def separation_losses(self, shared: torch.Tensor, images: torch.Tensor, domain: str):
        """``(difference, reconstruction)`` of one domain: its shared codes, its images, its private encoder.

        difference: ||H_c^T H_p||_F^2 on centred, row-normalised codes (Sec. 3.1, one domain's term).
        reconstruction: L_si_mse(x, D(h_c + h_p)) (Sec. 3.1), averaged over the batch where the paper sums
        over samples, so that alpha does not depend on the batch size.
        """
        self._check_images(images, domain)
        self._check_code(shared)
        private = self.private[domain](images)
        difference = self.difference_loss(shared, private)
        reconstruction = self.reconstruction_loss(self.decoder(shared + private), images)
        return difference, reconstruction

    def similarity(self, shared_source: torch.Tensor, shared_target: torch.Tensor) -> torch.Tensor:
        """L_similarity on the shared codes only (Sec. 3.2): DANN or MMD^2."""
        if self.similarity_kind == "mmd":
            # The paper's L_similarity^MMD is the biased (V-statistic) MMD^2, with sums over all i, j;
            # GaussianMMD's default is the unbiased U-statistic, which leaves out the i = j kernel
            # terms: 0 in expectation for identical domains. The gradients differ only on the
            # within-domain terms, where the biased ones are (N - 1) / N times these.
            return self.mmd(shared_source.float(), shared_target.float())
        # L_similarity^DANN is the domain classifier's log-likelihood, maximised by the classifier and, via the
        # reversal layer, minimised by the shared encoder. Minimising this BCE (source 0, target 1) is
        # the same update; per-domain means as adapt.methods.dann (the paper sums over samples).
        logits = self.domain_classifier(torch.cat([shared_source, shared_target])).float()
        n = len(shared_source)
        return (F.binary_cross_entropy_with_logits(logits[:n], torch.zeros_like(logits[:n]))
                + F.binary_cross_entropy_with_logits(logits[n:], torch.ones_like(logits[n:])))

    def losses(self, model, batch):
        self.check_model(unwrap(model))
        x_s, y_s, x_t = split_batch(batch)
        self._check_images(x_s, "source")
        self._check_images(x_t, "target")
        z, z_s, z_t = self.features(model, x_s, x_t)
        difference_s, reconstruction_s = self.separation_losses(z_s, x_s, "source")
        difference_t, reconstruction_t = self.separation_losses(z_t, x_t, "target")
        return {
            "classification": self.classification(model, z_s, y_s),
            "difference": difference_s + difference_t,
            "reconstruction": reconstruction_s + reconstruction_t,
            "similarity": self.similarity(z_s, z_t),
        }, z


def dsn_mmd(label_task, **options) -> DSN:
    """DSN with the MMD similarity (the paper's "DSN w/ MMD")."""
    if "similarity" in options:
        raise ConfigError("dsn_mmd fixes similarity='mmd'; use DSN(...) or method 'dsn' to choose another one.")
    return DSN(label_task, similarity="mmd", **options)
