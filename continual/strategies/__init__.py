"""Continual-learning strategies by name: ``build_strategy(name, **options)``.

Each strategy is a small ``Strategy`` (see ``base.py``) that plugs into the one
training loop through ``ContinualObjective``; A-GEM and GEM are weightings over the
``{"current", "memory"}`` losses, so any other weighting of the core can take their
place between the current and the replayed loss.
"""

from __future__ import annotations

import inspect

from mtl.errors import ConfigError

from .base import CURRENT, ContinualObjective, Strategy, named_trainable
from .baselines import FineTune, Joint
from .class_incremental import LUCIR, ICaRL
from .distillation import LwF
from .importance import MAS, EWCPlusPlus, RWalk
from .lwm import LwM
from .progressive import PNN
from .regularisation import EWC, L2, SI, OnlineEWC, QuadraticPenalty
from .replay import AGEM, DER, ER, GEM, DERPlusPlus

_CLASSES = [FineTune, Joint, L2, EWC, OnlineEWC, EWCPlusPlus, SI, MAS, RWalk, LwF, ER, AGEM, GEM, DER, DERPlusPlus, ICaRL, LUCIR, LwM, PNN]
STRATEGIES = {cls.name: cls for cls in _CLASSES}


def strategy_options(name: str) -> dict[str, object]:
    """The options ``name`` takes, with their defaults."""
    signature = inspect.signature(STRATEGIES[name].__init__)
    return {p.name: p.default for p in list(signature.parameters.values())[1:]}


def build_strategy(name: str, **options) -> Strategy:
    """Strategy ``name`` with the ``options`` it takes; options it does not take are ignored
    when they are None (so one command line can carry every strategy's options)."""
    if name not in STRATEGIES:
        raise ConfigError(f"unknown continual strategy '{name}'; choose one of: {', '.join(STRATEGIES)}.")
    accepted = strategy_options(name)
    unknown = [k for k, v in options.items() if k not in accepted and v is not None]
    if unknown:
        raise ConfigError(f"strategy '{name}' takes no option(s) {unknown}; it takes: {', '.join(accepted) or 'none'}.")
    return STRATEGIES[name](**{k: v for k, v in options.items() if k in accepted and v is not None})


__all__ = ["AGEM", "CURRENT", "ContinualObjective", "DER", "DERPlusPlus", "ER", "EWC", "EWCPlusPlus", "FineTune", "GEM", "ICaRL",
           "Joint", "LUCIR", "L2", "LwF", "LwM", "MAS", "OnlineEWC", "PNN", "QuadraticPenalty", "RWalk", "SI", "STRATEGIES", "Strategy", "build_strategy",
           "named_trainable", "strategy_options"]
