"""The training harness: datasets, models, recipes, the training loop and the ``bigbatch`` CLI.

Nothing in :mod:`bigbatch.optim` or :mod:`bigbatch.curvature` imports this package: the
optimizers are usable without it. Entry points: :func:`load_dataset`, :func:`load_config`,
:class:`~bigbatch.train.loop.TrainingRun` and the ``bigbatch`` console script
(:mod:`bigbatch.train.cli`).
"""

from __future__ import annotations

from bigbatch.train.config import Config, ConfigError, load_config
from bigbatch.train.data import DATASET_NAMES, DatasetError, ImageDataset, load_dataset

__all__ = [
    "DATASET_NAMES",
    "Config",
    "ConfigError",
    "DatasetError",
    "ImageDataset",
    "load_config",
    "load_dataset",
]
