"""CelebA face attributes (40 binary tasks, as in Sener & Koltun 2018), from torchvision's folder layout.

Layout (what ``torchvision.datasets.CelebA(root, download=True)`` leaves behind)::

    root/celeba/img_align_celeba/000001.jpg ... 202599.jpg   the aligned and cropped faces (178 x 218)
    root/celeba/list_attr_celeba.txt     line 1: the image count; line 2: the 40 attribute names;
                                         then "filename v1 .. v40" with every v in {-1, 1}
    root/celeba/list_eval_partition.txt  "filename 0|1|2" (0 train, 1 valid, 2 test)

Only these three are read. torchvision also fetches ``identity_CelebA.txt``,
``list_bbox_celeba.txt`` and ``list_landmarks_align_celeba.txt``; they are not needed for
attributes and may be absent. The text files are parsed here (torchvision's class insists
on md5-matching all five files); ``verify_md5=True`` checks the two files read against the
md5 sums torchvision publishes (``torchvision.datasets.CelebA.file_list``).

Each image is resized to ``size x size`` (64 by default, as in Sener & Koltun; the aspect
ratio is not kept, as in their loader) with PIL's bilinear filter, scaled to [0, 1] and
normalised per channel with ``mean`` and ``std`` (ImageNet's by default). The targets are
``{attribute: float32 tensor of shape (1,)}`` holding 0 or 1 (the file's -1 becomes 0), so
a batch of them matches a one-logit binary head's ``B x 1`` output.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import ConfigError, DataError

SPLITS = {"train": 0, "valid": 1, "test": 2}
NUM_ATTRIBUTES = 40
BASE_FOLDER = "celeba"
IMAGE_FOLDER = "img_align_celeba"
ATTR_FILE = "list_attr_celeba.txt"
PARTITION_FILE = "list_eval_partition.txt"
# The md5 sums torchvision publishes for the original files (torchvision.datasets.CelebA.file_list).
MD5 = {
    ATTR_FILE: "75e246fa4810816ffd6ee81facbd244c",
    PARTITION_FILE: "d32c9cbf5e040fd4025c592c306e6668",
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LAYOUT = (
    f"root/{BASE_FOLDER}/{IMAGE_FOLDER}/*.jpg, root/{BASE_FOLDER}/{ATTR_FILE} and root/{BASE_FOLDER}/{PARTITION_FILE} "
    "(torchvision's CelebA layout; identity, bbox and landmark files are not needed)"
)


def _show(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _lines(path: Path) -> list[tuple[int, list[str]]]:
    """``(line number, tokens)`` of every non-blank line (any run of spaces separates; CRLF is fine)."""
    try:
        text = path.read_text(encoding="ascii")
    except UnicodeDecodeError as e:
        raise DataError(f"'{path}' is not a plain ASCII text file ({e}); re-download it.") from None
    return [(n, line.split()) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]


def parse_attr_file(path: Path) -> tuple[list[str], dict[str, int], np.ndarray]:
    """``(attribute names, {filename: row}, uint8 rows x 40 matrix of 0/1)`` from ``list_attr_celeba.txt``."""
    lines = _lines(path)
    fix = f"re-download it; expected line 1: the image count, line 2: {NUM_ATTRIBUTES} attribute names, " \
          f"then 'filename' and {NUM_ATTRIBUTES} values of -1 or 1 per line."
    if len(lines) < 2:
        raise DataError(f"'{path}' has {len(lines)} non-blank lines, too few for a CelebA attribute file; {fix}")
    (n_count, count_tokens), (n_header, names) = lines[0], lines[1]
    if len(count_tokens) != 1 or not count_tokens[0].isdigit():
        raise DataError(f"line {n_count} of '{path}' is {' '.join(count_tokens)!r}, not the image count; {fix}")
    if len(names) != NUM_ATTRIBUTES or len(set(names)) != NUM_ATTRIBUTES:
        raise DataError(
            f"line {n_header} of '{path}' holds {len(names)} names ({len(set(names))} distinct), not the "
            f"{NUM_ATTRIBUTES} distinct attribute names; {fix}"
        )
    rows: dict[str, int] = {}
    for r, (n, tokens) in enumerate(lines[2:]):
        if len(tokens) != NUM_ATTRIBUTES + 1:
            raise DataError(
                f"line {n} of '{path}' has {len(tokens)} columns; expected {NUM_ATTRIBUTES + 1} "
                f"(a filename and {NUM_ATTRIBUTES} values); {fix}"
            )
        if tokens[0] in rows:
            raise DataError(f"'{path}' lists {tokens[0]} twice (line {n}); {fix}")
        rows[tokens[0]] = r
    table = np.array([tokens[1:] for _, tokens in lines[2:]], dtype=str).reshape(-1, NUM_ATTRIBUTES)
    positive, negative = table == "1", table == "-1"
    bad = ~(positive | negative)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        n, tokens = lines[2 + r]
        raise DataError(
            f"line {n} of '{path}' ({tokens[0]}) holds the value {tokens[1 + c]!r} for {names[c]}; "
            f"attributes are -1 or 1; {fix}"
        )
    values = positive.astype(np.uint8)
    if int(count_tokens[0]) != len(rows):
        raise DataError(
            f"'{path}' says it holds {int(count_tokens[0])} images (line {n_count}) but lists {len(rows)}; "
            f"the file is cut short or edited; {fix}"
        )
    return names, rows, values


def parse_partition_file(path: Path) -> dict[str, int]:
    """``{filename: 0|1|2}`` from ``list_eval_partition.txt``."""
    fix = "re-download it; expected one 'filename 0|1|2' per line (0 train, 1 valid, 2 test)."
    partition: dict[str, int] = {}
    for n, tokens in _lines(path):
        if len(tokens) != 2 or tokens[1] not in ("0", "1", "2"):
            raise DataError(f"line {n} of '{path}' reads {' '.join(tokens)!r}; {fix}")
        if tokens[0] in partition:
            raise DataError(f"'{path}' lists {tokens[0]} twice (line {n}); {fix}")
        partition[tokens[0]] = int(tokens[1])
    return partition


def file_md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class CelebA(Dataset):
    """``(image float32 3 x size x size, {attribute: float32 tensor([0. or 1.])})``.

    ``root``: the folder holding ``celeba/``; ``split``: "train", "valid" or "test";
    ``size``: the side of the square the images are resized to; ``attributes``: the attribute
    names to return (all 40, in the file's order, by default); ``mean``/``std``: per-channel
    normalisation of the [0, 1] pixels; ``verify_md5``: check the two text files against
    torchvision's published md5 sums (only true for the original, unedited files).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        size: int = 64,
        attributes: list[str] | tuple[str, ...] | str | None = None,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        verify_md5: bool = False,
    ):
        if split not in SPLITS:
            raise DataError(f"unknown CelebA split '{split}'; use one of {tuple(SPLITS)}.")
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size <= 0:
            raise ConfigError(f"CelebA image size must be a positive integer, got {size!r}.")
        if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
            raise ConfigError(f"CelebA mean and std need three values each, std positive; got {mean} and {std}.")
        self.root = Path(os.path.expanduser(root))
        self.split, self.size = split, int(size)
        self.folder = self.root / BASE_FOLDER
        self.image_folder = self.folder / IMAGE_FOLDER
        self._check_layout()
        if verify_md5:
            self._verify_md5()

        self.attribute_names, rows, values = parse_attr_file(self.folder / ATTR_FILE)
        partition = parse_partition_file(self.folder / PARTITION_FILE)
        self.attributes = self._choose(attributes)
        self.filenames = [name for name, code in partition.items() if code == SPLITS[split]]
        if not self.filenames:
            raise DataError(
                f"the CelebA '{split}' split is empty: '{self.folder / PARTITION_FILE}' assigns no image to "
                f"{SPLITS[split]} ({split}). Re-download the partition file."
            )
        unlabelled = [name for name in self.filenames if name not in rows]
        if unlabelled:
            raise DataError(
                f"'{self.folder / PARTITION_FILE}' lists {len(unlabelled)} {split} images that "
                f"'{self.folder / ATTR_FILE}' does not: {_show(unlabelled)}. Re-download both files together."
            )
        present = set(os.listdir(self.image_folder))
        absent = [name for name in self.filenames if name not in present]
        if absent:
            raise DataError(
                f"{len(absent)} {split} images listed in '{self.folder / PARTITION_FILE}' are missing from "
                f"'{self.image_folder}': {_show(absent)}. Re-extract img_align_celeba.zip there."
            )
        columns = [self.attribute_names.index(a) for a in self.attributes]
        picked = values[[rows[name] for name in self.filenames]][:, columns]
        self.targets = torch.from_numpy(picked.astype(np.float32))  # N x len(attributes), 0/1
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def _check_layout(self) -> None:
        if not self.root.is_dir():
            raise DataError(
                f"CelebA data root '{self.root}' does not exist. Pass the folder that contains celeba/ "
                f"(e.g. after torchvision.datasets.CelebA(root, download=True)); expected {LAYOUT}."
            )
        if not self.folder.is_dir():
            hint = (
                f" '{self.root}' looks like the celeba folder itself: pass its parent, '{self.root.parent}'."
                if (self.root / IMAGE_FOLDER).is_dir() else ""
            )
            raise DataError(f"'{self.root}' has no {BASE_FOLDER}/ folder; expected {LAYOUT}.{hint}")
        missing = [str(self.image_folder) + "/"] if not self.image_folder.is_dir() else []
        missing += [str(self.folder / f) for f in (ATTR_FILE, PARTITION_FILE) if not (self.folder / f).is_file()]
        if missing:
            raise DataError(
                f"the CelebA folder '{self.folder}' lacks {', '.join(missing)}; expected {LAYOUT}. "
                "img_align_celeba/ comes from unzipping img_align_celeba.zip."
            )

    def _verify_md5(self) -> None:
        for name, expected in MD5.items():
            got = file_md5(self.folder / name)
            if got != expected:
                raise DataError(
                    f"'{self.folder / name}' has md5 {got}, not the {expected} that torchvision publishes for the "
                    "original file: it is corrupt or edited. Re-download it, or pass verify_md5=False for a "
                    "deliberately modified copy."
                )

    def _choose(self, attributes) -> list[str]:
        if attributes is None:
            return list(self.attribute_names)
        chosen = [attributes] if isinstance(attributes, str) else list(attributes)
        unknown = [a for a in chosen if a not in self.attribute_names]
        if unknown:
            raise DataError(
                f"unknown CelebA attribute(s) {', '.join(map(repr, unknown))}; valid names "
                f"(from '{self.folder / ATTR_FILE}'): {', '.join(self.attribute_names)}."
            )
        if not chosen or len(set(chosen)) != len(chosen):
            raise DataError(f"CelebA attributes must be a non-empty list without repeats, got {chosen}.")
        return chosen

    def __len__(self) -> int:
        return len(self.filenames)

    def load_image(self, index: int) -> torch.Tensor:
        """The image at ``index``, resized and normalised: float32 ``3 x size x size``."""
        from PIL import Image, UnidentifiedImageError

        path = self.image_folder / self.filenames[index]
        try:
            with Image.open(path) as img:
                img = img.convert("RGB").resize((self.size, self.size), Image.Resampling.BILINEAR)
                pixels = np.asarray(img, dtype=np.uint8)
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise DataError(
                f"could not read the CelebA image '{path}' ({e}); re-extract img_align_celeba.zip."
            ) from None
        image = torch.from_numpy(pixels.copy()).permute(2, 0, 1).to(torch.float32) / 255.0
        return (image - self.mean) / self.std

    def __getitem__(self, index: int):
        if not -len(self) <= index < len(self):
            raise IndexError(f"CelebA {self.split} index {index} out of range for {len(self)} images")
        index = index % len(self)
        row = self.targets[index]
        return self.load_image(index), {a: row[k:k + 1].clone() for k, a in enumerate(self.attributes)}
