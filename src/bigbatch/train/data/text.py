"""Character-level text for language models: any UTF-8 file (plain or ``.gz``) in memory.

:func:`load_text` reads the file, maps every character to an index into the sorted set of
the characters it contains (the vocabulary), and fixes the splits by position: the first
90% of the characters are for training, the next 5% for validation (choosing learning
rates) and the last 5% for the test figures. Validation and test windows are never sampled
from the training part; training windows are drawn from the training part only (see
:mod:`bigbatch.train.batches`). Not here: batching, models.
"""

from __future__ import annotations

import gzip
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from bigbatch.train.data.base import DatasetError

__all__ = ["TRAIN_FRACTION", "VALIDATION_FRACTION", "TextDataset", "load_text"]

TRAIN_FRACTION = 0.90
VALIDATION_FRACTION = 0.05
#: the shortest text that gives every split a few windows
MIN_CHARACTERS = 1000


@dataclass(frozen=True, eq=False)
class TextDataset:
    """A text as character indices: ``tokens[:train_end]`` trains,
    ``tokens[train_end:val_end]`` validates, ``tokens[val_end:]`` tests."""

    name: str
    tokens: Tensor
    vocab: tuple[str, ...]
    train_end: int
    val_end: int
    source: str
    md5: str

    @property
    def num_classes(self) -> int:
        return len(self.vocab)

    @property
    def display_name(self) -> str:
        return f"{Path(self.source).name} (characters)"

    @property
    def notes(self) -> str:
        return (
            f"character-level: {self.tokens.numel():,} characters, vocabulary of "
            f"{len(self.vocab)}; splits by position: train {TRAIN_FRACTION:.0%}, validation "
            f"{VALIDATION_FRACTION:.0%}, test the rest (the file's end)"
        )

    def part(self, split: str) -> Tensor:
        """The tokens of ``"train"``, ``"validation"`` or ``"test"``."""
        bounds = {
            "train": (0, self.train_end),
            "validation": (self.train_end, self.val_end),
            "test": (self.val_end, int(self.tokens.numel())),
        }
        start, stop = bounds[split]
        return self.tokens[start:stop]


def _read(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                return fh.read()
        return path.read_bytes()
    except FileNotFoundError:
        raise DatasetError(
            f"{path}: no such text file (pass a UTF-8 text file, plain or .gz, with --data-dir)"
        ) from None
    except IsADirectoryError:
        raise DatasetError(f"{path}: a directory; the text dataset needs one text file") from None
    except (OSError, EOFError) as exc:
        raise DatasetError(f"{path}: cannot be read ({exc})") from None


def load_text(path: str | Path) -> TextDataset:
    """Load a UTF-8 text file (``.gz`` is decompressed) as a :class:`TextDataset`.

    Raises:
        DatasetError: the file is missing, unreadable, not UTF-8, or shorter than
            :data:`MIN_CHARACTERS` characters; the message names the file.
    """
    file = Path(path).expanduser()
    raw = _read(file)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DatasetError(
            f"{file}: not UTF-8 text (byte {exc.start} is {raw[exc.start : exc.start + 1]!r})"
        ) from None
    if len(text) < MIN_CHARACTERS:
        raise DatasetError(
            f"{file}: {len(text)} characters; a language model needs at least {MIN_CHARACTERS}"
        )
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    alphabet, tokens = np.unique(codes, return_inverse=True)
    n = len(text)
    train_end = int(n * TRAIN_FRACTION)
    val_end = int(n * (TRAIN_FRACTION + VALIDATION_FRACTION))
    return TextDataset(
        name="text",
        tokens=torch.from_numpy(tokens.astype(np.int64)),
        vocab=tuple(chr(int(c)) for c in alphabet),
        train_end=train_end,
        val_end=val_end,
        source=str(file),
        md5=hashlib.md5(raw).hexdigest(),
    )
