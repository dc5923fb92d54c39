"""Model patches (Mudrakarta, Sandler, Zhmoginov and Howard, "K for the Price of 1:
Parameter-efficient Multi-task and Transfer Learning", ICLR 2019).

One network is shared by every task; each task owns a small "patch" of layers:

- ``"scale_bias"``: the batch-normalisation layers, i.e. the per-channel scales and
  biases and, as in the paper, the batch statistics (running mean and variance), so
  every task normalises with the statistics of its own data;
- ``"depthwise"``: the depthwise convolutions (``nn.Conv2d`` with
  ``groups == in_channels == out_channels``), the spatial filters of MobileNet-style
  networks, a small fraction of their parameters;
- ``"both"``: the two together.

Each patched layer of the shared network is replaced in place by a ``PerTaskLayer``
that holds one copy of the layer per task (an ``nn.ModuleDict``) and runs the copy of
the active task. ``PatchedEncoder.forward(x, tasks)`` runs the shared network once per
asked task with that task's patch active and returns ``{task: representation}``.

Multi-task mode trains the shared weights and every patch together. Transfer mode
(``freeze_shared()`` or ``transfer=True``) freezes the shared weights, and the running
statistics of shared BatchNorm layers (they stay in eval mode), so only patches and the
heads, which live in MultiTaskModel, learn; ``add_task`` adds a patch for a new task.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..encoders import build_encoder
from ..errors import ConfigError

PATCH_TYPES = ("scale_bias", "depthwise", "both")

_NEEDS = {
    "scale_bias": "BatchNorm layers (nn.BatchNorm1d/2d/3d) for scale-and-bias patches",
    "depthwise": "depthwise convolutions (nn.Conv2d with groups == in_channels == out_channels, as in "
                 "MobileNet; e.g. build_patched_encoder('mobilenet_v2', ...)) for depthwise patches",
}


def is_depthwise_conv(module: nn.Module) -> bool:
    return (isinstance(module, nn.Conv2d) and module.groups == module.in_channels == module.out_channels)


def _patchable(module: nn.Module, kinds: tuple[str, ...]) -> bool:
    return (("scale_bias" in kinds and isinstance(module, _BatchNorm))
            or ("depthwise" in kinds and is_depthwise_conv(module)))


def _check_task_name(name) -> None:
    if not isinstance(name, str) or not name or "." in name:
        raise ConfigError(f"task names must be non-empty strings without '.', got {name!r}.")


def _describe(net: nn.Module) -> str:
    """The network's class, and the class it wraps (e.g. 'TorchvisionResNet (wrapping ResNet)')."""
    for attr in ("net", "encoder", "features", "model"):
        inner = getattr(net, attr, None)
        if isinstance(inner, nn.Module) and type(inner) is not type(net):
            return f"{type(net).__name__} (wrapping {type(inner).__name__})"
    return type(net).__name__


class PerTaskLayer(nn.Module):
    """One copy of a layer per task; ``forward`` runs the copy of ``active``.

    The copies start as deep copies of ``layer`` (weights, and buffers such as running
    statistics), so every task starts from the shared network's values.
    """

    def __init__(self, layer: nn.Module, tasks: Iterable[str], kind: str):
        super().__init__()
        self.kind = kind
        self.patches = nn.ModuleDict({t: copy.deepcopy(layer) for t in tasks})
        self.active: str | None = None

    def forward(self, x):
        if self.active is None:
            raise ConfigError("no task is active in this patched layer; call PatchedEncoder(x, tasks) "
                              "or use encoder.use_task(task) around a direct call of the base network.")
        return self.patches[self.active](x)

    def add_task(self, task: str, init_from: str | None = None) -> None:
        source = self.patches[init_from] if init_from is not None else next(iter(self.patches.values()))
        new = copy.deepcopy(source)
        if init_from is None:
            new.reset_parameters()  # BatchNorm: scale 1, bias 0, fresh statistics; conv: random init
        for p in new.parameters():
            p.requires_grad_(True)
        self.patches[task] = new

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, tasks={list(self.patches)}"


