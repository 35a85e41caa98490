"""scikit-learn's bundled 8x8 digits: a tiny dataset that is always available offline.

1,797 images, 1 channel, 8 x 8, 10 classes. The file ships inside scikit-learn
(``sklearn/datasets/data/digits.csv.gz``, 64 pixel columns in ``0..16`` and the label); it
is read directly (no import of scikit-learn) and pixels are rescaled to ``0..255`` with
``round(v * 255 / 16)``. The train/test split is deterministic and stratified: within each
class, every fifth image in file order (the 1st, 6th, 11th, ...) is a test image.
"""

from __future__ import annotations

import gzip
import importlib.util
import zlib
from pathlib import Path

import numpy as np

from bigbatch.train.data.base import DatasetError, Decoded

__all__ = ["CLASSES", "digits_file", "load_digits"]

LOADER_VERSION = 1
CLASSES = tuple(str(d) for d in range(10))
TEST_EVERY = 5
_RELATIVE = Path("datasets") / "data" / "digits.csv.gz"


def digits_file() -> Path:
    """Where scikit-learn keeps the digits file (no import of scikit-learn itself)."""
    spec = importlib.util.find_spec("sklearn")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        path = Path(loc) / _RELATIVE
        if path.is_file():
            return path
    raise DatasetError(
        "the 'digits' dataset needs scikit-learn, whose package holds the file "
        f"{_RELATIVE} (pip install scikit-learn); searched: {locations or 'no sklearn package'}"
    )


def load_digits(path: Path | None = None) -> Decoded:
    """Decode the digits file and split it (see the module docstring)."""
    path = digits_file() if path is None else path
    try:
        with gzip.open(path, "rt") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.int64, ndmin=2)
    except (OSError, EOFError, ValueError, zlib.error) as exc:
        raise DatasetError(f"{path} is corrupt ({type(exc).__name__}: {exc})") from exc
    if table.shape[1] != 65 or table.shape[0] == 0:
        raise DatasetError(f"{path}: expected rows of 64 pixels and a label, got {table.shape}")
    pixels, y = table[:, :64], table[:, 64]
    if pixels.min() < 0 or pixels.max() > 16 or y.min() < 0 or y.max() > 9:
        raise DatasetError(f"{path}: pixel values outside 0..16 or labels outside 0..9")
    x = ((pixels * 255 + 8) // 16).astype(np.uint8).reshape(-1, 1, 8, 8)
    test = np.zeros(len(y), dtype=bool)
    for c in range(10):
        test[np.flatnonzero(y == c)[::TEST_EVERY]] = True
    return Decoded(
        np.ascontiguousarray(x[~test]),
        y[~test].astype(np.int64),
        np.ascontiguousarray(x[test]),
        y[test].astype(np.int64),
        CLASSES,
    )
