"""Checks shared by the on-disk loaders: a data root that exists, a file where the layout puts it, an md5."""

from __future__ import annotations

from pathlib import Path

from mtl.data.celeba import file_md5
from mtl.errors import DataError


def require_root(root: Path, dataset: str, layout: str) -> Path:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(
            f"{dataset} data root '{root}' does not exist or is not a folder. Pass (--data-root) the folder "
            f"that holds the downloaded files, laid out as {layout}."
        )
    return root


def require_file(root: Path, relative: str, dataset: str, layout: str) -> Path:
    """``root / relative``, or a DataError naming the missing file and the whole expected layout."""
    root = require_root(root, dataset, layout)
    path = root / relative
    if not path.is_file():
        raise DataError(f"'{root}' is not in the expected {dataset} layout: '{path}' is missing. Expected {layout}.")
    return path


def check_md5(path: Path, expected: str) -> None:
    got = file_md5(path)
    if got != expected:
        raise DataError(
            f"'{path}' has md5 {got}, not the {expected} that torchvision publishes for the original file: "
            "it is corrupt or edited. Re-download it, or pass verify_md5=False for a deliberately modified copy."
        )