class PatchedEncoder(nn.Module):
    """A shared network with per-task model patches (see the module docstring).

    ``base`` is patched in place: each BatchNorm layer (``"scale_bias"``), depthwise
    convolution (``"depthwise"``) or both (``"both"``) is replaced by a ``PerTaskLayer``.
    Raises ConfigError when ``base`` has none of the layers a patch type needs.
    ``transfer=True`` starts in transfer mode (see ``freeze_shared``).
    """

    per_task = True

    def __init__(self, base: nn.Module, tasks: Iterable[str], patch: str = "scale_bias", transfer: bool = False):
        super().__init__()
        if patch not in PATCH_TYPES:
            raise ConfigError(f"unknown patch type '{patch}'; choose one of {', '.join(PATCH_TYPES)}.")
        tasks = list(tasks)
        if not tasks:
            raise ConfigError("PatchedEncoder needs at least one task name.")
        if len(set(tasks)) != len(tasks):
            raise ConfigError(f"task names must be unique, got {tasks}.")
        for t in tasks:
            _check_task_name(t)
        if any(isinstance(m, PerTaskLayer) for m in base.modules()):
            raise ConfigError("this network is already patched; build a new base network for a new PatchedEncoder.")
        self.patch = patch
        self.kinds = ("scale_bias", "depthwise") if patch == "both" else (patch,)
        targets = [(name, m) for name, m in base.named_modules() if name and _patchable(m, self.kinds)]
        for kind in self.kinds:
            if not any(_patchable(m, (kind,)) for _, m in targets):
                raise ConfigError(
                    f"patch type '{kind}' needs {_NEEDS[kind]}, but {_describe(base)} has none. "
                    f"Choose another patch type ({', '.join(PATCH_TYPES)}) or a network with such layers."
                )
        for name, module in targets:
            kind = "scale_bias" if isinstance(module, _BatchNorm) else "depthwise"
            parent_name, _, child = name.rpartition(".")
            parent = base.get_submodule(parent_name) if parent_name else base
            setattr(parent, child, PerTaskLayer(module, tasks, kind))
        self.base = base
        self._layers = [m for m in base.modules() if isinstance(m, PerTaskLayer)]
        self._tasks = tasks
        self.frozen = False
        for attr in ("out_features", "out_channels", "output_stride"):
            if hasattr(base, attr):
                setattr(self, attr, getattr(base, attr))
        if transfer:
            self.freeze_shared()

    # ----- tasks and the forward pass --------------------------------------------------------
    @property
    def tasks(self) -> list[str]:
        return list(self._tasks)

    def patched_layers(self) -> list[PerTaskLayer]:
        return list(self._layers)

    def set_active(self, task: str | None) -> None:
        if task is not None and task not in self._tasks:
            raise ConfigError(f"unknown task '{task}'; this patched encoder has patches for {self._tasks}.")
        for layer in self.patched_layers():
            layer.active = task

    @contextmanager
    def use_task(self, task: str):
        """Run the base network with ``task``'s patch inside the ``with`` block."""
        previous = self._layers[0].active
        self.set_active(task)
        try:
            yield self.base
        finally:
            self.set_active(previous)

    def forward(self, x: torch.Tensor, tasks: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        tasks = self._check_tasks(tasks)
        out = {}
        for t in tasks:
            with self.use_task(t):
                out[t] = self.base(x)
        return out

    def add_task(self, name: str, init_from: str | None = None) -> None:
        """Add a patch for task ``name``: a copy of ``init_from``'s patch, or freshly initialised
        layers (BatchNorm scale 1, bias 0, statistics reset; depthwise filters at random) when None.
        The new patch is trainable even in transfer mode. Build the optimizer after adding tasks.
        """
        _check_task_name(name)
        if name in self._tasks:
            raise ConfigError(f"task '{name}' already has a patch; choose a new task name.")
        if init_from is not None and init_from not in self._tasks:
            raise ConfigError(f"init_from='{init_from}' is not a task of this encoder ({self._tasks}).")
        for layer in self.patched_layers():
            layer.add_task(name, init_from)
            layer.patches[name].train(self.training)
        self._tasks.append(name)
        if self.frozen:
            self._freeze_shared_batchnorm()

    # ----- transfer mode ---------------------------------------------------------------------
    def freeze_shared(self, keep_tasks: Iterable[str] | None = None) -> None:
        """Transfer mode: shared weights stop learning (``requires_grad=False``) and shared
        BatchNorm layers keep their running statistics (they stay in eval mode). Patches stay
        trainable, only those of ``keep_tasks`` when it is given.
        """
        keep = set(self._tasks if keep_tasks is None else keep_tasks)
        unknown = keep - set(self._tasks)
        if unknown:
            raise ConfigError(f"unknown task(s) {sorted(unknown)} in keep_tasks; tasks are {self._tasks}.")
        for p in self.shared_parameters():
            p.requires_grad_(False)
        for t in self._tasks:
            for p in self.task_parameters(t):
                p.requires_grad_(t in keep)
        self.frozen = True
        self._freeze_shared_batchnorm()

    def unfreeze(self) -> None:
        """Back to multi-task mode: every parameter trainable, shared BatchNorm in train mode again."""
        for p in self.parameters():
            p.requires_grad_(True)
        self.frozen = False
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        if getattr(self, "frozen", False):
            self._freeze_shared_batchnorm()
        return self

    def _freeze_shared_batchnorm(self) -> None:
        for m in self._shared_modules():
            if isinstance(m, _BatchNorm):
                m.eval()

    # ----- parameters ------------------------------------------------------------------------
    def _shared_modules(self) -> list[nn.Module]:
        inside = {id(m) for layer in self.patched_layers() for m in layer.modules()}
        return [m for m in self.base.modules() if id(m) not in inside]

    def shared_parameters(self) -> list[nn.Parameter]:
        """Parameters used by every task (the network outside the patches)."""
        private = {id(p) for layer in self.patched_layers() for p in layer.parameters()}
        return [p for p in self.parameters() if id(p) not in private]

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        """The parameters of ``task``'s patch."""
        if task not in self._tasks:
            raise ConfigError(f"unknown task '{task}'; tasks are {self._tasks}.")
        return [p for layer in self.patched_layers() for p in layer.patches[task].parameters()]

    def shared_parameter_count(self) -> int:
        return sum(p.numel() for p in self.shared_parameters())

    def trainable_parameters_per_task(self) -> dict[str, int]:
        """``{task: number of parameters private to that task's patch}`` (scalars, not tensors;
        running statistics are buffers and are not counted)."""
        return {t: sum(p.numel() for p in self.task_parameters(t)) for t in self._tasks}

    def _check_tasks(self, tasks) -> list[str]:
        if tasks is None:
            return self.tasks
        tasks = list(tasks)
        unknown = [t for t in tasks if t not in self._tasks]
        if unknown:
            raise ConfigError(f"unknown task(s) {unknown}; this patched encoder has patches for {self._tasks}.")
        return tasks


def parameter_report(model: nn.Module) -> dict:
    """Parameter counts of a MultiTaskModel, per task and shared.

    ``{"shared": n, "tasks": {task: {"patch": n, "head": n, "total": patch + head}},
    "total": all parameters, "separate_models": parameters of one full model per task,
    "ratio": total / separate_models}``. For an encoder without patches every encoder
    parameter is shared and patches count 0.
    """
    encoder, heads = getattr(model, "encoder", None), getattr(model, "heads", None)
    if encoder is None or heads is None:
        raise ConfigError(f"parameter_report needs a MultiTaskModel (encoder + heads), got {type(model).__name__}.")
    if isinstance(encoder, PatchedEncoder):
        shared = encoder.shared_parameter_count()
        patches = encoder.trainable_parameters_per_task()
    else:
        shared = sum(p.numel() for p in encoder.parameters())
        patches = {}
    tasks = {}
    for t, head in heads.items():
        patch, head_n = patches.get(t, 0), sum(p.numel() for p in head.parameters())
        tasks[t] = {"patch": patch, "head": head_n, "total": patch + head_n}
    total = sum(p.numel() for p in model.parameters())
    separate = sum(shared + v["total"] for v in tasks.values())
    return {"shared": shared, "tasks": tasks, "total": total, "separate_models": separate,
            "ratio": total / separate if separate else float("nan")}


class _PooledFeatures(nn.Module):
    """A feature extractor followed by global average pooling: image -> vector."""

    def __init__(self, features: nn.Module, out_features: int):
        super().__init__()
        self.features = features
        self.out_features = out_features

    def forward(self, x):
        return torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1)


