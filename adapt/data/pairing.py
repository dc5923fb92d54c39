"""Source and target side by side for unsupervised domain adaptation.

``PairedDomains(source, target)`` is one Dataset whose item ``i`` is
``{"source": (x_s, y_s), "target": x_t}``: the target gives images only, through an
``Unlabelled`` view, so no adaptation method can read a target label by accident.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch.utils.data import Dataset

from mtl.errors import ConfigError, DataError


def _describe(dataset, role: str) -> tuple[str, int, int, int]:
    """``(name, num_classes, channels, size)``; channels and size read off the first image if not declared."""
    name = getattr(dataset, "name", type(dataset).__name__)
    num_classes = getattr(dataset, "num_classes", None)
    if num_classes is None:
        raise DataError(
            f"the {role} data set '{name}' does not declare num_classes; give it a num_classes attribute "
            "(the digit domains of adapt.data have it)."
        )
    channels, size = getattr(dataset, "channels", None), getattr(dataset, "size", None)
    if channels is None or size is None:
        if len(dataset) == 0:
            raise DataError(f"the {role} data set '{name}' is empty.")
        first = dataset[0]
        image = first[0] if isinstance(first, (tuple, list)) else first
        channels, size = int(image.shape[0]), int(image.shape[-1])
    return name, int(num_classes), int(channels), int(size)


def check_compatible(source, target, class_mapping: Mapping[int, int] | None = None) -> None:
    """Raise DataError unless one model can read both domains and their classes correspond.

    Channels and image size must match (build both with the same ``channels`` and ``size``).
    Class counts must match unless ``class_mapping`` (source class -> target class) says how
    they correspond; a given mapping must name existing classes on both sides.
    """
    s_name, s_classes, s_channels, s_size = _describe(source, "source")
    t_name, t_classes, t_channels, t_size = _describe(target, "target")
    if s_channels != t_channels:
        raise DataError(
            f"source '{s_name}' has {s_channels}-channel images and target '{t_name}' {t_channels}-channel ones; "
            "one network reads both, so build both with the same channels: channels=3 for both (grey digits are "
            "repeated to 3 channels) or channels=1 for both (colour becomes luminance), e.g. --channels 3."
        )
    if s_size != t_size:
        raise DataError(
            f"source '{s_name}' has {s_size}x{s_size} images and target '{t_name}' {t_size}x{t_size}; "
            "build both with the same size (e.g. size=32 for both with SVHN)."
        )
    if class_mapping is None:
        if s_classes != t_classes:
            raise DataError(
                f"source '{s_name}' has {s_classes} classes and target '{t_name}' {t_classes}; without a "
                "class_mapping (source class -> target class) the labels cannot be compared. Give one, or "
                "use domains with the same classes."
            )
        return
    for s, t in class_mapping.items():
        if not (isinstance(s, int) and isinstance(t, int) and 0 <= s < s_classes and 0 <= t < t_classes):
            raise ConfigError(
                f"class_mapping entry {s!r} -> {t!r} does not map a source class 0..{s_classes - 1} of "
                f"'{s_name}' to a target class 0..{t_classes - 1} of '{t_name}'."
            )


class Unlabelled(Dataset):
    """A view of a labelled data set that gives its images only.

    The wrapped set is held privately; ``name``, ``num_classes``, ``channels`` and ``size`` are
    copied, the labels are not.
    """

    def __init__(self, dataset):
        self._dataset = dataset._dataset if isinstance(dataset, Unlabelled) else dataset
        self.name = getattr(dataset, "name", type(dataset).__name__)
        for attribute in ("num_classes", "channels", "size"):
            setattr(self, attribute, getattr(dataset, attribute, None))

    def __len__(self) -> int:
        return len(self._dataset)

    def __getitem__(self, index: int) -> torch.Tensor:
        item = self._dataset[index]
        return item[0] if isinstance(item, (tuple, list)) else item

    def __repr__(self) -> str:
        return f"Unlabelled({self.name!r}, n={len(self)})"


class TaskTargets(Dataset):
    """A labelled domain as the Trainer evaluates it: items ``(image, {task: label})``."""

    def __init__(self, dataset, task: str):
        self.dataset, self.task = dataset, task

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, label = self.dataset[index]
        return image, {self.task: label}


class PairedDomains(Dataset):
    """Labelled source and unlabelled target, paired by index, for one DataLoader.

    Length ``max(len(source), len(target))``; item ``i`` is
    ``{"source": (source image, label), "target": target image}`` with the shorter domain
    cycled (``i % its length``), so every image of the longer domain is seen once per epoch
    and the shorter one's images about equally often. The pairing of indices is fixed; a
    DataLoader with ``shuffle=True`` shuffles ``i``, and so both domains' order, every epoch.
    Torch's default collate gives ``{"source": [images, labels], "target": images}``.
    ``class_mapping`` is checked (``check_compatible``) and kept for evaluation.
    """

    def __init__(self, source, target, class_mapping: Mapping[int, int] | None = None):
        check_compatible(source, target, class_mapping)
        if len(source) == 0 or len(target) == 0:
            empty = "source" if len(source) == 0 else "target"
            raise DataError(f"the {empty} domain is empty; both domains need at least one image.")
        self.source = source
        self.target = target if isinstance(target, Unlabelled) else Unlabelled(target)
        self.class_mapping = dict(class_mapping) if class_mapping is not None else None
        _, self.num_classes, self.channels, self.size = _describe(source, "source")

    def __len__(self) -> int:
        return max(len(self.source), len(self.target))

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"paired index {index} out of range for {len(self)} pairs")
        index %= len(self)
        image, label = self.source[index % len(self.source)]
        return {"source": (image, label), "target": self.target[index % len(self.target)]}

    def __repr__(self) -> str:
        return f"PairedDomains(source={self.source!r}, target={self.target!r}, n={len(self)})"
