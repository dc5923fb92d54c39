"""Task heads that sit on a vector representation."""

from __future__ import annotations

from torch import nn

from .errors import ConfigError


class ClassificationHead(nn.Module):
    """Logits over ``num_classes``: optional hidden layer (ReLU + dropout), then a linear layer.

    With ``hidden=50, dropout=0.5`` on a 50-d input this is one task branch of
    Sener & Koltun's MultiLeNet.
    """

    def __init__(self, in_features: int, num_classes: int, hidden: int | None = None, dropout: float = 0.0):
        super().__init__()
        self.num_classes = num_classes
        layers: list[nn.Module] = []
        if hidden:
            layers += [nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout)]
            in_features = hidden
        layers.append(nn.Linear(in_features, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, z):
        return self.net(z)


class MultiLabelHead(ClassificationHead):
    """One logit per binary label (e.g. CelebA's 40 attributes); train with a binary task."""

    def __init__(self, in_features: int, num_labels: int, hidden: int | None = None, dropout: float = 0.0):
        super().__init__(in_features, num_labels, hidden=hidden, dropout=dropout)
        self.num_labels = num_labels


#: decoder name -> encoder output strides it can sit on (segmentation-models-pytorch 0.6)
DECODER_STRIDES = {"unet": (16, 32), "fpn": (32,), "deeplabv3plus": (8, 16)}
DENSE_KINDS = ("segmentation", "depth", "normal")


class DenseHead(nn.Module):
    """A per-task segmentation-models-pytorch decoder and a 1x1 prediction layer, at input resolution.

    Sits on the feature list of an ``smp:`` encoder (whose first entry is the input
    itself, giving the output size). ``kind`` sets the output: segmentation logits,
    1-channel depth, or 3-channel surface normals normalised to unit length.
    """

    def __init__(self, encoder_channels, out_channels: int, decoder: str = "deeplabv3plus",
                 output_stride: int = 16, kind: str = "segmentation", decoder_channels: int = 256):
        super().__init__()
        check_dense_head(decoder, output_stride, kind)
        encoder_channels = list(encoder_channels)
        depth = len(encoder_channels) - 1
        if decoder == "unet":
            from segmentation_models_pytorch.decoders.unet.decoder import UnetDecoder

            channels = [decoder_channels, decoder_channels // 2, decoder_channels // 4,
                        decoder_channels // 8, decoder_channels // 16][:depth]
            self.decoder = UnetDecoder(encoder_channels, channels, n_blocks=depth)
            last = channels[-1]
        elif decoder == "fpn":
            from segmentation_models_pytorch.decoders.fpn.decoder import FPNDecoder

            last = max(32, decoder_channels // 64 * 32)  # FPN's GroupNorm(32) needs a multiple of 32
            self.decoder = FPNDecoder(encoder_channels, encoder_depth=depth, pyramid_channels=decoder_channels,
                                      segmentation_channels=last)
        else:
            from segmentation_models_pytorch.decoders.deeplabv3.decoder import DeepLabV3PlusDecoder

            self.decoder = DeepLabV3PlusDecoder(encoder_channels, encoder_depth=depth, out_channels=decoder_channels,
                                                atrous_rates=(12, 24, 36), output_stride=output_stride,
                                                aspp_separable=True, aspp_dropout=0.5)
            last = decoder_channels
        self.kind = kind
        self.predict = nn.Conv2d(last, out_channels, kernel_size=1)

    def forward(self, features):
        size = features[0].shape[-2:]
        out = self.predict(self.decoder(features))
        if out.shape[-2:] != size:
            out = nn.functional.interpolate(out, size=size, mode="bilinear", align_corners=False)
        if self.kind == "normal":
            out = nn.functional.normalize(out, dim=1)
        return out


def check_dense_head(decoder: str, output_stride: int, kind: str) -> None:
    if decoder not in DECODER_STRIDES:
        raise ConfigError(f"unknown decoder '{decoder}'; choose one of: {', '.join(DECODER_STRIDES)}.")
    if kind not in DENSE_KINDS:
        raise ConfigError(f"unknown dense head kind '{kind}'; choose one of: {', '.join(DENSE_KINDS)}.")
    if output_stride not in DECODER_STRIDES[decoder]:
        works = "; ".join(f"{d}: output stride {' or '.join(map(str, s))}" for d, s in DECODER_STRIDES.items())
        raise ConfigError(
            f"the {decoder} decoder cannot sit on an encoder with output stride {output_stride}. "
            f"Combinations that work: {works} (set the encoder's output_stride, e.g. a dilated encoder for 16)."
        )
