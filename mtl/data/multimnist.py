"""MultiMNIST (Sener & Koltun, NeurIPS 2018): two digits in one image; tasks ``left`` and ``right``.

Construction, as in the authors' loader: a 36x36 canvas, the left digit in its
top-left 28x28 corner (rows/cols 0..27), the right digit in its bottom-right
corner (rows/cols 6..33), the pixel-wise maximum where they overlap, then a
nearest-neighbour resize to 28x28. The pairs are drawn uniformly at random
(with replacement) from one MNIST split with a seeded generator, so the same
seed always gives the same data set, and test pairs use only test digits.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F
from torch.utils.data import Dataset

from ..errors import DataError
from .mnist import load_mnist

CANVAS = 36
RIGHT_OFFSET = 6
MEAN, STD = 0.1307, 0.3081  # MNIST pixel statistics, as used by Sener & Koltun
TASKS = ("left", "right")


def compose_pairs(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """uint8 ``N x 28 x 28`` digits -> uint8 ``N x 28 x 28`` MultiMNIST images."""
    n = left.shape[0]
    canvas = torch.zeros(n, CANVAS, CANVAS, dtype=torch.uint8)
    canvas[:, :28, :28] = left
    region = canvas[:, RIGHT_OFFSET:RIGHT_OFFSET + 28, RIGHT_OFFSET:RIGHT_OFFSET + 28]
    canvas[:, RIGHT_OFFSET:RIGHT_OFFSET + 28, RIGHT_OFFSET:RIGHT_OFFSET + 28] = torch.maximum(region, right)
    resized = F.interpolate(canvas[:, None].float(), size=(28, 28), mode="nearest-exact")
    return resized[:, 0].to(torch.uint8)


class MultiMNIST(Dataset):
    """``(image 1x28x28 float, {"left": label, "right": label})`` pairs.

    ``size``: number of pairs (default: as many as digits in the split);
    ``root``: a torchvision MNIST folder, or None for the embedded digits.
    """

    def __init__(self, split: str = "train", size: int | None = None, seed: int = 0, root=None):
        digits, labels = load_mnist(split, root)
        if len(digits) == 0:
            raise DataError(f"the MNIST {split} split is empty; check the data folder.")
        size = len(digits) if size is None else int(size)
        if size <= 0:
            raise DataError(f"MultiMNIST size must be positive, got {size}.")
        gen = torch.Generator().manual_seed(seed * 2 + (split == "test"))
        left = torch.randint(len(digits), (size,), generator=gen)
        right = torch.randint(len(digits), (size,), generator=gen)
        images = compose_pairs(digits[left], digits[right])
        self.images = ((images.float() / 255.0 - MEAN) / STD)[:, None].contiguous()
        self.labels = {"left": labels[left].contiguous(), "right": labels[right].contiguous()}

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i):
        return self.images[i], {t: self.labels[t][i] for t in TASKS}
