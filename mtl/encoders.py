"""Shared encoders, built by name, offline with random weights unless asked otherwise.

Names:
- ``mlp``: a fully connected network on the flattened image (the two 100-unit ReLU
  layers of the Split-/Permuted-MNIST continual benchmarks, e.g. Buzzega et al. 2020).
- ``multilenet``: the LeNet-style encoder of Sener & Koltun (2018) for 28x28 inputs.
- ``digitnet``: the digit feature extractor of Ganin et al. (JMLR 2016) for 28x28 or
  32x32 inputs (MNIST -> MNIST-M, SVHN -> MNIST).
- ``resnet18``, ``resnet34``, ``resnet50``: torchvision ResNets without their classifier.
- ``smp:<name>``: any segmentation-models-pytorch encoder (e.g. ``smp:resnet50``,
  ``smp:efficientnet-b0``); returns the list of feature maps, or a pooled vector
  with ``pooled=True``.
- ``timm:<name>``: any timm model (e.g. ``timm:resnet10t``, ``timm:convnext_atto``) without
  its classifier: image -> pooled feature vector.

Every encoder has ``out_features`` (vector encoders) or ``out_channels`` (feature-map
encoders) so heads can be sized without a dummy forward pass.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .errors import ConfigError

TORCHVISION_RESNETS = ("resnet18", "resnet34", "resnet50")


class MLPEncoder(nn.Module):
    """Flatten, then Linear + ReLU layers of ``hidden`` widths; ``out_features`` is the last width."""

    def __init__(self, in_channels: int = 1, size: int = 28, hidden: tuple[int, ...] = (100, 100)):
        super().__init__()
        if not hidden or any(int(h) <= 0 for h in hidden):
            raise ConfigError(f"mlp hidden widths must be positive integers, got {hidden}.")
        self.in_features = in_channels * size * size
        layers: list[nn.Module] = [nn.Flatten()]
        width = self.in_features
        for h in hidden:
            layers += [nn.Linear(width, int(h)), nn.ReLU(inplace=True)]
            width = int(h)
        self.net = nn.Sequential(*layers)
        self.out_features = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1:].numel() != self.in_features:
            raise ConfigError(f"this mlp was built for inputs of {self.in_features} values, got shape "
                              f"{tuple(x.shape[1:])}; build it with the images' in_channels and size.")
        return self.net(x)


class MultiLeNetEncoder(nn.Module):
    """Shared trunk of Sener & Koltun's MultiLeNet: two 5x5 convs and a linear layer.

    28x28 input -> 50-dimensional representation.
    """

    out_features = 50

    def __init__(self, in_channels: int = 1, dropout: float = 0.5):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 10, kernel_size=5)
        self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
        self.conv2_drop = nn.Dropout2d(dropout)
        self.fc = nn.Linear(320, self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (28, 28):
            raise ConfigError(
                f"multilenet expects 28x28 inputs, got {tuple(x.shape[-2:])}. "
                "Resize the images or pick a resolution-agnostic encoder such as resnet18."
            )
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2_drop(self.conv2(x)), 2))
        return F.relu(self.fc(x.flatten(1)))


class DigitNetEncoder(nn.Module):
    """Ganin et al.'s feature extractor for digits (JMLR 2016, Fig. 4 / appendix: the MNIST model).

    conv 5x5 (32) -> ReLU -> max-pool 2 -> conv 5x5 (48) -> ReLU -> max-pool 2 -> flatten:
    768 features for 28x28 inputs, 1200 for 32x32 (``size``). The paper's label predictor
    (100-100-10) and domain classifier (100-1) sit on these features. ``widths`` changes
    the two convolutions' channels (a thinner student for distillation, e.g. (8, 16)).
    """

    def __init__(self, in_channels: int = 3, size: int = 28, dropout: float = 0.0, widths: tuple[int, int] = (32, 48)):
        super().__init__()
        if size not in (28, 32):
            raise ConfigError(f"digitnet is built for 28x28 or 32x32 digits, got size {size}; resize the images.")
        if len(widths) != 2 or any(int(w) <= 0 for w in widths):
            raise ConfigError(f"digitnet widths must be two positive channel counts, got {widths}.")
        first, second = (int(w) for w in widths)
        self.size = size
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, first, kernel_size=5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(first, second, kernel_size=5), nn.Dropout2d(dropout), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Flatten(),
        )
        side = ((size - 4) // 2 - 4) // 2
        self.out_features = second * side * side

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.size, self.size):
            raise ConfigError(f"this digitnet was built for {self.size}x{self.size} inputs, got "
                              f"{tuple(x.shape[-2:])}; build it with size={x.shape[-1]} or resize the images.")
        return self.net(x)


class TorchvisionResNet(nn.Module):
    """A torchvision ResNet up to its global pooling: image -> feature vector."""

    def __init__(self, name: str, in_channels: int = 3, pretrained: bool = False):
        super().__init__()
        import torchvision

        weights = "DEFAULT" if pretrained else None  # downloaded only when asked
        net = getattr(torchvision.models, name)(weights=weights)
        if in_channels != 3:
            old = net.conv1
            net.conv1 = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, bias=False)
        self.out_features = net.fc.in_features
        net.fc = nn.Identity()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SmpEncoder(nn.Module):
    """A segmentation-models-pytorch encoder: image -> list of feature maps (or a pooled vector)."""

    def __init__(self, name: str, in_channels: int = 3, pretrained: bool = False, depth: int = 5,
                 output_stride: int = 32, pooled: bool = False):
        super().__init__()
        import segmentation_models_pytorch as smp

        available = smp.encoders.get_encoder_names()
        if name not in available:
            raise ConfigError(
                f"unknown segmentation-models-pytorch encoder '{name}'. "
                f"Choose one of: {', '.join(sorted(available)[:30])}, ... (smp.encoders.get_encoder_names())."
            )
        self.encoder = smp.encoders.get_encoder(
            name, in_channels=in_channels, depth=depth,
            weights="imagenet" if pretrained else None, output_stride=output_stride,
        )
        self.out_channels = list(self.encoder.out_channels)
        self.output_stride = output_stride
        self.pooled = pooled
        if pooled:
            self.out_features = self.out_channels[-1]

    def forward(self, x: torch.Tensor):
        features = self.encoder(x)
        if self.pooled:
            return torch.flatten(F.adaptive_avg_pool2d(features[-1], 1), 1)
        return features


class TimmEncoder(nn.Module):
    """A timm model without its classifier (``num_classes=0``): image -> pooled feature vector."""

    def __init__(self, name: str, in_channels: int = 3, pretrained: bool = False, **options):
        super().__init__()
        import timm

        if not timm.is_model(name):
            import difflib

            close = difflib.get_close_matches(name, timm.list_models(), n=5)
            hint = f" Close names: {', '.join(close)}." if close else ""
            raise ConfigError(f"unknown timm model '{name}'.{hint} List the models with timm.list_models"
                              f"(\"{name[:4]}*\") (any glob pattern).")
        self.net = timm.create_model(name, pretrained=pretrained, num_classes=0, in_chans=in_channels, **options)
        # models with a pre-logits layer (MobileNetV3's conv_head) output head_hidden_size, not num_features
        self.out_features = int(getattr(self.net, "head_hidden_size", None) or self.net.num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def encoder_names() -> list[str]:
    return ["mlp", "multilenet", "digitnet", *TORCHVISION_RESNETS, "smp:<encoder name>", "timm:<model name>"]


def build_encoder(name: str, in_channels: int | None = None, pretrained: bool = False, **options) -> nn.Module:
    """Build a shared encoder by name (see the module docstring for the names).

    ``in_channels`` defaults to the encoder's usual input: 1 (grey digits) for
    multilenet, 3 (RGB) for the others.
    """
    if in_channels is None:
        in_channels = 1 if name in ("multilenet", "mlp") else 3
    if name == "mlp":
        if pretrained:
            raise ConfigError("mlp has no pretrained weights; drop pretrained=True (--pretrained).")
        return MLPEncoder(in_channels=in_channels, **options)
    if name == "multilenet":
        if pretrained:
            raise ConfigError("multilenet has no pretrained weights; drop pretrained=True (--pretrained).")
        return MultiLeNetEncoder(in_channels=in_channels, **options)
    if name == "digitnet":
        if pretrained:
            raise ConfigError("digitnet has no pretrained weights; drop pretrained=True (--pretrained).")
        return DigitNetEncoder(in_channels=in_channels, **options)
    if name in TORCHVISION_RESNETS:
        return TorchvisionResNet(name, in_channels=in_channels, pretrained=pretrained, **options)
    if name.startswith("smp:"):
        return SmpEncoder(name[len("smp:"):], in_channels=in_channels, pretrained=pretrained, **options)
    if name.startswith("timm:"):
        return TimmEncoder(name[len("timm:"):], in_channels=in_channels, pretrained=pretrained, **options)
    raise ConfigError(f"unknown encoder '{name}'. Choose one of: {', '.join(encoder_names())}.")
