"""SVHN (cropped digits) from torchvision's layout: ``root/train_32x32.mat`` (73,257 images)
and ``root/test_32x32.mat`` (26,032).

Each file is a MATLAB (v5) file with ``X``: uint8 ``32 x 32 x 3 x N`` (height, width,
colour, image) and ``y``: ``N x 1`` labels in 1..10, where 10 stands for the digit 0; here
10 becomes 0. The file is read with scipy directly rather than through
``torchvision.datasets.SVHN``, which refuses any file whose md5 differs from the original's;
``verify_md5=True`` makes that check here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mtl.errors import DataError

from .domain import DigitDomain, check_options, to_common_format
from .files import check_md5, require_file

FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat"}
# The md5 sums torchvision publishes for the original files (torchvision.datasets.SVHN.split_list).
MD5 = {"train": "e26dedcc434d2e4c54c9b2d4a06d8373", "test": "eb5a983be6a315427106f1b164d9cef3"}
LAYOUT = "root/train_32x32.mat and root/test_32x32.mat (torchvision's SVHN layout, the cropped-digits files)"
SHAPE = (32, 32, 3)


def read_svhn_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 N x 3 x 32 x 32, digits int64 N in 0..9)`` from one ``*_32x32.mat`` file."""
    import scipy.io

    fix = "re-download it; expected a MATLAB file with X (uint8, 32 x 32 x 3 x N) and y (N x 1, labels 1..10)."
    try:
        mat = scipy.io.loadmat(str(path))
    except Exception as e:  # scipy raises assorted errors (ValueError, TypeError, ...) on a broken file
        raise DataError(f"could not read '{path}' as a MATLAB .mat file ({type(e).__name__}: {e}); {fix}") from None
    missing = [key for key in ("X", "y") if key not in mat]
    if missing:
        raise DataError(f"'{path}' has no variable {' or '.join(missing)}; {fix}")
    images, labels = mat["X"], np.asarray(mat["y"]).reshape(-1)
    if images.ndim != 4 or images.shape[:3] != SHAPE or images.dtype != np.uint8:
        raise DataError(f"'{path}' holds X of shape {images.shape} and dtype {images.dtype}; {fix}")
    if len(labels) != images.shape[3]:
        raise DataError(f"'{path}' holds {images.shape[3]} images but {len(labels)} labels; {fix}")
    if len(labels) == 0:
        raise DataError(f"'{path}' holds no images; {fix}")
    bad = (labels < 1) | (labels > 10) | (labels != np.round(labels))
    if bad.any():
        raise DataError(
            f"'{path}' holds the label {labels[bad][0].item():g}; SVHN labels are 1..10 (10 is the digit 0); {fix}"
        )
    digits = labels.astype(np.int64) % 10  # SVHN writes the digit 0 as 10
    return images.transpose(3, 2, 0, 1), digits


def svhn_domain(
    root: str | Path, split: str = "train", size: int = 28, channels: int | None = None, verify_md5: bool = False
) -> DigitDomain:
    """SVHN from ``root`` in the common format (colour; 32 x 32 natively, so ``size=32`` keeps it as is)."""
    check_options(split, size, channels)
    path = require_file(Path(root), FILES[split], "SVHN", LAYOUT)
    if verify_md5:
        check_md5(path, MD5[split])
    images, digits = read_svhn_mat(path)
    pixels = to_common_format(images, lambda x: x.float() / 255.0, size, channels, "svhn")
    return DigitDomain(pixels, torch.from_numpy(digits), "svhn", split)
