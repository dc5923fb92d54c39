"""Tiny USPS, SVHN and MNIST-M written in their real on-disk formats, for tests and smoke runs.

The ``write_*_file`` functions write given pixels; ``write_usps``, ``write_svhn`` and
``write_mnist_m`` fill a whole root with random images (labels cycle through 0..9).
The loaders read these exactly as they read the downloaded data.
"""

from __future__ import annotations

import bz2
from pathlib import Path

import numpy as np


def write_usps_file(path: str | Path, pixels: np.ndarray, digits: np.ndarray) -> Path:
    """A bz2 libsvm file: ``digit + 1`` then ``i:value`` for i in 1..256 (``pixels``: N x 16 x 16 in [-1, 1])."""
    lines = []
    for image, digit in zip(np.asarray(pixels, dtype=np.float64).reshape(len(digits), -1), digits):
        features = " ".join(f"{i}:{v:.6f}" for i, v in enumerate(image, start=1))
        lines.append(f"{int(digit) + 1} {features}\n")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with bz2.open(path, "wt", encoding="ascii") as f:
        f.writelines(lines)
    return path


def write_svhn_file(path: str | Path, images: np.ndarray, digits: np.ndarray) -> Path:
    """A MATLAB file with ``X`` uint8 32 x 32 x 3 x N (``images``: N x 32 x 32 x 3) and ``y`` N x 1 (0 as 10)."""
    import scipy.io

    labels = np.where(np.asarray(digits) == 0, 10, digits).astype(np.uint8).reshape(-1, 1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    x = np.ascontiguousarray(np.asarray(images, dtype=np.uint8).transpose(1, 2, 3, 0))
    scipy.io.savemat(str(path), {"X": x, "y": labels})
    return path


def write_mnist_m_split(root: str | Path, split: str, images: np.ndarray, digits: np.ndarray) -> Path:
    """``root/mnist_m/mnist_m_{split}/NNNNNNNN.png`` (``images``: N x H x W x 3 uint8) and the labels file."""
    from PIL import Image

    folder = Path(root) / "mnist_m" / f"mnist_m_{split}"
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (image, digit) in enumerate(zip(images, digits)):
        name = f"{i:08d}.png"
        Image.fromarray(np.asarray(image, dtype=np.uint8)).save(folder / name)
        lines.append(f"{name} {int(digit)}\n")
    (folder.parent / f"mnist_m_{split}_labels.txt").write_text("".join(lines))
    return folder


def _random(n: int, shape: tuple[int, ...], seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, *shape), dtype=np.uint8), np.arange(n) % 10


def write_usps(root: str | Path, n_train: int = 20, n_test: int = 10, seed: int = 0) -> Path:
    """``root/usps.bz2`` and ``root/usps.t.bz2`` with random 16 x 16 images."""
    for name, n, offset in (("usps.bz2", n_train, 0), ("usps.t.bz2", n_test, 1)):
        images, digits = _random(n, (16, 16), seed + offset)
        write_usps_file(Path(root) / name, images / 127.5 - 1.0, digits)
    return Path(root)


def write_svhn(root: str | Path, n_train: int = 20, n_test: int = 10, seed: int = 0) -> Path:
    """``root/train_32x32.mat`` and ``root/test_32x32.mat`` with random colour images."""
    for split, n, offset in (("train", n_train, 0), ("test", n_test, 1)):
        write_svhn_file(Path(root) / f"{split}_32x32.mat", *_random(n, (32, 32, 3), seed + offset))
    return Path(root)


def write_mnist_m(root: str | Path, n_train: int = 20, n_test: int = 10, seed: int = 0) -> Path:
    """``root/mnist_m/`` with random 28 x 28 colour pngs and both labels files."""
    for split, n, offset in (("train", n_train, 0), ("test", n_test, 1)):
        write_mnist_m_split(root, split, *_random(n, (28, 28, 3), seed + offset))
    return Path(root)
