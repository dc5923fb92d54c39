"""``build_domain``: one entry point for every digit domain, by name.

Embedded domains (mnist, uci_digits, mnist_m_style) need no files; mnist reads the real
MNIST when given ``root``. The others (usps, svhn, mnist_m) exist only on disk and need
``root``. ``root`` is ignored, with a log line, by the embedded-only domains, so one
``--data-root`` can serve a source and a target of different kinds.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from mtl.errors import ConfigError, DataError

from . import mnist_m, svhn, usps
from .domain import DigitDomain
from .embedded import mnist_domain, uci_digits_domain
from .mnist_m_style import mnist_m_style_domain

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DomainSpec:
    build: Callable[..., DigitDomain]
    root: str  # "none": embedded only; "optional": embedded, or real data under root; "required": on disk only
    layout: str | None = None


DOMAINS: dict[str, DomainSpec] = {
    "mnist": DomainSpec(mnist_domain, "optional", "root/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte"),
    "uci_digits": DomainSpec(uci_digits_domain, "none"),
    "mnist_m_style": DomainSpec(mnist_m_style_domain, "none"),
    "usps": DomainSpec(usps.usps_domain, "required", usps.LAYOUT),
    "svhn": DomainSpec(svhn.svhn_domain, "required", svhn.LAYOUT),
    "mnist_m": DomainSpec(mnist_m.mnist_m_domain, "required", mnist_m.LAYOUT),
}
_COMMON = ("split", "root", "size", "channels")


def build_domain(
    name: str, split: str = "train", root: str | Path | None = None, size: int = 28, channels: int | None = None,
    **options,
) -> DigitDomain:
    """The domain ``name`` (see ``DOMAINS``) for ``split`` ("train" or "test") in the common format.

    ``size``: image side (28; 32 is usual with SVHN). ``channels``: 1 or 3, or None for the
    domain's own (1 for mnist, uci_digits, usps; 3 for svhn, mnist_m, mnist_m_style).
    ``options`` go to the domain's loader: ``seed`` (mnist_m_style), ``verify_md5`` (usps, svhn).
    """
    key = str(name).lower().replace("-", "_")
    if key not in DOMAINS:
        raise ConfigError(f"unknown domain {name!r}; known domains: {', '.join(DOMAINS)}.")
    spec = DOMAINS[key]
    accepted = [p for p in inspect.signature(spec.build).parameters if p not in _COMMON]
    unknown = [o for o in options if o not in accepted]
    if unknown:
        raise ConfigError(
            f"domain '{key}' takes no option {', '.join(map(repr, unknown))}; "
            f"its options: {', '.join(accepted) or 'none besides split, root, size and channels'}."
        )
    kwargs = dict(split=split, size=size, channels=channels, **options)
    if spec.root == "required":
        if root is None:
            raise DataError(
                f"domain '{key}' has no embedded copy: download it and pass its folder with --data-root "
                f"(root=...), laid out as {spec.layout}."
            )
        return spec.build(root, **kwargs)
    if spec.root == "optional":
        return spec.build(root=root, **kwargs)
    if root is not None:
        logger.info("domain '%s' is built from embedded data; the data root '%s' is not used for it", key, root)
    return spec.build(**kwargs)
