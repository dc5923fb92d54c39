"""An MNIST-M-style colour domain built from data the dependencies ship.

MNIST-M (Ganin et al. 2016) blends each MNIST digit with a random patch of a BSDS500
photograph: ``out = |patch - digit|`` per colour channel. Here the digits are the embedded
MNIST (same 4,000 / 1,000 split as ``mnist_domain``) and the patches come from the two
photographs scikit-learn ships (``load_sample_images``: china.jpg, flower.jpg, 427 x 640).

For each digit a photograph and a 28 x 28 window in it are drawn from NumPy's legacy
``RandomState([seed, 0 for train | 1 for test])`` (a frozen stream), so the images depend on
the seed only. Blending happens at MNIST's 28 x 28, as in the original, before resizing
to ``size``. Everything is computed in memory (about a second); nothing is cached on disk.
The drawn windows are kept as ``patch_origins`` (photo index, top, left) per image.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from mtl.data.mnist import load_mnist
from mtl.errors import ConfigError

from .domain import DigitDomain, check_options, to_common_format

PATCH = 28  # MNIST's side: one photo window per digit pixel


def blend(digits: np.ndarray, patches: np.ndarray) -> np.ndarray:
    """MNIST-M's blend, ``|patch - digit|`` per channel.

    ``digits``: ``(N, H, W)``, ``patches``: ``(N, H, W, 3)``, both in one range (0..255 or
    [0, 1]); returns ``(N, H, W, 3)`` in that range and dtype.
    """
    wide = np.int16 if patches.dtype == np.uint8 else patches.dtype  # uint8 would wrap below zero
    return np.abs(patches.astype(wide) - digits[..., None].astype(wide)).astype(patches.dtype)


@lru_cache(maxsize=1)
def _photos() -> np.ndarray:
    """The two sample photographs as one uint8 array ``(2, 427, 640, 3)``."""
    from sklearn.datasets import load_sample_images

    return np.stack(load_sample_images().images)


def draw_patches(n: int, seed: int, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``n`` random 28 x 28 photo windows, uint8 ``(n, 28, 28, 3)``, and their ``(photo, top, left)``."""
    photos = _photos()
    _, height, width, _ = photos.shape
    rng = np.random.RandomState([seed, 0 if split == "train" else 1])
    photo = rng.randint(0, len(photos), size=n)
    top = rng.randint(0, height - PATCH + 1, size=n)
    left = rng.randint(0, width - PATCH + 1, size=n)
    offsets = np.arange(PATCH)
    rows = top[:, None, None] + offsets[None, :, None]
    cols = left[:, None, None] + offsets[None, None, :]
    patches = photos[photo[:, None, None], rows, cols]  # (n, 28, 28, 3)
    return patches, np.stack([photo, top, left], axis=1)


def mnist_m_style_domain(
    split: str = "train", size: int = 28, channels: int | None = None, seed: int = 0
) -> DigitDomain:
    """Embedded MNIST digits blended with photo patches; colour (3 channels) unless ``channels=1``."""
    check_options(split, size, channels)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"mnist_m_style seed must be a non-negative integer, got {seed!r}.")
    digits, labels = load_mnist(split)  # embedded: uint8 N x 28 x 28
    patches, origins = draw_patches(len(digits), int(seed), split)
    blended = blend(digits.numpy(), patches)  # uint8, exact
    raw = torch.from_numpy(np.ascontiguousarray(blended.transpose(0, 3, 1, 2)))
    pixels = to_common_format(raw, lambda x: x.float() / 255.0, size, channels, "mnist_m_style")
    domain = DigitDomain(pixels, labels, "mnist_m_style", split)
    domain.patch_origins = torch.from_numpy(origins.astype(np.int64))
    return domain
