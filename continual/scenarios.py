"""Continual-learning streams: a sequence of experiences, each with its own train and test set.

A ``Stream`` is the data side of a continual run. It holds the experiences in the order
they are trained and the *setting* (van de Ven & Tolias 2019, "Three scenarios for
continual learning"), which decides what the model's output layer looks like and what
is known at test time:

- ``"task"`` (Task-IL): one head per task; the task id is given at test time, so each
  head only separates the classes of its own experience.
- ``"class"`` (Class-IL): one head that grows as new classes arrive; no task id at test
  time, so the model must tell every class seen so far apart.
- ``"domain"`` (Domain-IL): one shared head over one label space (e.g. the ten digits
  of every permuted MNIST task, or "first / second class of the pair" in Split-MNIST).

Datasets always yield the ORIGINAL class ids; ``Stream.head_label`` maps a label to the
output index of the head that the setting uses, so strategies never re-implement it.

Generators: ``split_stream`` (disjoint groups of classes), ``permuted_stream`` (a fixed
random pixel permutation per task) and ``rotated_stream`` (a fixed rotation angle per
task). ``build_stream(name, setting)`` builds the named streams in ``STREAMS``, from the
embedded data sets or from torchvision's on-disk layouts under ``root``.
"""

from __future__ import annotations

import codecs
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from mtl.batches import Gathered
from mtl.errors import ConfigError, DataError

SETTINGS = ("task", "class", "domain")
STREAMS = ("split_mnist", "permuted_mnist", "rotated_mnist", "split_uci_digits", "split_cifar10", "split_cifar100")
_ROTATE_CHUNK = 4096  # images rotated at a time, so a large split never needs two float copies at once


def check_setting(setting: str) -> str:
    """Return ``setting`` if it is one of ``SETTINGS``, else raise a ConfigError listing them."""
    if setting not in SETTINGS:
        raise ConfigError(
            f"unknown continual-learning setting {setting!r}; use one of {SETTINGS}: 'task' (a head per task, "
            "task id given at test), 'class' (one growing head, no task id), 'domain' (one shared head)."
        )
    return setting


