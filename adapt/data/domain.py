"""The one format every digit domain is given in, and the conversion into it.

A domain is a ``DigitDomain``: items ``(image, label)`` with ``image`` a float32 tensor
``(channels, size, size)`` holding values in [0, 1] and ``label`` an int in 0..9. Every
loader maps its source's own range into [0, 1] (MNIST's 0..255, USPS's [-1, 1], UCI's
0..16) before anything else; images in any other range are refused, because a model
adapted between two differently scaled domains learns the scale, not the digits.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from mtl.errors import ConfigError, DataError

NUM_CLASSES = 10
SPLITS = ("train", "test")
CHANNEL_CHOICES = (1, 3)
# ITU-R BT.601 luma weights, the ones PIL's convert("L") and torchvision's rgb_to_grayscale use.
LUMA = (0.299, 0.587, 0.114)
_CHUNK = 2048  # images converted at a time, so a large set never needs two float copies at once


def check_options(split: str, size, channels) -> None:
    """Refuse a bad split, size or channel count with a ConfigError naming the value."""
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; use one of {SPLITS}.")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ConfigError(f"image size must be a positive integer (28 usual, 32 with SVHN), got {size!r}.")
    if channels is not None and (isinstance(channels, bool) or channels not in CHANNEL_CHOICES):
        raise ConfigError(
            f"channels must be 1 (grey), 3 (colour) or None (the domain's own), got {channels!r}."
        )


def _range_error(name: str, low: float, high: float) -> DataError:
    return DataError(
        f"domain '{name}': images in another value range than declared: they hold values in "
        f"[{low:.4g}, {high:.4g}], the declared range is [0, 1]. Map the source's range to [0, 1] when "
        "loading (0..255: divide by 255; USPS's [-1, 1]: (x + 1) / 2; UCI digits' 0..16: divide by 16)."
    )


def _check_tensor_range(images: torch.Tensor, name: str) -> None:
    if images.numel() == 0:
        return
    if not torch.isfinite(images).all():
        raise DataError(f"domain '{name}': images hold NaN or infinite values; the data is corrupt, re-create it.")
    low, high = torch.aminmax(images)
    if float(low) < 0.0 or float(high) > 1.0:
        raise _range_error(name, float(low), float(high))


def check_value_range(dataset, name: str | None = None) -> None:
    """Raise DataError when a domain's images leave [0, 1].

    Takes a ``DigitDomain`` (its stored tensor is checked at once), a tensor of images, or any
    dataset of ``(image, label)`` items (every item is read).
    """
    if isinstance(dataset, torch.Tensor):
        return _check_tensor_range(dataset, name or "images")
    name = name or getattr(dataset, "name", type(dataset).__name__)
    images = getattr(dataset, "images", None)
    if isinstance(images, torch.Tensor):
        return _check_tensor_range(images, name)
    for i in range(len(dataset)):
        item = dataset[i]
        _check_tensor_range(torch.as_tensor(item[0] if isinstance(item, (tuple, list)) else item), name)


def to_grey(images: torch.Tensor) -> torch.Tensor:
    """``(N, 3, H, W)`` colour to ``(N, 1, H, W)`` luminance."""
    weights = torch.tensor(LUMA, dtype=images.dtype).view(1, 3, 1, 1)
    return (images * weights).sum(dim=1, keepdim=True)


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of ``(N, C, H, W)`` to ``size x size``; antialiased when shrinking (SVHN 32 -> 28)."""
    if images.shape[-2:] == (size, size):
        return images
    out = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    # Bilinear weights are non-negative and sum to one, so only float rounding can leave [0, 1].
    return out.clamp_(0.0, 1.0)


def to_common_format(
    raw: torch.Tensor | np.ndarray,
    to_unit: Callable[[torch.Tensor], torch.Tensor],
    size: int,
    channels: int | None,
    name: str,
) -> torch.Tensor:
    """``raw`` ``(N, C, H, W)`` images (C 1 or 3) to float32 ``(N, channels, size, size)`` in [0, 1].

    ``to_unit`` maps one chunk of ``raw`` to float32 in [0, 1] (e.g. ``x / 255``); its output is
    checked before resizing, so a wrong mapping is caught exactly. Grey images asked for in
    three channels are an expanded view (no extra memory).
    """
    raw = torch.as_tensor(raw)
    if raw.ndim != 4 or raw.shape[1] not in CHANNEL_CHOICES:
        raise DataError(f"domain '{name}': expected images of shape (N, 1 or 3, H, W), got {tuple(raw.shape)}.")
    own = raw.shape[1]
    channels = own if channels is None else channels
    stored = min(own, channels)  # grey stays grey until the final expand
    out = torch.empty((raw.shape[0], stored, size, size), dtype=torch.float32)
    for start in range(0, raw.shape[0], _CHUNK):
        chunk = to_unit(raw[start : start + _CHUNK]).to(torch.float32)
        _check_tensor_range(chunk, name)
        if own == 3 and channels == 1:
            chunk = to_grey(chunk)
        out[start : start + _CHUNK] = resize(chunk, size)
    return out.expand(-1, channels, -1, -1) if stored != channels else out


class DigitDomain(Dataset):
    """Images of one digit domain in the common format, with their labels.

    ``images``: float32 ``(N, channels, size, size)`` in [0, 1]; ``labels``: int64 ``(N,)`` in 0..9.
    Items are ``(image, int label)``; the image is a copy, so in-place transforms leave the
    domain intact. Attributes: ``name``, ``split``, ``num_classes`` (10), ``channels``, ``size``.
    """

    num_classes = NUM_CLASSES

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, name: str, split: str):
        if images.ndim != 4 or images.shape[1] not in CHANNEL_CHOICES or images.shape[2] != images.shape[3]:
            raise DataError(
                f"domain '{name}': images must be (N, 1 or 3, S, S), got shape {tuple(images.shape)}."
            )
        if images.dtype != torch.float32:
            raise DataError(f"domain '{name}': images must be float32 in [0, 1], got {images.dtype}.")
        labels = torch.as_tensor(labels)
        if labels.ndim != 1 or len(labels) != len(images):
            raise DataError(
                f"domain '{name}': {len(images)} images but labels of shape {tuple(labels.shape)}; "
                "expected one label per image."
            )
        if len(labels) == 0:
            raise DataError(f"domain '{name}' ({split}) holds no images; check the data files.")
        if labels.is_floating_point() or int(labels.min()) < 0 or int(labels.max()) >= NUM_CLASSES:
            raise DataError(
                f"domain '{name}': labels must be integers 0..{NUM_CLASSES - 1}, got {labels.dtype} values in "
                f"[{labels.min().item()}, {labels.max().item()}]."
            )
        _check_tensor_range(images, name)
        self.images = images
        self.labels = labels.to(torch.int64)
        self.name, self.split = name, split
        self.channels, self.size = int(images.shape[1]), int(images.shape[2])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index].clone(), int(self.labels[index])

    def subset(self, count: int, seed: int = 0) -> "DigitDomain":
        """``count`` images drawn without replacement (fixed by ``seed``), e.g. the ADDA paper's 2,000."""
        if not 0 < count <= len(self):
            raise ConfigError(f"domain '{self.name}' has {len(self)} images; a subset of {count} is not possible "
                              f"(ask for 1..{len(self)}).")
        if count == len(self):
            return self
        keep = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:count].sort().values
        return DigitDomain(self.images[keep], self.labels[keep], self.name, self.split)

    def __repr__(self) -> str:
        return (
            f"DigitDomain(name={self.name!r}, split={self.split!r}, n={len(self)}, "
            f"channels={self.channels}, size={self.size})"
        )
