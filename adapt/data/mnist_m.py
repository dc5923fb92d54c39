"""The real MNIST-M (Ganin et al. 2016) from a folder, as its distributed archive unpacks::

    root/mnist_m/mnist_m_train/*.png          colour digits, 28 x 28 (59,001 images)
    root/mnist_m/mnist_m_test/*.png           (9,001 images)
    root/mnist_m/mnist_m_train_labels.txt     one "<file name> <label>" line per image, label 0..9
    root/mnist_m/mnist_m_test_labels.txt

The labels file decides which images belong to a split (in its order); png files it does
not list are ignored. All images of a split must share one size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mtl.errors import DataError

from .domain import DigitDomain, check_options, to_common_format
from .files import require_file

FOLDER = "mnist_m"
LAYOUT = (
    "root/mnist_m/mnist_m_{train,test}/*.png with root/mnist_m/mnist_m_{train,test}_labels.txt "
    "(lines '<file name> <label>', label 0..9)"
)
_DIGITS = frozenset("0123456789")


def read_labels_file(path: Path) -> list[tuple[str, int]]:
    """``[(file name, label)]`` in the file's order."""
    fix = "expected one '<file name> <label>' line per image, label 0..9; re-extract the MNIST-M archive."
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"'{path}' is not a text file ({e}); {fix}") from None
    entries, seen = [], set()
    for n, line in enumerate(text.splitlines(), start=1):
        tokens = line.split()
        if not tokens:
            continue
        if len(tokens) != 2 or tokens[1] not in _DIGITS:
            raise DataError(f"line {n} of '{path}' reads {line.strip()!r}; {fix}")
        if "/" in tokens[0] or "\\" in tokens[0]:
            raise DataError(f"line {n} of '{path}' names '{tokens[0]}', not a file in the split's folder; {fix}")
        if tokens[0] in seen:
            raise DataError(f"'{path}' lists '{tokens[0]}' twice (line {n}); {fix}")
        seen.add(tokens[0])
        entries.append((tokens[0], int(tokens[1])))
    if not entries:
        raise DataError(f"'{path}' lists no images; {fix}")
    return entries


def _read_png(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except FileNotFoundError:
        raise DataError(
            f"'{path}' is listed in the labels file but missing; expected {LAYOUT}. Re-extract the archive."
        ) from None
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise DataError(f"could not read the MNIST-M image '{path}' ({e}); re-extract the archive.") from None


def mnist_m_domain(root: str | Path, split: str = "train", size: int = 28, channels: int | None = None) -> DigitDomain:
    """MNIST-M from ``root`` in the common format (colour)."""
    check_options(split, size, channels)
    labels_path = require_file(Path(root), f"{FOLDER}/mnist_m_{split}_labels.txt", "MNIST-M", LAYOUT)
    image_folder = labels_path.parent / f"mnist_m_{split}"
    if not image_folder.is_dir():
        raise DataError(f"'{image_folder}' is missing; expected {LAYOUT}.")
    entries = read_labels_file(labels_path)
    first = _read_png(image_folder / entries[0][0])
    images = np.empty((len(entries), *first.shape), dtype=np.uint8)
    for i, (name, _) in enumerate(entries):
        pixels = first if i == 0 else _read_png(image_folder / name)
        if pixels.shape != first.shape:
            raise DataError(
                f"'{image_folder / name}' is {pixels.shape[1]} x {pixels.shape[0]} pixels but "
                f"'{entries[0][0]}' is {first.shape[1]} x {first.shape[0]}; MNIST-M images share one size. "
                "Re-extract the archive."
            )
        images[i] = pixels
    raw = torch.from_numpy(images).permute(0, 3, 1, 2)
    labels = torch.tensor([label for _, label in entries], dtype=torch.int64)
    pixels = to_common_format(raw, lambda x: x.float() / 255.0, size, channels, "mnist_m")
    return DigitDomain(pixels, labels, "mnist_m", split)
