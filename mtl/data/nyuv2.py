"""NYUv2 in the mtan / LibMTL preprocessing: 13-class segmentation, depth and surface normals.

Layout (as distributed by mtan, https://github.com/lorenmt/mtan, and used by LibMTL)::

    root/{train,val}/image/{i}.npy    H x W x 3 float, RGB in [0, 1]
    root/{train,val}/label/{i}.npy    H x W, class ids 0..12, -1 for unlabelled pixels
    root/{train,val}/depth/{i}.npy    H x W x 1 float, metres; 0 where the depth is unknown
    root/{train,val}/normal/{i}.npy   H x W x 3 float; all-zero where the normal is unknown

with ``i`` running 0..N-1 (795 train, 654 val at 288 x 384 in the published files; any
H x W works, but every sample of a split must share it). A depth or normal pixel whose
channels sum to 0 is invalid; the tasks' losses and metrics mask it out.

Reading matches mtan's and LibMTL's ``NYUv2`` loaders (``create_dataset.py``): ``np.load``
each array, move the channel axis first (``np.moveaxis(a, -1, 0)``), no rescaling or
normalisation, cast to float32. The one difference: the labels come back as int64 (they
load them as float and call ``.long()`` in the loss).

Augmentation (train split only, ``augment=True``) is LibMTL's ``RandomScaleCrop`` plus a
horizontal flip: a scale ``s`` drawn uniformly from ``scales`` (1.0, 1.2, 1.5); a crop of
``int(H / s) x int(W / s)`` at a uniformly drawn top-left corner, resized back to H x W
(bilinear with ``align_corners=True`` for the image and normals, nearest for the labels
and, as in LibMTL, for the depth, so that unknown-depth zeros are never blended into valid
pixels); the depth divided by ``s`` (zooming in by ``s`` brings the scene ``s`` times
closer); the normals left as they are. Then, with probability ``flip_prob`` (0.5), every
map is mirrored left-right and the normals' x channel negated. At ``s = 1`` the crop is
the whole image and no resampling happens, so scale 1 without a flip is the identity.

The random draws are a pure function of ``(seed, epoch, index)`` (a ``torch.Generator``
seeded from them inside ``__getitem__``), never of the process or worker order, so a
resumed run sees exactly the augmentations it would have seen. The Trainer calls
``set_epoch`` on data sets that have it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.data import Dataset

from ..errors import ConfigError, DataError

SPLITS = ("train", "val")
MODALITIES = ("image", "label", "depth", "normal")
TASKS = ("segmentation", "depth", "normal")
NUM_CLASSES = 13
IGNORE_INDEX = -1
DEFAULT_HEIGHT, DEFAULT_WIDTH = 288, 384
DEFAULT_SCALES = (1.0, 1.2, 1.5)
CHANNELS = {"image": 3, "label": None, "depth": 1, "normal": 3}  # None: a plain H x W map
LAYOUT = (
    "root/{train,val}/{image,label,depth,normal}/{0..N-1}.npy (mtan / LibMTL preprocessing: "
    "image HxWx3 float, label HxW -1..12, depth HxWx1 float, normal HxWx3 float)"
)


@dataclass(frozen=True)
class Augmentation:
    """One sample's draw: crop ``int(H/scale) x int(W/scale)`` at (top, left), then flip or not."""

    scale: float
    top: int
    left: int
    flip: bool


def _expected_shape(modality: str, height: int, width: int) -> tuple[int, ...]:
    channels = CHANNELS[modality]
    return (height, width) if channels is None else (height, width, channels)


def _dtype_ok(modality: str, dtype: np.dtype) -> bool:
    if dtype.kind == "f":
        return True
    return modality == "label" and dtype.kind in "iu"


def _expected_dtype(modality: str) -> str:
    return "a signed/unsigned integer or float dtype" if modality == "label" else "a float dtype (float16/32/64)"


