"""Loss-balancing methods, built by name: ``build_weighting("uncertainty", tasks)``."""

from __future__ import annotations

from typing import Iterable

from ..errors import ConfigError
from .base import LinearWeighting, Weighting
from .equal import EqualWeighting
from .gradnorm import GradNormWeighting
from .mgda import MGDAUBWeighting, MGDAWeighting
from .static import StaticWeighting
from .uncertainty import UncertaintyWeighting

WEIGHTINGS: dict[str, type[Weighting]] = {
    "equal": EqualWeighting,
    "static": StaticWeighting,
    "uncertainty": UncertaintyWeighting,
    "gradnorm": GradNormWeighting,
    "mgda": MGDAWeighting,
    "mgda_ub": MGDAUBWeighting,
}


def build_weighting(name: str, tasks: Iterable, **options) -> Weighting:
    """``tasks``: task names or ``Task`` objects (whose likelihoods uncertainty weighting uses)."""
    if name not in WEIGHTINGS:
        raise ConfigError(f"unknown weighting '{name}'. Choose one of: {', '.join(WEIGHTINGS)}.")
    tasks = list(tasks)
    names = [getattr(t, "name", t) for t in tasks]
    if name == "uncertainty" and "likelihoods" not in options:
        options["likelihoods"] = {t.name: t.likelihood for t in tasks if hasattr(t, "likelihood")}
    try:
        return WEIGHTINGS[name](names, **options)
    except TypeError as e:
        raise ConfigError(f"bad options for weighting '{name}': {e}") from None


__all__ = ["Weighting", "LinearWeighting", "WEIGHTINGS", "build_weighting",
           "EqualWeighting", "StaticWeighting", "UncertaintyWeighting", "GradNormWeighting",
           "MGDAWeighting", "MGDAUBWeighting"]
