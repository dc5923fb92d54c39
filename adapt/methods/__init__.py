"""Domain-adaptation methods: objectives over paired (source, target) batches.

``build_method(name, label_task, **options)`` and ``build_model(name, encoder,
num_classes)`` give a method and the ``MultiTaskModel`` it trains (a ``"label"`` head,
and a ``"domain"`` head for DANN).
"""

from __future__ import annotations

from mtl.errors import ConfigError
from mtl.heads import ClassificationHead
from mtl.model import MultiTaskModel

from .alignment import FeatureAlignment, coral, mmd
from .base import LABEL, AdaptationMethod
from .dann import DANN, DOMAIN, DomainClassifier
from .source_only import SourceOnly

METHODS = ("source_only", "target_only", "mmd", "coral", "dann")


def build_method(name: str, label_task, **options) -> AdaptationMethod:
    builders = {"source_only": SourceOnly, "target_only": SourceOnly, "mmd": mmd, "coral": coral, "dann": DANN}
    if name not in builders:
        raise ConfigError(f"unknown adaptation method '{name}'; choose one of: {', '.join(METHODS)}.")
    try:
        return builders[name](label_task, **options)
    except TypeError as e:
        raise ConfigError(f"bad options for adaptation method '{name}': {e}") from None


def build_model(name: str, encoder, num_classes: int, hidden: int | None = None,
                domain_hidden: int = 100) -> MultiTaskModel:
    """The model ``name`` trains: the encoder, a label head, and DANN's domain classifier."""
    heads = {LABEL: ClassificationHead(encoder.out_features, num_classes, hidden=hidden)}
    if name == "dann":
        heads[DOMAIN] = DomainClassifier(encoder.out_features, hidden=domain_hidden)
    return MultiTaskModel(encoder, heads)


__all__ = ["METHODS", "AdaptationMethod", "DANN", "DomainClassifier", "FeatureAlignment", "SourceOnly",
           "build_method", "build_model", "coral", "mmd"]
