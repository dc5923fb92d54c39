"""USPS handwritten digits from torchvision's layout: ``root/usps.bz2`` (train, 7,291 images)
and ``root/usps.t.bz2`` (test, 2,007), the bz2-compressed libsvm files torchvision downloads.

Each line is ``label index:value ...`` with the label in 1..10 (digit = label - 1) and 256
pixel values in [-1, 1] at indices 1..256, row-major 16 x 16. The file is parsed here rather
than by ``torchvision.datasets.USPS``, which casts ``(v + 1) / 2 * 255`` to uint8 (losing
precision, and wrapping any value a hair below -1) and ignores the indices. Here pixels map
exactly to ``(v + 1) / 2`` in [0, 1]; an index left out means 0, as in libsvm's sparse format.
"""

from __future__ import annotations

import bz2
from pathlib import Path

import numpy as np
import torch

from mtl.errors import DataError

from .domain import DigitDomain, check_options, to_common_format
from .files import check_md5, require_file

FILES = {"train": "usps.bz2", "test": "usps.t.bz2"}
SIDE = 16
# The md5 sums torchvision publishes for the original files (torchvision.datasets.USPS.split_list).
MD5 = {"train": "ec16c51db3855ca6c91edd34d0e9b197", "test": "8ea070ee2aca1ac39742fdd1ef5ed118"}
LAYOUT = "root/usps.bz2 and root/usps.t.bz2 (torchvision's USPS layout: the libsvm files, still bz2-compressed)"
_TOLERANCE = 1e-6  # printed values may round a hair past +-1


def _parse_line(tokens: list[str]) -> tuple[int, np.ndarray]:
    """``(label, 256 pixels)`` of one line's tokens; ValueError saying what is wrong."""
    label = int(tokens[0])
    if not 1 <= label <= 10:
        raise ValueError(f"the label {label} is outside 1..10")
    row = np.zeros(SIDE * SIDE, dtype=np.float32)
    for token in tokens[1:]:
        index, _, value = token.partition(":")
        position = int(index) - 1
        if not 0 <= position < SIDE * SIDE:
            raise ValueError(f"the pixel index {index} is outside 1..{SIDE * SIDE}")
        row[position] = float(value)
    if np.abs(row).max() > 1 + _TOLERANCE:
        raise ValueError(f"the pixel value {row[np.abs(row).argmax()]:g} is outside [-1, 1]")
    return label, row


def parse_usps_file(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(pixels float32 N x 256 in [-1, 1], digits int64 N)`` from one libsvm ``.bz2`` file."""
    fix = "re-download it; expected lines 'label index:value ...' with labels 1..10, indices 1..256, values in [-1, 1]."
    rows, digits = [], []
    try:
        with bz2.open(path, "rt", encoding="ascii") as f:
            for n, line in enumerate(f, start=1):
                tokens = line.split()
                if not tokens:
                    continue
                try:
                    label, row = _parse_line(tokens)
                except ValueError as e:  # int()/float() failures land here too
                    raise DataError(f"line {n} of '{path}' is not a USPS libsvm line: {e}; {fix}") from None
                rows.append(row)
                digits.append(label - 1)
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise DataError(f"could not read '{path}' as a bz2-compressed text file ({e}); {fix}") from None
    if not rows:
        raise DataError(f"'{path}' holds no images; {fix}")
    return np.stack(rows), np.asarray(digits, dtype=np.int64)


def usps_domain(
    root: str | Path, split: str = "train", size: int = 28, channels: int | None = None, verify_md5: bool = False
) -> DigitDomain:
    """USPS from ``root`` in the common format (grey; ``verify_md5`` checks torchvision's published sum)."""
    check_options(split, size, channels)
    path = require_file(Path(root), FILES[split], "USPS", LAYOUT)
    if verify_md5:
        check_md5(path, MD5[split])
    pixels, digits = parse_usps_file(path)
    raw = torch.from_numpy(pixels.clip(-1.0, 1.0).reshape(-1, 1, SIDE, SIDE))
    images = to_common_format(raw, lambda x: (x + 1.0) / 2.0, size, channels, "usps")
    return DigitDomain(images, torch.from_numpy(digits), "usps", split)
