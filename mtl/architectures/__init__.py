"""Multi-task architectures beyond one shared encoder: cross-stitch columns and model patches.

Both are per-task encoders (``per_task = True``): ``encoder(x, tasks)`` returns
``{task: representation}`` and ``MultiTaskModel`` feeds each head its own entry.
"""

from .cross_stitch import (
    DEFAULT_SELF_WEIGHT,
    DEFAULT_UNIT_LR_SCALE,
    CrossStitchEncoder,
    CrossStitchUnit,
    build_cross_stitch_encoder,
    encoder_stages,
)
from .patches import (
    PATCH_TYPES,
    PatchedEncoder,
    PerTaskLayer,
    build_patched_encoder,
    is_depthwise_conv,
    mobilenet_v2_encoder,
    parameter_report,
)

__all__ = [
    "DEFAULT_SELF_WEIGHT",
    "DEFAULT_UNIT_LR_SCALE",
    "CrossStitchEncoder",
    "CrossStitchUnit",
    "build_cross_stitch_encoder",
    "encoder_stages",
    "PATCH_TYPES",
    "PatchedEncoder",
    "PerTaskLayer",
    "build_patched_encoder",
    "is_depthwise_conv",
    "mobilenet_v2_encoder",
    "parameter_report",
]
