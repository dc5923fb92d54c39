"""Cross-stitch networks (Misra, Shrivastava, Gupta and Hebert, CVPR 2016).

One column per task, each a copy of the same network cut into stages. After a stage,
a cross-stitch unit replaces every column's activation by a learned linear
combination of all columns' activations at that point::

    x'_t[c] = sum_s alpha[c, t, s] * x_s[c]

with one T x T matrix ``alpha`` per channel ``c`` ("channel-wise" units; with
``per_channel=False`` one matrix serves every channel). With ``alpha`` the identity
the columns are independent single-task networks; with all entries equal they are
one shared network.

The encoder is a per-task encoder (``per_task = True``): ``forward(x, tasks)``
returns ``{task: representation}``, and MultiTaskModel hands each head its own
column's output. Every column runs on every call, since the units need all of
them, but only the asked tasks are returned.

The units carry ``lr_scale`` (default ``DEFAULT_UNIT_LR_SCALE``), which
``MultiTaskModel.parameter_groups`` turns into a learning rate of their own.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from ..encoders import TORCHVISION_RESNETS, MultiLeNetEncoder, SmpEncoder, TorchvisionResNet, build_encoder
from ..errors import ConfigError

#: Misra et al. (2016), Sec. 4.1 and Table 3: the alphas live in [0, 1], one to two orders of
#: magnitude above the typical activations of the network, so the units are trained with the
#: network's learning rate scaled by 10^3 (the scale the paper settles on after comparing 1, 10,
#: 10^2 and 10^3). The paper used SGD; with Adam, whose step does not grow with the gradient's
#: size, a scale this large moves every alpha by about ``1000 * lr`` per step, so pass a smaller
#: ``unit_lr_scale`` there (for instance 10 to 100).
DEFAULT_UNIT_LR_SCALE = 1e3

#: Misra et al. (2016), Sec. 4.1 and Table 2: units initialised as convex combinations
#: (alpha_same, alpha_different); (0.9, 0.1) is the setting the paper keeps.
DEFAULT_SELF_WEIGHT = 0.9


class CrossStitchUnit(nn.Module):
    """Mixes the activations of ``num_tasks`` columns at one point of the network.

    ``alpha`` has shape ``(channels, T, T)`` (``(1, T, T)`` with ``per_channel=False``);
    ``alpha[c, t, s]`` is how much of column ``s``'s channel ``c`` goes into column ``t``.
    Initialised to ``self_weight`` on the diagonal and ``other_weight`` elsewhere, which
    defaults to ``(1 - self_weight) / (T - 1)`` so that each row sums to one.
    Activations have their channels on dimension 1: ``(B, C)`` vectors or ``(B, C, ...)`` maps.
    """

    def __init__(self, num_tasks: int, channels: int, self_weight: float = DEFAULT_SELF_WEIGHT,
                 other_weight: float | None = None, per_channel: bool = True,
                 lr_scale: float | None = DEFAULT_UNIT_LR_SCALE):
        super().__init__()
        if num_tasks < 2:
            raise ConfigError(f"a cross-stitch unit mixes at least 2 task columns, got {num_tasks}; "
                              "for one task use the plain encoder.")
        if channels < 1:
            raise ConfigError(f"a cross-stitch unit needs a positive channel count, got {channels}.")
        if other_weight is None:
            other_weight = (1.0 - self_weight) / (num_tasks - 1)
        self.num_tasks, self.channels, self.per_channel = num_tasks, channels, per_channel
        init = torch.full((num_tasks, num_tasks), float(other_weight))
        init.fill_diagonal_(float(self_weight))
        self.alpha = nn.Parameter(init.expand(channels if per_channel else 1, -1, -1).clone())
        if lr_scale is not None:
            self.lr_scale = float(lr_scale)

    def forward(self, activations: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(activations) != self.num_tasks:
            raise ConfigError(f"this cross-stitch unit mixes {self.num_tasks} columns, got {len(activations)}.")
        x = torch.stack(list(activations))  # (T, B, C, ...)
        if x.dim() < 3 or x.shape[2] != self.channels:
            raise ConfigError(
                f"this cross-stitch unit was built for {self.channels} channels (dimension 1 of the "
                f"activation) but got activations of shape {tuple(x.shape[1:])}; build the encoder with the "
                "channel counts the stages really produce (or let it probe them with input_shape=...)."
            )
        alpha = self.alpha.expand(self.channels, -1, -1) if not self.per_channel else self.alpha
        mixed = torch.einsum("cts,sbc...->tbc...", alpha.to(x.dtype), x)
        return list(mixed.unbind(0))

    def extra_repr(self) -> str:
        return f"num_tasks={self.num_tasks}, channels={self.channels}, per_channel={self.per_channel}"


class CrossStitchEncoder(nn.Module):
    """Task columns cut into stages, with cross-stitch units between stages.

    ``columns``: ``{task: [stage modules]}`` (each column a copy of the same network), or a
    factory ``() -> [stage modules]`` called once per task in ``tasks``.
    The units need each stage's channel count: give ``channels`` (one per unit) or
    ``input_shape`` (one sample's shape, e.g. ``(1, 28, 28)``) to probe it with a dummy
    forward pass in eval mode, which also checks that every column gives the same shapes.

    ``stitch_last``: put a unit after the last stage too (the paper stitches after its
    fully connected layers as well); ``same_init``: start every column from the first
    column's weights; ``stage_names``: names used in error messages; ``return_stages``:
    each column returns the list ``[input, output of stage 1, ..., output of stage N]``
    (after the units), the feature pyramid that dense decoders read, instead of its last
    output (``out_channels`` then lists the channels, as an smp encoder's does).
    """

    per_task = True

    def __init__(self, columns: dict[str, Sequence[nn.Module]] | Callable[[], Sequence[nn.Module]],
                 tasks: Iterable[str] | None = None, *, input_shape: Sequence[int] | None = None,
                 channels: Sequence[int] | None = None, self_weight: float = DEFAULT_SELF_WEIGHT,
                 other_weight: float | None = None, unit_lr_scale: float | None = DEFAULT_UNIT_LR_SCALE,
                 per_channel: bool = True, stitch_last: bool = True, same_init: bool = False,
                 stage_names: Sequence[str] | None = None, out_features: int | None = None,
                 return_stages: bool = False):
        super().__init__()
        self.return_stages = return_stages
        columns = _make_columns(columns, tasks)
        self.tasks = list(columns)
        depth = {t: len(stages) for t, stages in columns.items()}
        if len(set(depth.values())) != 1:
            raise ConfigError(f"cross-stitch columns need the same number of stages, got {depth}.")
        self.num_stages = next(iter(depth.values()))
        if self.num_stages == 0:
            raise ConfigError("cross-stitch columns need at least one stage.")
        self.stage_names = list(stage_names) if stage_names is not None else [str(i) for i in range(self.num_stages)]
        if len(self.stage_names) != self.num_stages:
            raise ConfigError(f"got {len(self.stage_names)} stage names for {self.num_stages} stages.")
        self.columns = nn.ModuleDict({t: nn.ModuleList(stages) for t, stages in columns.items()})
        _check_separate_columns(self.columns)
        if same_init:
            first = self.columns[self.tasks[0]].state_dict()
            for t in self.tasks[1:]:
                self.columns[t].load_state_dict(first)
        self.num_units = self.num_stages if stitch_last else self.num_stages - 1

        shapes = None
        if input_shape is not None:
            shapes = self._probe(tuple(input_shape))
            probed = [shape[1] if len(shape) > 1 else 0 for shape in shapes[: self.num_units]]
            if channels is not None and list(channels) != probed:
                raise ConfigError(f"channels={list(channels)} disagree with the probed stage channels {probed}.")
            channels = probed
        if channels is None:
            if self.num_units:
                raise ConfigError(
                    "CrossStitchEncoder needs the channel count after each stitched stage: pass "
                    "input_shape=(C, H, W) of one sample to probe them, or channels=[...] "
                    f"({self.num_units} values)."
                )
            channels = []
        channels = list(channels)
        if len(channels) != self.num_units:
            raise ConfigError(f"expected {self.num_units} channel counts (one per cross-stitch unit), got {channels}.")
        self.units = nn.ModuleList(
            CrossStitchUnit(len(self.tasks), c, self_weight=self_weight, other_weight=other_weight,
                            per_channel=per_channel, lr_scale=unit_lr_scale)
            for c in channels
        )
        if out_features is None and shapes is not None and len(shapes[-1]) == 2:
            out_features = shapes[-1][1]
        if out_features is not None and not return_stages:
            self.out_features = int(out_features)
        if return_stages and shapes is not None:
            self.out_channels = [int(input_shape[0]), *(shape[1] for shape in shapes)]

    def forward(self, x: torch.Tensor, tasks: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        tasks = self._check_tasks(tasks)
        activations = [x] * len(self.tasks)
        stages: list[list[torch.Tensor]] = [[x] for _ in self.tasks]  # per column, for return_stages
        for i in range(self.num_stages):
            activations = [self.columns[t][i](a) for t, a in zip(self.tasks, activations)]
            self._check_shapes(i, [a.shape for a in activations])
            if i < self.num_units:
                activations = self.units[i](activations)
            for column, a in zip(stages, activations):
                column.append(a)
        by_task = dict(zip(self.tasks, stages if self.return_stages else activations))
        return {t: by_task[t] for t in tasks}

    def alphas(self) -> list[torch.Tensor]:
        """Every unit's mixing matrices, detached: ``(channels, T, T)`` per unit."""
        return [unit.alpha.detach().clone() for unit in self.units]

    def column_parameters(self, task: str):
        return self.columns[task].parameters()

    def unit_parameters(self):
        return self.units.parameters()

    # ----- checks --------------------------------------------------------------------------
    def _check_tasks(self, tasks) -> list[str]:
        if tasks is None:
            return list(self.tasks)
        tasks = list(tasks)
        unknown = [t for t in tasks if t not in self.columns]
        if unknown:
            raise ConfigError(f"unknown task(s) {unknown}; this cross-stitch encoder has columns {self.tasks}.")
        return tasks

    def _check_shapes(self, stage: int, shapes: list[torch.Size]) -> None:
        if any(s != shapes[0] for s in shapes[1:]):
            listed = ", ".join(f"'{t}': {tuple(s)}" for t, s in zip(self.tasks, shapes))
            raise ConfigError(
                f"cross-stitch columns whose stage shapes differ: after stage {stage} "
                f"('{self.stage_names[stage]}') the columns give {listed}. Cross-stitch units mix "
                "activations element by element, so every column must be a copy of the same network."
            )

    @torch.no_grad()
    def _probe(self, input_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
        """Shapes after each stage for a batch of 2 dummy samples, checked across columns."""
        was_training = self.training
        self.eval()
        try:
            param = next(self.parameters(), None)
            device = param.device if param is not None else None
            x = torch.zeros((2, *input_shape), device=device)
            activations = [x] * len(self.tasks)
            shapes = []
            for i in range(self.num_stages):
                try:
                    activations = [self.columns[t][i](a) for t, a in zip(self.tasks, activations)]
                except ConfigError:
                    raise
                except RuntimeError as e:
                    raise ConfigError(
                        f"cross-stitch stage {i} ('{self.stage_names[i]}') failed on a probe input of shape "
                        f"{tuple(input_shape)}: {e}. Check input_shape and the stages."
                    ) from None
                self._check_shapes(i, [a.shape for a in activations])
                shapes.append(tuple(activations[0].shape))
        finally:
            self.train(was_training)
        return shapes


def _make_columns(columns, tasks) -> dict[str, list[nn.Module]]:
    if callable(columns) and not isinstance(columns, (dict, nn.Module)):
        if tasks is None:
            raise ConfigError("building cross-stitch columns from a factory needs tasks=[...].")
        built = {t: list(columns()) for t in tasks}
    elif isinstance(columns, (dict, nn.ModuleDict)):
        built = {t: list(stages) for t, stages in columns.items()}
        if tasks is not None and list(tasks) != list(built):
            raise ConfigError(f"tasks {list(tasks)} differ from the column names {list(built)}.")
    else:
        raise ConfigError(
            f"columns must be {{task: [stage modules]}} or a factory returning a list of stages, "
            f"got {type(columns).__name__}."
        )
    if len(built) < 2:
        raise ConfigError(f"cross-stitch networks need at least 2 tasks, got {list(built)}; "
                          "for one task use the plain encoder.")
    for t, stages in built.items():
        if not isinstance(t, str) or not t or "." in t:
            raise ConfigError(f"task names must be non-empty strings without '.', got {t!r}.")
        bad = [type(s).__name__ for s in stages if not isinstance(s, nn.Module)]
        if bad:
            raise ConfigError(f"column '{t}' has stages that are not nn.Modules: {bad}.")
    return built


def _check_separate_columns(columns: nn.ModuleDict) -> None:
    owner: dict[int, str] = {}
    for t, column in columns.items():
        for p in column.parameters():
            if id(p) in owner and owner[id(p)] != t:
                raise ConfigError(
                    f"columns '{owner[id(p)]}' and '{t}' share parameters; each task needs its own copy of "
                    "the network (make the factory build new modules on every call, or copy.deepcopy them)."
                )
            owner[id(p)] = t


# ----- stages of the library's encoders ---------------------------------------------------
class _InputSizeCheck(nn.Module):
    """Raises the same error as MultiLeNetEncoder for inputs that are not 28x28."""

    def __init__(self, size: tuple[int, int]):
        super().__init__()
        self.size = tuple(size)

    def forward(self, x):
        if tuple(x.shape[-2:]) != self.size:
            raise ConfigError(
                f"multilenet expects {self.size[0]}x{self.size[1]} inputs, got {tuple(x.shape[-2:])}. "
                "Resize the images or pick a resolution-agnostic encoder such as resnet18."
            )
        return x


def encoder_stages(encoder: nn.Module) -> tuple[list[nn.Module], list[str]]:
    """Cut one of the library's encoders into stages (reusing its modules): (stages, names).

    - ``MultiLeNetEncoder``: conv1 block (conv, 2x2 max-pool, ReLU), conv2 block (conv,
      dropout, max-pool, ReLU), fc (flatten, linear, ReLU); the stages in sequence
      compute exactly what the encoder computes.
    - ``TorchvisionResNet``: stem (conv1, bn1, relu, maxpool), layer1 .. layer4, pool
      (global average pool, flatten).
    - ``SmpEncoder`` of the ResNet family (depth 5, not pooled): stem (conv1, bn1, relu),
      layer1 (max-pool, layer1), layer2 .. layer4 — the stages whose outputs are the
      encoder's feature maps, dilated as the encoder was built.
    """
    if isinstance(encoder, MultiLeNetEncoder):
        conv1 = nn.Sequential(OrderedDict(check=_InputSizeCheck((28, 28)), conv=encoder.conv1,
                                          pool=nn.MaxPool2d(2), relu=nn.ReLU()))
        conv2 = nn.Sequential(OrderedDict(conv=encoder.conv2, drop=encoder.conv2_drop,
                                          pool=nn.MaxPool2d(2), relu=nn.ReLU()))
        fc = nn.Sequential(OrderedDict(flatten=nn.Flatten(), fc=encoder.fc, relu=nn.ReLU()))
        return [conv1, conv2, fc], ["conv1", "conv2", "fc"]
    if isinstance(encoder, TorchvisionResNet):
        net = encoder.net
        stem = nn.Sequential(OrderedDict(conv1=net.conv1, bn1=net.bn1, relu=net.relu, maxpool=net.maxpool))
        pool = nn.Sequential(OrderedDict(avgpool=net.avgpool, flatten=nn.Flatten()))
        stages = [stem, net.layer1, net.layer2, net.layer3, net.layer4, pool]
        return stages, ["stem", "layer1", "layer2", "layer3", "layer4", "pool"]
    if isinstance(encoder, SmpEncoder) and _is_smp_resnet(encoder):
        net = encoder.encoder
        stem = nn.Sequential(OrderedDict(conv1=net.conv1, bn1=net.bn1, relu=net.relu))
        layer1 = nn.Sequential(OrderedDict(maxpool=net.maxpool, layer1=net.layer1))
        return [stem, layer1, net.layer2, net.layer3, net.layer4], ["stem", "layer1", "layer2", "layer3", "layer4"]
    raise ConfigError(
        f"cannot cut a {type(encoder).__name__} into cross-stitch stages; supported: multilenet, "
        f"{', '.join(TORCHVISION_RESNETS)} and the ResNet family of segmentation-models-pytorch encoders "
        "(smp:resnet18 .. smp:resnet152, smp:resnext50_32x4d, ...). For other networks build "
        "CrossStitchEncoder from {task: [stage modules]} yourself."
    )


def _is_smp_resnet(encoder: SmpEncoder) -> bool:
    from segmentation_models_pytorch.encoders.resnet import ResNetEncoder

    return isinstance(encoder.encoder, ResNetEncoder) and len(encoder.out_channels) == 6 and not encoder.pooled


def build_cross_stitch_encoder(name: str, tasks: Iterable[str], in_channels: int | None = None,
                               pretrained: bool = False, same_init: bool = True,
                               probe_size: int | None = None, output_stride: int | None = None,
                               **options) -> CrossStitchEncoder:
    """A cross-stitch encoder with one column of encoder ``name`` per task.

    ``name``: ``multilenet`` (stages conv1, conv2, fc), a torchvision ResNet
    (``resnet18``/``34``/``50``: stem, layer1..layer4, pool), or an smp ResNet-family
    encoder (``smp:resnet50``...: stem, layer1..layer4, at ``output_stride``), whose
    columns return the feature pyramid for dense decoders. Each column returns what the
    plain encoder returns (``out_features`` or ``out_channels`` are the same), so heads are
    sized as usual. ``same_init``: every column starts from the same weights, as the
    paper's columns all start from one pretrained network. Other ``options`` go to
    ``CrossStitchEncoder`` (``self_weight``, ``other_weight``, ``unit_lr_scale``,
    ``per_channel``, ``stitch_last``).
    """
    tasks = list(tasks)
    dense = name.startswith("smp:")
    if name != "multilenet" and name not in TORCHVISION_RESNETS and not dense:
        raise ConfigError(
            f"build_cross_stitch_encoder knows 'multilenet', {', '.join(TORCHVISION_RESNETS)} and smp:<ResNet-family "
            f"encoder>, got '{name}'. For other networks build CrossStitchEncoder from {{task: [stage modules]}} "
            "yourself."
        )
    if output_stride is not None and not dense:
        raise ConfigError(f"output_stride is an option of smp encoders, not of '{name}'.")
    if len(tasks) < 2:
        raise ConfigError(f"cross-stitch networks need at least 2 tasks, got {tasks}.")
    encoder_options = {"output_stride": output_stride} if output_stride is not None else {}

    def build():
        return build_encoder(name, in_channels=in_channels, pretrained=pretrained, **encoder_options)

    base = build()
    channels_in = _input_channels(base)
    side = probe_size or (28 if name == "multilenet" else 64)
    columns = {}
    for i, t in enumerate(tasks):
        encoder = base if i == 0 else (copy.deepcopy(base) if same_init else build())
        columns[t], names = encoder_stages(encoder)
    built = CrossStitchEncoder(columns, input_shape=(channels_in, side, side), stage_names=names,
                               out_features=None if dense else base.out_features, return_stages=dense, **options)
    if dense:
        built.output_stride = base.output_stride
    return built


def _input_channels(encoder: nn.Module) -> int:
    if isinstance(encoder, MultiLeNetEncoder):
        return encoder.conv1.in_channels
    if isinstance(encoder, SmpEncoder):
        return encoder.out_channels[0]
    return encoder.net.conv1.in_channels