def mobilenet_v2_encoder(in_channels: int = 3, pretrained: bool = False, **options) -> nn.Module:
    """torchvision MobileNetV2's ``features`` with global pooling: image -> ``last_channel`` vector
    (1280 at width 1.0). Random weights unless ``pretrained``; ``options`` such as ``width_mult``."""
    import torchvision

    if pretrained and options:
        raise ConfigError(f"pretrained MobileNetV2 weights exist only for the default network; drop {options}.")
    net = torchvision.models.mobilenet_v2(weights="DEFAULT" if pretrained else None, **options)
    if in_channels != 3:
        old = net.features[0][0]
        net.features[0][0] = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride,
                                       old.padding, bias=False)
    return _PooledFeatures(net.features, net.last_channel)


def build_patched_encoder(name: str, tasks: Iterable[str], patch: str = "both", in_channels: int | None = None,
                          pretrained: bool = False, transfer: bool = False, **options) -> PatchedEncoder:
    """A ``PatchedEncoder`` on a named network, returning a pooled vector with ``out_features``.

    ``mobilenet_v2``: torchvision's, which has both BatchNorm layers and depthwise convs (any
    patch type); ``resnet18/34/50``: scale-and-bias only; ``smp:<name>``: a pooled
    segmentation-models-pytorch encoder (e.g. ``smp:mobilenet_v2``, ``smp:efficientnet-b0``),
    or with ``pooled=False`` its feature pyramid for dense decoders (``out_channels`` and
    ``output_stride`` as the plain encoder's).
    """
    if name == "mobilenet_v2":
        base = mobilenet_v2_encoder(in_channels=3 if in_channels is None else in_channels,
                                    pretrained=pretrained, **options)
    else:
        if name.startswith("smp:"):
            options.setdefault("pooled", True)
        base = build_encoder(name, in_channels=in_channels, pretrained=pretrained, **options)
    return PatchedEncoder(base, tasks, patch=patch, transfer=transfer)