def read_npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """``(shape, dtype, data_offset)`` of a ``.npy`` file, reading only its header."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(f)
            else:  # version 3.0 (utf-8 field names): let numpy parse it, still without reading the data
                arr = np.load(path, mmap_mode="r", allow_pickle=False)
                return tuple(arr.shape), arr.dtype, int(arr.offset)
            return tuple(shape), dtype, f.tell()
    except (ValueError, OSError, EOFError) as e:
        raise DataError(
            f"'{path}' is not a readable .npy file ({e}); re-create it with numpy.save or re-download the "
            f"NYUv2 data. Expected layout: {LAYOUT}."
        ) from None


class NYUv2(Dataset):
    """``(image float32 3xHxW, {"segmentation": int64 HxW, "depth": float32 1xHxW, "normal": float32 3xHxW})``.

    ``root``: the folder holding ``train/`` and ``val/``; ``split``: "train" or "val";
    ``augment``: scale-crop and flip the training split (the val split never augments, whatever
    this says); ``seed``: the augmentation's seed; ``scales``, ``flip_prob``: the augmentation's
    settings; ``depth_mode``: how the scale-crop resamples depth, "nearest" (LibMTL) or "bilinear".
    The whole folder is validated when the data set is built; each sample's label values are
    checked when it is loaded.
    """

    tasks = TASKS
    num_classes = NUM_CLASSES
    ignore_index = IGNORE_INDEX

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        augment: bool = False,
        seed: int = 0,
        scales: tuple[float, ...] = DEFAULT_SCALES,
        flip_prob: float = 0.5,
        depth_mode: str = "nearest",
    ):
        if split not in SPLITS:
            raise DataError(f"unknown NYUv2 split '{split}'; use one of {SPLITS}.")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ConfigError(f"NYUv2 seed must be a non-negative integer, got {seed!r}.")
        scales = tuple(float(s) for s in scales)
        if not scales or any(not np.isfinite(s) or s < 1.0 for s in scales):
            raise ConfigError(f"NYUv2 scales must be a non-empty list of numbers >= 1, got {scales}.")
        if not 0.0 <= float(flip_prob) <= 1.0:
            raise ConfigError(f"NYUv2 flip_prob must lie in [0, 1], got {flip_prob}.")
        if depth_mode not in ("nearest", "bilinear"):
            raise ConfigError(f"NYUv2 depth_mode must be 'nearest' or 'bilinear', got {depth_mode!r}.")
        self.root = Path(os.path.expanduser(root))
        self.split = split
        self.augment = bool(augment) and split == "train"
        self.seed = int(seed)
        self.scales = scales
        self.flip_prob = float(flip_prob)
        self.depth_mode = depth_mode
        self.epoch = 0
        self.folder = self.root / split
        self.length = self._check_layout()
        self.height, self.width = self._check_headers()
        self._load(0)  # the first sample in full: its label values, and that it really reads

    # ------------------------------------------------------------------ validation

    def path(self, modality: str, index: int) -> Path:
        return self.folder / modality / f"{index}.npy"

    def _check_layout(self) -> int:
        if not self.root.is_dir():
            raise DataError(
                f"NYUv2 data root '{self.root}' does not exist. Pass the folder that contains train/ and val/ "
                f"from mtan's preprocessed NYUv2 (https://github.com/lorenmt/mtan); expected {LAYOUT}."
            )
        if not self.folder.is_dir():
            raise DataError(
                f"NYUv2 split folder '{self.folder}' does not exist: '{self.root}' should contain {self.split}/ "
                f"with image/, label/, depth/ and normal/ inside; expected {LAYOUT}."
            )
        missing = [m for m in MODALITIES if not (self.folder / m).is_dir()]
        if missing:
            raise DataError(
                f"NYUv2 split folder '{self.folder}' lacks {', '.join(str(self.folder / m) + '/' for m in missing)}; "
                f"every split needs image/, label/, depth/ and normal/. Expected {LAYOUT}."
            )
        indices = {m: self._indices(m) for m in MODALITIES}
        union = set().union(*indices.values())
        lacking = []
        for m in MODALITIES:
            absent = sorted(union - indices[m])
            if absent:
                shown = ", ".join(str(self.path(m, i)) for i in absent[:5])
                more = f" and {len(absent) - 5} more" if len(absent) > 5 else ""
                lacking.append(f"{m}/ has {len(indices[m])} files and lacks {shown}{more}")
        if lacking:
            raise DataError(
                f"the NYUv2 folders under '{self.folder}' do not hold the same samples: {'; '.join(lacking)}. "
                "Every index needs an image, a label, a depth and a normal file; re-extract the data."
            )
        if not union:
            raise DataError(
                f"the NYUv2 split folder '{self.folder}' holds no samples (no .npy files in image/); expected {LAYOUT}."
            )
        n = len(union)
        if union != set(range(n)):
            gaps = sorted(set(range(max(union) + 1)) - union)
            shown = ", ".join(f"{i}.npy" for i in gaps[:5]) + (f" and {len(gaps) - 5} more" if len(gaps) > 5 else "")
            raise DataError(
                f"NYUv2 sample indices under '{self.folder}' are not contiguous: they run up to {max(union)} "
                f"but {shown} are missing from all four folders. Files must be numbered 0..N-1; re-extract the data "
                "or renumber the files."
            )
        return n

    def _indices(self, modality: str) -> set[int]:
        folder = self.folder / modality
        found = set()
        for name in os.listdir(folder):
            if not name.endswith(".npy"):
                continue
            stem = name[: -len(".npy")]
            if not stem.isdigit() or (len(stem) > 1 and stem.startswith("0")):
                raise DataError(
                    f"unexpected file '{folder / name}': NYUv2 files are named by their index without padding "
                    f"(0.npy, 1.npy, ...). Rename or remove it; expected {LAYOUT}."
                )
            found.add(int(stem))
        return found

    def _check_headers(self) -> tuple[int, int]:
        height = width = None
        for i in range(self.length):
            for m in MODALITIES:
                path = self.path(m, i)
                shape, dtype, offset = read_npy_header(path)
                if height is None:  # the first image fixes the split's size
                    if len(shape) == 3 and shape[2] == 3:
                        height, width = shape[0], shape[1]
                    else:
                        expected = f"({DEFAULT_HEIGHT}, {DEFAULT_WIDTH}, 3) for mtan's files, or any (H, W, 3)"
                        raise DataError(
                            f"'{path}' holds an array of shape {shape}; expected an H x W x 3 image, {expected}. "
                            f"Expected layout: {LAYOUT}."
                        )
                expected = _expected_shape(m, height, width)
                if shape != expected:
                    raise DataError(
                        f"'{path}' holds an array of shape {shape}; expected {expected} (the {m} of a "
                        f"{height} x {width} sample, the size of '{self.path('image', 0)}'). Every sample of a "
                        f"split must have the same size; expected layout: {LAYOUT}."
                    )
                if not _dtype_ok(m, dtype):
                    raise DataError(
                        f"'{path}' holds {dtype} data; expected {_expected_dtype(m)} for the {m}. "
                        f"Re-create it with numpy.save from a numeric array; expected layout: {LAYOUT}."
                    )
                size = offset + int(np.prod(shape)) * dtype.itemsize
                actual = os.path.getsize(path)
                if actual < size:
                    raise DataError(
                        f"'{path}' is truncated: its header promises {shape} {dtype} ({size} bytes) but the file "
                        f"has {actual} bytes. Re-download or re-create it."
                    )
        return height, width

    # ------------------------------------------------------------------ loading

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose augmentations ``__getitem__`` draws (the Trainer calls this)."""
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ConfigError(f"NYUv2.set_epoch needs a non-negative integer, got {epoch!r}.")
        self.epoch = int(epoch)

    def _read(self, modality: str, index: int) -> np.ndarray:
        path = self.path(modality, index)
        try:
            array = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise DataError(f"could not read '{path}' ({e}); re-download or re-create it.") from None
        expected = _expected_shape(modality, self.height, self.width)
        if array.shape != expected or not _dtype_ok(modality, array.dtype):
            raise DataError(
                f"'{path}' holds {array.dtype} of shape {array.shape}, expected {_expected_dtype(modality)} of shape "
                f"{expected}; it changed after the data set was built. Rebuild the data set."
            )
        if modality == "label":
            bad = ~np.isin(array, np.arange(IGNORE_INDEX, NUM_CLASSES))
            if bad.any():
                value = array[bad].flat[0]
                raise DataError(
                    f"'{path}' holds label value {value}; NYUv2 labels are the integers -1..12 (-1 = unlabelled, "
                    f"{NUM_CLASSES} classes). Fix or re-download the file."
                )
        elif not np.isfinite(array).all():
            raise DataError(
                f"'{path}' holds NaN or infinite values; mark unknown {modality} pixels with 0 instead. "
                "Fix or re-download the file."
            )
        return array

    def _load(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        image = torch.from_numpy(np.ascontiguousarray(np.moveaxis(self._read("image", index), -1, 0), np.float32))
        label = torch.from_numpy(self._read("label", index).astype(np.int64))
        depth = torch.from_numpy(np.ascontiguousarray(np.moveaxis(self._read("depth", index), -1, 0), np.float32))
        normal = torch.from_numpy(np.ascontiguousarray(np.moveaxis(self._read("normal", index), -1, 0), np.float32))
        return image, label, depth, normal

    def draw_augmentation(self, index: int, epoch: int | None = None) -> Augmentation:
        """The scale, crop corner and flip of sample ``index`` in ``epoch`` (the current one by default)."""
        epoch = self.epoch if epoch is None else int(epoch)
        state = np.random.SeedSequence([self.seed, epoch, int(index)]).generate_state(1, np.uint64)
        gen = torch.Generator().manual_seed(int(state[0]))
        scale = self.scales[int(torch.randint(len(self.scales), (1,), generator=gen))]
        h, w = int(self.height / scale), int(self.width / scale)
        top = int(torch.randint(self.height - h + 1, (1,), generator=gen))
        left = int(torch.randint(self.width - w + 1, (1,), generator=gen))
        flip = bool(torch.rand((), generator=gen) < self.flip_prob)
        return Augmentation(scale, top, left, flip)

    def __getitem__(self, index: int):
        if not -self.length <= index < self.length:
            raise IndexError(f"NYUv2 {self.split} index {index} out of range for {self.length} samples")
        index = index % self.length
        image, label, depth, normal = self._load(index)
        if self.augment:
            aug = self.draw_augmentation(index)
            image, label, depth, normal = scale_crop_flip(image, label, depth, normal, aug, self.depth_mode)
        return image, {"segmentation": label, "depth": depth, "normal": normal}


def scale_crop_flip(image, label, depth, normal, aug: Augmentation, depth_mode: str = "nearest"):
    """Apply one ``Augmentation`` to ``(image 3xHxW, label HxW int64, depth 1xHxW, normal 3xHxW)``."""
    height, width = image.shape[-2:]
    h, w = int(height / aug.scale), int(width / aug.scale)
    if (h, w) != (height, width):
        rows, cols = slice(aug.top, aug.top + h), slice(aug.left, aug.left + w)

        def resize(x, mode):
            kwargs = {"align_corners": True} if mode == "bilinear" else {}
            return F.interpolate(x[None, :, rows, cols], size=(height, width), mode=mode, **kwargs)[0]

        image = resize(image, "bilinear")
        normal = resize(normal, "bilinear")
        depth = resize(depth, depth_mode)
        label = resize(label[None].to(torch.float32), "nearest")[0].to(torch.int64)
    depth = depth / aug.scale
    if aug.flip:
        image, label, depth, normal = (torch.flip(x, dims=[-1]) for x in (image, label, depth, normal))
        normal = torch.cat([-normal[:1], normal[1:]], dim=0)
    return image, label, depth, normal
