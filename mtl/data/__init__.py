"""Data sets: embedded ones that ship with the dependencies, and loaders for the real ones on disk."""

from .celeba import CelebA
from .mnist import load_mnist
from .multimnist import MultiMNIST
from .nyuv2 import NYUv2

__all__ = ["load_mnist", "MultiMNIST", "NYUv2", "CelebA"]