class LabelledImages(Dataset):
    """Images held as one float tensor ``(N, C, H, W)`` in [0, 1], with int64 labels; items ``(image, int)``.

    ``permutation`` (optional, a LongTensor of ``H * W`` pixel indices) is applied on access,
    the same for every channel: the permuted tasks of a stream then share one stored copy of
    the images instead of holding ten. Items are copies, so in-place transforms leave the
    stored images intact.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, permutation: torch.Tensor | None = None):
        if len(images) != len(labels):
            raise DataError(f"{len(images)} images but {len(labels)} labels; expected one label per image.")
        self.images, self.labels, self.permutation = images, labels, permutation

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        if self.permutation is None:
            return image.clone(), int(self.labels[index])
        flat = image.reshape(image.shape[0], -1)[:, self.permutation]  # advanced indexing copies
        return flat.view(image.shape), int(self.labels[index])

    def take(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """The images (a copy) and labels at ``indices``, gathered at once rather than item by item."""
        # one index tensor for both gathers
        if not isinstance(indices, torch.Tensor):
            indices = torch.as_tensor(indices, dtype=torch.long)
        return self.take_images(indices), self.labels.index_select(0, indices)

    def take_images(self, indices: torch.Tensor) -> torch.Tensor:
        """The images at ``indices`` (a long tensor), a copy; index_select costs half of advanced indexing."""
        images = self.images.index_select(0, indices)
        if self.permutation is not None:
            images = images.flatten(2)[:, :, self.permutation].view(images.shape)
        return images

    def __getitems__(self, indices) -> Gathered:
        """What a DataLoader fetches for one batch: one gather instead of a ``__getitem__`` per item."""
        return Gathered(*self.take(indices))

    def __repr__(self) -> str:
        kind = ", permuted" if self.permutation is not None else ""
        return f"LabelledImages(n={len(self)}, shape={tuple(self.images.shape[1:])}{kind})"


@dataclass(frozen=True, eq=False)
class Experience:
    """One step of a stream: what is trained on (``train``) and measured on (``test``) at ``index``.

    ``task_id`` is the task the experience belongs to (given to the model only in Task-IL);
    ``classes`` is the sorted tuple of the original class ids present; ``description`` says
    what makes this experience different (its classes, permutation or angle), for logs.
    """

    index: int
    task_id: int
    train: Dataset
    test: Dataset
    classes: tuple[int, ...]
    description: str = ""


class Stream:
    """An ordered list of experiences and the setting that decides the output heads.

    ``num_classes`` counts the distinct classes over the whole stream; ``input_shape`` is
    ``(C, H, W)``; ``class_order`` lists every class in the order the stream introduces it
    (experience by experience, sorted within one), which is the output order of the
    growing Class-IL head.
    """

    def __init__(self, name: str, setting: str, experiences: Sequence[Experience], input_shape: Sequence[int]):
        self.name, self.setting = name, check_setting(setting)
        self.experiences = list(experiences)
        self.input_shape = tuple(int(s) for s in input_shape)
        if not self.experiences:
            raise ConfigError(f"stream '{name}' has no experiences; give at least one.")
        for position, exp in enumerate(self.experiences):
            if exp.index != position:
                raise ConfigError(f"stream '{name}': experience at position {position} has index {exp.index}; "
                                  "indices must be 0, 1, 2, ... in stream order.")
            classes = exp.classes
            if not classes or tuple(sorted(classes)) != classes or len(set(classes)) != len(classes):
                raise ConfigError(f"stream '{name}': experience {position} has classes {exp.classes}; "
                                  "expected a non-empty sorted tuple of distinct class ids.")
        order: list[int] = []
        for exp in self.experiences:
            order += [c for c in exp.classes if c not in order]
        self.class_order = tuple(order)
        self.num_classes = len(order)
        self._check_fits_setting()
        self._maps: dict[int, dict[int, int]] = {}
        self._tables: dict[int, torch.Tensor] = {}

    def _check_fits_setting(self) -> None:
        if self.setting == "class":
            # A class met twice would need one output in two places of the growing head.
            owner: dict[int, int] = {}
            for exp in self.experiences:
                for c in exp.classes:
                    if c in owner:
                        raise ConfigError(
                            f"stream '{self.name}': class {c} appears in experiences {owner[c]} and {exp.index}; "
                            "Class-IL needs disjoint classes. Use setting 'domain' (one shared label space) or "
                            "'task' (a head per task) for streams that repeat classes."
                        )
                    owner[c] = exp.index
        if self.setting == "domain":
            sizes = {len(exp.classes) for exp in self.experiences}
            if len(sizes) > 1:
                raise ConfigError(
                    f"stream '{self.name}': Domain-IL shares one head, but the experiences hold "
                    f"{sorted(sizes)} classes; give every experience the same number of classes, or use 'task'/'class'."
                )

    # -- the sequence ------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.experiences)

    def __getitem__(self, index: int) -> Experience:
        return self.experiences[index]

    def __iter__(self) -> Iterator[Experience]:
        return iter(self.experiences)

    def __repr__(self) -> str:
        return (f"Stream(name={self.name!r}, setting={self.setting!r}, experiences={len(self)}, "
                f"num_classes={self.num_classes}, input_shape={self.input_shape})")

    def _experience(self, experience: Experience | int) -> Experience:
        index = experience.index if isinstance(experience, Experience) else experience
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < len(self):
            raise ConfigError(f"stream '{self.name}' has experiences 0..{len(self) - 1}; got {experience!r}.")
        found = self.experiences[int(index)]
        if isinstance(experience, Experience) and experience is not found:
            raise ConfigError(f"experience {index} ({experience.description or 'no description'}) belongs to another "
                              f"stream than '{self.name}'; pass this stream's experience or its index.")
        return found

    def classes_seen(self, upto: Experience | int) -> tuple[int, ...]:
        """Classes of experiences ``0..upto`` (inclusive), in the order the stream introduced them."""
        last = self._experience(upto).index
        seen = {c for exp in self.experiences[: last + 1] for c in exp.classes}
        return tuple(c for c in self.class_order if c in seen)

    # -- heads -------------------------------------------------------------------------------

    def head_name(self, experience: Experience | int) -> str:
        """Name of the head that ``experience`` trains: ``task{id}`` in Task-IL, else the one ``classifier``."""
        exp = self._experience(experience)
        return f"task{exp.task_id}" if self.setting == "task" else "classifier"

    def num_outputs(self, experience: Experience | int) -> int:
        """Outputs the head used at ``experience`` needs.

        Task-IL: the experience's own classes; Class-IL: every class seen up to and including
        it (the head grows); Domain-IL: the classes of one experience (the same for all).
        """
        return len(self.label_map(experience))

    def label_map(self, experience: Experience | int) -> dict[int, int]:
        """``{original class id: head output index}`` valid while training or testing ``experience``.

        Task-IL and Domain-IL: the position of the class in the experience's sorted classes.
        Class-IL: the position in ``class_order`` (so earlier classes keep their outputs as
        the head grows), for every class seen so far; replayed samples map the same way.
        """
        exp = self._experience(experience)
        if exp.index not in self._maps:
            classes = self.classes_seen(exp) if self.setting == "class" else exp.classes
            self._maps[exp.index] = {c: i for i, c in enumerate(classes)}
        return dict(self._maps[exp.index])

    def head_label(self, experience: Experience | int, label: int | torch.Tensor) -> int | torch.Tensor:
        """Map an original class id (an int, or a tensor of them) to its output index at ``experience``.

        A label the head has no output for (a class of another task in Task-IL, a class not
        seen yet in Class-IL) is a DataError naming it.
        """
        exp = self._experience(experience)
        mapping = self._maps.get(exp.index) or self.label_map(exp)
        if not isinstance(label, torch.Tensor):
            if isinstance(label, bool) or not isinstance(label, (int, np.integer)):
                raise DataError(f"a label must be an integer class id, got {label!r}.")
            if int(label) not in mapping:
                raise self._unmapped(exp, int(label))
            return mapping[int(label)]
        if label.is_floating_point() or label.is_complex():
            raise DataError(f"labels must be integer class ids, got a {label.dtype} tensor.")
        table = self._tables.get(exp.index)
        if table is None:
            table = torch.full((max(mapping) + 1,), -1, dtype=torch.int64)
            table[list(mapping)] = torch.tensor(list(mapping.values()))
            self._tables[exp.index] = table
        table = table.to(label.device)
        inside = (label >= 0) & (label < len(table))
        out = table[label.clamp(0, len(table) - 1)]
        bad = ~inside | (out < 0)
        if bad.any():
            raise self._unmapped(exp, int(label[bad].flatten()[0]))
        return out

    def _unmapped(self, exp: Experience, label: int) -> DataError:
        where = {
            "task": f"the head of task {exp.task_id} covers classes {exp.classes} only",
            "class": f"the classes seen up to experience {exp.index} are {self.classes_seen(exp)}",
            "domain": f"experience {exp.index} holds classes {exp.classes}",
        }[self.setting]
        return DataError(f"stream '{self.name}' ({self.setting}-IL): label {label} has no head output at "
                         f"experience {exp.index}: {where}. Map labels with the experience they came from.")


# -- input checks ----------------------------------------------------------------------------


def _as_images(images, what: str) -> torch.Tensor:
    """uint8 (0..255) or float ([0, 1]) images, ``(N, H, W)`` or ``(N, C, H, W)``, to float32 ``(N, C, H, W)``."""
    images = torch.as_tensor(images)
    if images.ndim == 3:
        images = images.unsqueeze(1)
    if images.ndim != 4 or images.shape[0] == 0:
        raise DataError(f"{what}: expected images of shape (N, H, W) or (N, C, H, W) with N > 0, "
                        f"got {tuple(images.shape)}.")
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    if not images.is_floating_point():
        raise DataError(f"{what}: images must be uint8 (0..255) or float in [0, 1], got {images.dtype}.")
    images = images.float()
    if not torch.isfinite(images).all():
        raise DataError(f"{what}: images hold NaN or infinite values.")
    low, high = float(images.min()), float(images.max())
    if low < 0.0 or high > 1.0:
        raise DataError(f"{what}: float images must lie in [0, 1], found values in [{low:.4g}, {high:.4g}]; "
                        "divide 0..255 images by 255 (or pass them as uint8).")
    return images


def _as_labels(labels, count: int, what: str) -> torch.Tensor:
    labels = torch.as_tensor(labels)
    if labels.ndim != 1 or len(labels) != count:
        raise DataError(f"{what}: expected {count} labels (one per image), got shape {tuple(labels.shape)}.")
    if labels.is_floating_point() or labels.dtype == torch.bool or int(labels.min()) < 0:
        raise DataError(f"{what}: labels must be non-negative integer class ids, got {labels.dtype} "
                        f"values from {labels.min().item()}.")
    return labels.to(torch.int64)


def _checked_splits(train_images, train_labels, test_images, test_labels):
    x_train = _as_images(train_images, "train split")
    x_test = _as_images(test_images, "test split")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(f"train images are {tuple(x_train.shape[1:])} but test images {tuple(x_test.shape[1:])}; "
                        "both splits must share one image shape.")
    return (x_train, _as_labels(train_labels, len(x_train), "train split"),
            x_test, _as_labels(test_labels, len(x_test), "test split"))


def _check_count(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}.")
    return int(value)


# -- generators ------------------------------------------------------------------------------


def _class_groups(present: list[int], classes_per_task, class_order) -> list[tuple[int, ...]]:
    """The groups of classes, one per experience, from a group size or an explicit list."""
    if isinstance(classes_per_task, (int, np.integer)) and not isinstance(classes_per_task, bool):
        size = _check_count(classes_per_task, "classes_per_task")
        if class_order is None:
            order = list(present)
        elif isinstance(class_order, (int, np.integer)) and not isinstance(class_order, bool):
            shuffled = torch.randperm(len(present), generator=torch.Generator().manual_seed(int(class_order)))
            order = [present[i] for i in shuffled.tolist()]
        else:
            try:
                order = [int(c) for c in class_order]
            except (TypeError, ValueError):
                raise ConfigError(f"class_order must be None, an int seed or a list of class ids, "
                                  f"got {class_order!r}.") from None
            if sorted(order) != present:
                raise ConfigError(f"class_order {tuple(order)} must list every class of the data exactly once: "
                                  f"{tuple(present)}.")
        if len(order) % size:
            raise ConfigError(f"{len(order)} classes do not split into groups of {size}; choose a divisor of "
                              f"{len(order)} for classes_per_task, or give the groups explicitly.")
        return [tuple(order[i : i + size]) for i in range(0, len(order), size)]
    if class_order is not None:
        raise ConfigError("class_order orders classes before grouping them by classes_per_task; with explicit "
                          "groups the groups already fix the order, so leave class_order out.")
    try:
        groups = [tuple(int(c) for c in group) for group in classes_per_task]
    except (TypeError, ValueError):
        raise ConfigError(f"classes_per_task must be a group size (e.g. 2) or a list of class groups "
                          f"(e.g. [[0, 1], [2, 3]]), got {classes_per_task!r}.") from None
    if not groups or any(not g for g in groups):
        raise ConfigError(f"class groups must be a non-empty list of non-empty groups, got {classes_per_task!r}.")
    owner: dict[int, int] = {}
    for t, group in enumerate(groups):
        for c in group:
            if c in owner:
                raise ConfigError(f"class {c} is in group {owner[c]} {groups[owner[c]]} and group {t} {group}; "
                                  "the groups of a split stream must not overlap.")
            owner[c] = t
    return groups


def split_stream(
    train_images, train_labels, test_images, test_labels,
    classes_per_task: int | Sequence[Sequence[int]] = 2,
    class_order: int | Sequence[int] | None = None,
    setting: str = "class",
    name: str = "split",
) -> Stream:
    """One experience per group of classes (Split-MNIST, Split-CIFAR).

    ``classes_per_task``: a group size (the classes, in ``class_order``, cut into equal
    groups) or explicit groups such as ``[[0, 1], [2, 3]]`` (which may leave classes out).
    ``class_order``: None (ascending), an int (a seed for a random order) or the classes in
    the order wanted. Every class of a group must occur in both splits. Settings: 'task',
    'class', or 'domain' (labels mapped to their index inside the group, the Domain-IL
    Split-MNIST of van de Ven & Tolias 2019; needs equal group sizes).
    """
    check_setting(setting)
    x_train, y_train, x_test, y_test = _checked_splits(train_images, train_labels, test_images, test_labels)
    present = sorted(set(y_train.tolist()))
    groups = _class_groups(present, classes_per_task, class_order)
    in_test = set(y_test.tolist())
    for t, group in enumerate(groups):
        for c in group:
            for split, classes in (("train", present), ("test", in_test)):
                if c not in classes:
                    raise DataError(f"class {c} (group {t}: {group}) has no images in the {split} split; the "
                                    f"split holds classes {sorted(classes)}. Remove it from the groups.")
    experiences = []
    for t, group in enumerate(groups):
        keep = torch.tensor(group)
        tr, te = torch.isin(y_train, keep), torch.isin(y_test, keep)
        experiences.append(Experience(
            t, t, LabelledImages(x_train[tr], y_train[tr]), LabelledImages(x_test[te], y_test[te]),
            tuple(sorted(group)), f"classes {tuple(sorted(group))}",
        ))
    return Stream(name, setting, experiences, x_train.shape[1:])


def _repeating_setting(setting: str, kind: str) -> str:
    check_setting(setting)
    if setting == "class":
        raise ConfigError(f"{kind} streams repeat the same classes in every task, so Class-IL does not apply; use "
                          "setting 'domain' (one shared head, the usual choice) or 'task' (a head per task).")
    return setting


def permuted_stream(
    train_images, train_labels, test_images, test_labels,
    num_tasks: int = 10, seed: int = 0, setting: str = "domain", name: str = "permuted",
) -> Stream:
    """One experience per fixed random pixel permutation (Permuted MNIST, Goodfellow et al. 2013).

    Rule: EVERY task, task 0 included, gets a random permutation of the ``H * W`` pixel
    grid (the same for all channels), drawn in task order from ``torch.Generator`` seeded
    with ``seed``; so the first k permutations do not depend on ``num_tasks``. Train and
    test of a task share one permutation. The images are stored once and permuted on
    access (``experience.train.permutation``).
    """
    _repeating_setting(setting, "permuted")
    num_tasks = _check_count(num_tasks, "num_tasks")
    x_train, y_train, x_test, y_test = _checked_splits(train_images, train_labels, test_images, test_labels)
    classes = tuple(sorted(set(y_train.tolist())))
    generator = torch.Generator().manual_seed(int(seed))
    pixels = x_train.shape[2] * x_train.shape[3]
    experiences = []
    for t in range(num_tasks):
        perm = torch.randperm(pixels, generator=generator)
        experiences.append(Experience(t, t, LabelledImages(x_train, y_train, perm),
                                      LabelledImages(x_test, y_test, perm), classes, f"permutation {t}"))
    return Stream(name, setting, experiences, x_train.shape[1:])


def rotate_images(images: torch.Tensor, angle: float) -> torch.Tensor:
    """``(N, C, H, W)`` images rotated ``angle`` degrees counter-clockwise about the centre (bilinear, zero fill).

    An angle of 0 returns the images themselves (a bilinear resample would blur them by float rounding).
    """
    if float(angle) == 0.0:
        return images
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.functional import rotate

    out = torch.empty_like(images)
    for start in range(0, len(images), _ROTATE_CHUNK):
        chunk = images[start : start + _ROTATE_CHUNK]
        out[start : start + _ROTATE_CHUNK] = rotate(chunk, float(angle), interpolation=InterpolationMode.BILINEAR)
    return out.clamp_(0.0, 1.0)  # bilinear weights are convex: only float rounding can leave [0, 1]


def rotated_stream(
    train_images, train_labels, test_images, test_labels,
    num_tasks: int | None = None, angles: Sequence[float] | None = None,
    setting: str = "domain", name: str = "rotated",
) -> Stream:
    """One experience per fixed rotation angle (Rotated MNIST, as in Lopez-Paz & Ranzato 2017).

    ``angles`` (degrees, counter-clockwise) default to ``num_tasks`` (default 10) angles evenly
    spaced over [0, 180): ``180 * t / num_tasks``, so task 0 is the unrotated data. Each task's
    images are rotated once, here, not on every access; train and test share the angle.
    """
    _repeating_setting(setting, "rotated")
    if angles is None:
        num_tasks = _check_count(10 if num_tasks is None else num_tasks, "num_tasks")
        angles = [180.0 * t / num_tasks for t in range(num_tasks)]
    else:
        try:
            angles = [float(a) for a in angles]
        except (TypeError, ValueError):
            raise ConfigError(f"angles must be a list of numbers (degrees), got {angles!r}.") from None
        if not angles or not all(np.isfinite(angles)):
            raise ConfigError(f"angles must be a non-empty list of finite numbers (degrees), got {angles!r}.")
        if num_tasks is not None and num_tasks != len(angles):
            raise ConfigError(f"num_tasks={num_tasks!r} but {len(angles)} angles were given; give one angle per "
                              "task, or leave num_tasks out.")
    x_train, y_train, x_test, y_test = _checked_splits(train_images, train_labels, test_images, test_labels)
    classes = tuple(sorted(set(y_train.tolist())))
    experiences = [
        Experience(t, t, LabelledImages(rotate_images(x_train, a), y_train),
                   LabelledImages(rotate_images(x_test, a), y_test), classes, f"rotated {a:g} deg")
        for t, a in enumerate(angles)
    ]
    return Stream(name, setting, experiences, x_train.shape[1:])


# -- CIFAR in torchvision's layout -----------------------------------------------------------


class _ArrayUnpickler(pickle.Unpickler):
    """An unpickler that rebuilds NumPy arrays and plain Python values, and nothing else.

    A pickle can run arbitrary code when loaded; a data folder is untrusted input, so only
    the few globals a CIFAR batch file refers to are allowed (NumPy's array and dtype
    rebuilders, in their NumPy 1 and 2 module names, and ``_codecs.encode`` for bytes).
    """

    ALLOWED = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): codecs.encode}
    # NumPy's own rebuild functions, taken from how it pickles, under both its 1.x and 2.x module names.
    for _core in ("core", "_core"):
        ALLOWED[(f"numpy.{_core}.multiarray", "_reconstruct")] = np.zeros(1).__reduce__()[0]
        ALLOWED[(f"numpy.{_core}.multiarray", "scalar")] = np.int64(0).__reduce__()[0]
        ALLOWED[(f"numpy.{_core}.numeric", "_frombuffer")] = np.zeros(1).__reduce_ex__(5)[0]
    del _core

    def find_class(self, module: str, name: str):
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"it refers to {module}.{name}, which a CIFAR batch file never holds"
            ) from None


CIFAR_CLASSES = {"cifar10": 10, "cifar100": 100}


def load_cifar(name: str, split: str, root: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10 or CIFAR-100 from torchvision's layout: uint8 ``(N, 3, 32, 32)`` images, int64 labels.

    The file names come from torchvision's ``CIFAR10`` / ``CIFAR100`` classes
    (``root/cifar-10-batches-py/{data_batch_1..5,test_batch}``, ``root/cifar-100-python/{train,test}``),
    but the pickles are read here: torchvision accepts only files with the official md5
    sums (so no small test fixture can pass) and unpickles them with the full pickle
    machinery, while this reader allows NumPy arrays and plain values only. CIFAR-100
    uses the fine labels.
    """
    if name not in CIFAR_CLASSES:
        raise ConfigError(f"unknown CIFAR variant {name!r}; use one of {tuple(CIFAR_CLASSES)}.")
    if split not in ("train", "test"):
        raise ConfigError(f"unknown split {split!r}; use 'train' or 'test'.")
    from torchvision.datasets import CIFAR10, CIFAR100

    spec = CIFAR10 if name == "cifar10" else CIFAR100
    folder = Path(root) / spec.base_folder
    files = [f for f, _ in (spec.train_list if split == "train" else spec.test_list)]
    layout = f"{Path(root) / spec.base_folder}/{{{','.join(f for f, _ in spec.train_list + spec.test_list)}}}"
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise DataError(
            f"{name.upper()} not found under '{root}': missing {', '.join(str(folder / f) for f in missing)}. "
            f"Expected torchvision's layout {layout} (the extracted {spec.filename}, as "
            f"torchvision.datasets.{spec.__name__}(root, download=True) leaves it)."
        )
    label_key = "labels" if name == "cifar10" else "fine_labels"
    images, labels = [], []
    for f in files:
        path = folder / f
        try:
            with open(path, "rb") as handle:
                entry = _ArrayUnpickler(handle, encoding="latin1").load()
        except Exception as e:  # a truncated or foreign file raises any of several pickle errors
            raise DataError(f"could not read '{path}' as a CIFAR batch ({e}); re-extract {spec.filename}.") from None
        data = entry.get("data") if isinstance(entry, dict) else None
        targets = entry.get(label_key) if isinstance(entry, dict) else None
        if (not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2
                or data.shape[1] != 3 * 32 * 32 or targets is None or len(targets) != len(data)):
            raise DataError(f"'{path}' is not a CIFAR batch: expected a dict with 'data' (uint8, N x 3072) and "
                            f"'{label_key}' (N labels); re-extract {spec.filename}.")
        images.append(torch.from_numpy(data.reshape(-1, 3, 32, 32)))  # rows are stored R, G, B planes
        labels.append(torch.as_tensor(np.asarray(targets, dtype=np.int64)))
    x, y = torch.cat(images), torch.cat(labels)
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= CIFAR_CLASSES[name]):
        raise DataError(f"labels under '{folder}' fall outside 0..{CIFAR_CLASSES[name] - 1}; "
                        f"re-extract {spec.filename}.")
    return x, y


