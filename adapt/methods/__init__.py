"""Domain-adaptation methods: objectives over paired (source, target) batches.

``build_method(name, label_task, **options)`` and ``build_model(name, encoder,
num_classes)`` give a method and the ``MultiTaskModel`` it trains (a ``"label"`` head,
and a ``"domain"`` head for DANN). ADDA starts from a trained source model instead:
``build_adda(stage1_model)`` gives its stage-2 model and objective, and CyCADA's
pixel stage ``cycada_pixel(label_task, source_classifier, source, target)`` trains the
image translators whose ``translate``d source feeds ADDA.
"""

from __future__ import annotations

from mtl.errors import ConfigError
from mtl.heads import ClassificationHead
from mtl.model import MultiTaskModel

from .adda import ADDA, Discriminator, build_adda
from .alignment import FeatureAlignment, coral, mmd
from .cycada import CycadaPixel, cycada_pixel, translate
from .base import LABEL, AdaptationMethod
from .dann import DANN, DOMAIN, DomainClassifier
from .dsn import DSN, DigitDecoder, dsn_mmd
from .rtn import PAPER_WEIGHTS as RTN_WEIGHTS
from .rtn import RTN
from .source_only import SourceOnly

METHODS = ("source_only", "target_only", "mmd", "coral", "dann", "dsn", "dsn_mmd", "rtn")
#: methods whose learning rate follows DANN's annealing unless told otherwise
ANNEALED = ("dann", "rtn")
#: the weights each method's paper gives its losses (others: 1 for the label loss, --align-weight for the rest)
#: DSN: the similarity weight is the authors' DANN-baseline gamma (0.25); the paper's alpha and beta for
#: digits are not restated here, so reconstruction and difference get weights that put each term at the
#: scale of the label loss at the start (the difference loss grows with the batch size squared).
DSN_WEIGHTS = {"classification": 1.0, "reconstruction": 1.0, "difference": 0.01, "similarity": 0.25}
PAPER_LOSS_WEIGHTS = {"rtn": RTN_WEIGHTS, "dsn": DSN_WEIGHTS, "dsn_mmd": DSN_WEIGHTS}


def build_method(name: str, label_task, num_classes: int = 10, encoder=None, image_shape=None,
                 **options) -> AdaptationMethod:
    """Method ``name``; ``encoder`` and ``image_shape`` are what DSN's private encoders and decoder copy."""

    def dsn(kind):
        def build(task, **o):
            if encoder is None or image_shape is None:
                raise ConfigError(f"{name} needs the model's encoder and the image shape: "
                                  "build_method(..., encoder=model_encoder, image_shape=(C, S, S)).")
            return kind(task, private_encoder=encoder, image_shape=image_shape, **o)
        return build

    builders = {"source_only": SourceOnly, "target_only": SourceOnly, "mmd": mmd, "coral": coral, "dann": DANN,
                "dsn": dsn(DSN), "dsn_mmd": dsn(dsn_mmd), "rtn": lambda task, **o: RTN(task, num_classes, **o)}
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


__all__ = ["ADDA", "ANNEALED", "METHODS", "PAPER_LOSS_WEIGHTS", "AdaptationMethod", "DANN", "Discriminator",
           "build_adda", "CycadaPixel", "cycada_pixel", "translate", "DSN", "DigitDecoder",
           "DomainClassifier", "FeatureAlignment", "RTN", "SourceOnly", "build_method", "build_model", "coral",
           "dsn_mmd", "mmd"]
