"""The training harness; grows in later work.

For now: :func:`load_fashion_mnist`, a small verified loader for the Fashion-MNIST idx files.
"""

from __future__ import annotations

from bigbatch.train.fashion_mnist import DatasetError, FashionMNIST, load_fashion_mnist

__all__ = ["DatasetError", "FashionMNIST", "load_fashion_mnist"]