# -- named streams ---------------------------------------------------------------------------


def build_stream(
    name: str,
    setting: str,
    seed: int = 0,
    root: str | Path | None = None,
    *,
    classes_per_task: int | Sequence[Sequence[int]] | None = None,
    class_order: int | Sequence[int] | None = None,
    num_tasks: int | None = None,
    angles: Sequence[float] | None = None,
) -> Stream:
    """A named stream (``STREAMS``) in ``setting``.

    - ``split_mnist``: 5 x 2 classes (0, 1), (2, 3), ...; ``permuted_mnist`` / ``rotated_mnist``:
      10 tasks of all ten digits. Embedded MNIST (4,000 train / 1,000 test) by default,
      torchvision's ``root/MNIST/raw`` with ``root``.
    - ``split_uci_digits``: 5 x 2 classes of scikit-learn's 8x8 digits at 28x28, one channel (embedded only).
    - ``split_cifar10`` (5 x 2) and ``split_cifar100`` (10 x 10, or 20 x 5 with
      ``classes_per_task=5``): torchvision's layout under ``root`` (required).

    ``seed`` draws the permutations of ``permuted_mnist``; ``class_order`` (split streams: an
    int seed or an explicit order), ``classes_per_task`` (split streams), ``num_tasks``
    (permuted/rotated) and ``angles`` (rotated) are passed to the generators.
    """
    if name not in STREAMS:
        raise ConfigError(f"unknown stream {name!r}; use one of {STREAMS}.")
    check_setting(setting)
    kind = name.split("_")[0]
    given = {"classes_per_task": classes_per_task, "class_order": class_order, "num_tasks": num_tasks, "angles": angles}
    applies = {"split": ("classes_per_task", "class_order"), "permuted": ("num_tasks",),
               "rotated": ("num_tasks", "angles")}[kind]
    for option, value in given.items():
        if value is not None and option not in applies:
            raise ConfigError(f"option {option}={value!r} does not apply to stream '{name}'; "
                              f"its options are {applies}.")
    source = name[len(kind) + 1:]
    if source == "uci_digits" and root is not None:
        raise ConfigError("split_uci_digits is embedded only (scikit-learn ships it); leave root out.")
    if source.startswith("cifar") and root is None:
        raise ConfigError(f"stream '{name}' has no embedded data: pass root, the folder that holds torchvision's "
                          f"{'cifar-10-batches-py' if source == 'cifar10' else 'cifar-100-python'}/.")
    splits = [_load_source(source, split, root) for split in ("train", "test")]
    data = (splits[0][0], splits[0][1], splits[1][0], splits[1][1])
    if kind == "split":
        default = 10 if source == "cifar100" else 2
        per_task = default if classes_per_task is None else classes_per_task
        return split_stream(*data, classes_per_task=per_task, class_order=class_order, setting=setting, name=name)
    if kind == "permuted":
        return permuted_stream(*data, num_tasks=10 if num_tasks is None else num_tasks, seed=seed,
                               setting=setting, name=name)
    return rotated_stream(*data, num_tasks=num_tasks, angles=angles, setting=setting, name=name)


def _load_source(source: str, split: str, root) -> tuple[torch.Tensor, torch.Tensor]:
    if source == "mnist":
        from mtl.data.mnist import load_mnist

        return load_mnist(split, root)  # embedded without root; torchvision's MNIST/raw with it
    if source == "uci_digits":
        from adapt.data.embedded import uci_digits_domain

        domain = uci_digits_domain(split, size=28, channels=1)
        return domain.images, domain.labels
    return load_cifar(source, split, root)
