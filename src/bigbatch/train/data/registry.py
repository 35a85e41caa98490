"""``load_dataset``: one entry point that finds, verifies, decodes and caches any dataset.

``DATASET_NAMES`` lists what it knows. For each name it searches the places described in
:mod:`bigbatch.train.data.sources`, downloads only when asked (``download=True``) and only
when no copy is found, and goes through the decoded-array cache
(:mod:`bigbatch.train.data.cache`). ``"cifar10"`` prefers the official pickle batches found
anywhere in the search path; without them, a ``cifar10-jpeg.tar.xz`` archive or an extracted
``cifar10-jpeg/`` folder in a searched directory is loaded instead, under the name
``"cifar10-jpeg"`` (a lossy re-encoding, which reports must say; see
:attr:`ImageDataset.notes`). Nothing ever falls back silently to another dataset.
"""

from __future__ import annotations

import difflib
import logging
from pathlib import Path

from bigbatch.train.data import cifar_pickle, digits, idx, image_folder
from bigbatch.train.data.base import DatasetError, ImageDataset
from bigbatch.train.data.cache import file_stamps, load_cached
from bigbatch.train.data.sources import missing_message, search_dirs, system_dir, user_dir
from bigbatch.train.data.text import TextDataset, load_text

__all__ = ["CIFAR10_CLASSES", "DATASET_NAMES", "load_dataset"]

logger = logging.getLogger(__name__)

DATASET_NAMES = (
    "fashion-mnist",
    "mnist",
    "cifar10",
    "cifar100",
    "image-folder",
    "digits",
    "text",
)
CIFAR10_JPEG = "cifar10-jpeg"
#: the images a complete CIFAR-10 (JPEG) copy holds: (train, test)
CIFAR10_JPEG_COUNTS = (50_000, 10_000)
CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)


def load_dataset(
    name: str,
    data_dir: str | Path | None = None,
    *,
    download: bool = False,
    cache_dir: str | Path | None = None,
) -> ImageDataset | TextDataset:
    """Load dataset ``name`` (one of :data:`DATASET_NAMES`) into memory.

    Args:
        name: the dataset; ``"image-folder"`` and ``"text"`` need ``data_dir``.
        data_dir: searched first (the files directly or in ``data_dir/<name>/``); the
            download target when given. For ``"image-folder"``: the folder or archive;
            for ``"text"``: the UTF-8 text file (plain or ``.gz``).
        download: fetch the official files (checksum-verified) when no copy is found.
        cache_dir: where decoded arrays are cached (default ``~/.cache/bigbatch/decoded``).
    Raises:
        ValueError: unknown ``name``.
        DatasetError: files missing (and ``download`` off), corrupt, or not downloadable.
    """
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in DATASET_NAMES:
        close = difflib.get_close_matches(str(key), list(DATASET_NAMES), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"unknown dataset {name!r}{hint} (valid names: {', '.join(DATASET_NAMES)})"
        )
    if key in idx.SPECS:
        return _load_idx(idx.SPECS[key], data_dir, download, cache_dir)
    if key in cifar_pickle.SPECS:
        return _load_cifar(cifar_pickle.SPECS[key], data_dir, download, cache_dir)
    if key == "text":
        if data_dir is None:
            raise DatasetError(
                "the 'text' dataset needs data_dir (--data-dir): a UTF-8 text file, plain or "
                ".gz (for example the KJV Bible: apt-get install bible-kjv bible-kjv-text)"
            )
        return load_text(data_dir)
    if key == "image-folder":
        if data_dir is None:
            raise DatasetError(
                "the 'image-folder' dataset needs data_dir (--data-dir): a directory with "
                "train/<class>/<image> and test/<class>/<image>, or a .tar/.tar.gz/.tar.xz "
                "archive of one"
            )
        path = Path(data_dir).expanduser()
        return _load_folder(path, image_folder.folder_name(path), cache_dir)
    path = digits.digits_file()
    stamp = [digits.LOADER_VERSION, file_stamps([path])]
    return load_cached("digits", path, stamp, lambda: digits.load_digits(path), cache_dir)


# ---------------------------------------------------------------------------- internals
def _load_idx(
    spec: idx.IdxSpec, data_dir: str | Path | None, download: bool, cache_dir: str | Path | None
) -> ImageDataset:
    searched = search_dirs(spec.name, data_dir)
    source = idx.find_idx_dir(searched)
    if source is None:
        if not download:
            hints = []
            if spec.apt_package:
                hints.append(
                    f"  - apt-get install {spec.apt_package} "
                    f"(installs them in {system_dir(spec.name)});"
                )
            raise DatasetError(
                missing_message(
                    spec.title,
                    searched,
                    idx.FILES,
                    url=idx.BASE_URLS[spec.name],
                    subdir=spec.name,
                    extra_hints=hints,
                )
            )
        source = idx.download_idx(spec, _download_target(spec.name, data_dir))
    stamp = [
        idx.LOADER_VERSION,
        file_stamps(source / f for f in idx.FILES),
        spec.gz_md5,
        spec.raw_md5,
        spec.split_sizes,
    ]
    found = source
    return load_cached(spec.name, found, stamp, lambda: idx.load_idx_dir(spec, found), cache_dir)


def _load_cifar(
    spec: cifar_pickle.CifarSpec,
    data_dir: str | Path | None,
    download: bool,
    cache_dir: str | Path | None,
) -> ImageDataset:
    searched = search_dirs(spec.name, data_dir, subdirs=(spec.folder,))
    source = cifar_pickle.find_cifar_dir(spec, searched)
    if source is None and spec is cifar_pickle.CIFAR10:
        jpeg = _find_cifar10_jpeg(searched, data_dir)
        if jpeg is not None:
            logger.warning(
                "CIFAR-10: no official pickle batches found; loading the JPEG re-encoding %s "
                "(lossy: report results as CIFAR-10 (JPEG))",
                jpeg,
            )
            ds = _load_folder(jpeg, CIFAR10_JPEG, cache_dir)
            if ds.classes != CIFAR10_CLASSES or ds.input_shape != (3, 32, 32):
                raise DatasetError(
                    f"{jpeg}: not CIFAR-10: classes {ds.classes}, images {ds.input_shape}; "
                    f"expected {CIFAR10_CLASSES} and 3x32x32"
                )
            counts = (len(ds.train_y), len(ds.test_y))
            if counts != CIFAR10_JPEG_COUNTS:
                raise DatasetError(
                    f"{jpeg}: {counts[0]:,} training and {counts[1]:,} test images; CIFAR-10 "
                    f"(JPEG) has {CIFAR10_JPEG_COUNTS[0]:,} and {CIFAR10_JPEG_COUNTS[1]:,} (a "
                    "partial copy? load a subset as --dataset image-folder instead)"
                )
            return ds
    if source is None:
        if not download:
            also = ""
            if spec is cifar_pickle.CIFAR10:
                also = f" (nor a {CIFAR10_JPEG}.tar.xz archive or {CIFAR10_JPEG}/ folder)"
            raise DatasetError(
                missing_message(
                    spec.title,
                    searched,
                    spec.files,
                    url=cifar_pickle.URLS[spec.name],
                    subdir=f"{spec.name} or DIR/{spec.folder}",
                    also=also,
                )
            )
        source = cifar_pickle.download_cifar(spec, _download_target(spec.name, data_dir))
    stamp = [
        cifar_pickle.LOADER_VERSION,
        file_stamps(source / f for f in spec.files),
        spec.md5,
        spec.split_sizes,
    ]
    found = source
    return load_cached(
        spec.name, found, stamp, lambda: cifar_pickle.load_cifar_dir(spec, found), cache_dir
    )


def _find_cifar10_jpeg(searched: list[Path], data_dir: str | Path | None) -> Path | None:
    if data_dir is not None:
        given = Path(data_dir).expanduser()
        if given.is_file() and image_folder.is_archive(given):
            return given
    for d in searched:
        if d.name == CIFAR10_JPEG and d.is_dir():
            return d
        for suffix in image_folder.ARCHIVE_SUFFIXES:
            if (d / f"{CIFAR10_JPEG}{suffix}").is_file():
                return d / f"{CIFAR10_JPEG}{suffix}"
        if (d / CIFAR10_JPEG).is_dir():
            return d / CIFAR10_JPEG
    return None


def _load_folder(path: Path, name: str, cache_dir: str | Path | None) -> ImageDataset:
    if not path.exists():
        raise DatasetError(f"{path}: no such file or directory (an image folder or archive)")
    stamp = [image_folder.LOADER_VERSION, file_stamps(image_folder.image_files(path))]
    return load_cached(name, path, stamp, lambda: image_folder.load_image_folder(path), cache_dir)


def _download_target(name: str, data_dir: str | Path | None) -> Path:
    return Path(data_dir).expanduser() if data_dir is not None else user_dir(name)
