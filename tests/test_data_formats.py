"""Tests of the dataset loaders on small files in the official formats, written by the tests.

idx gzip (MNIST, Fashion-MNIST), CIFAR-10 and CIFAR-100 python pickles, image folders (as a
directory and as a ``.tar.xz``, with JPEG and PNG) and scikit-learn's digits: the decoded
tensors must equal what was written, and corrupt, truncated or foreign files must give one
:class:`DatasetError` naming the file. The module's checksum tables and split sizes are
patched to match the tiny files; nothing is read from or written to the user's home.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import torch
from PIL import Image

from bigbatch.train.data import (
    DATASET_NAMES,
    DatasetError,
    ImageDataset,
    cifar_pickle,
    digits,
    idx,
    load_dataset,
    sources,
)
from bigbatch.train.data.base import channel_stats

U8 = npt.NDArray[np.uint8]


def md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No env var; system dir, home and user cache under tmp_path."""
    monkeypatch.delenv(sources.ENV_VAR, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home" / ".cache"))
    monkeypatch.setattr(sources, "SYSTEM_ROOT", tmp_path / "system")
    monkeypatch.setattr(sources, "USER_ROOT", tmp_path / "home" / ".cache" / "bigbatch")
    return tmp_path


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "decoded"


def check_dataset(
    ds: ImageDataset, train_x: U8, train_y: list[int], test_x: U8, test_y: list[int]
) -> None:
    assert ds.train_x.dtype == ds.test_x.dtype == torch.uint8
    assert ds.train_y.dtype == ds.test_y.dtype == torch.int64
    assert ds.train_x.is_contiguous()
    assert ds.test_x.is_contiguous()
    assert np.array_equal(ds.train_x.numpy(), train_x)
    assert np.array_equal(ds.test_x.numpy(), test_x)
    assert ds.train_y.tolist() == train_y
    assert ds.test_y.tolist() == test_y
    assert ds.input_shape == tuple(train_x.shape[1:])
    mean = (train_x.astype(np.float64) / 255).mean(axis=(0, 2, 3))
    std = (train_x.astype(np.float64) / 255).std(axis=(0, 2, 3))
    np.testing.assert_allclose(ds.mean, mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ds.std, std, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------------- idx
def idx_bytes(arr: U8) -> bytes:
    magic = (0x08 << 8) | arr.ndim
    dims = b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return magic.to_bytes(4, "big") + dims + arr.tobytes()


def write_idx(
    directory: Path, spec: idx.IdxSpec, monkeypatch: pytest.MonkeyPatch, seed: int = 0
) -> dict[str, U8]:
    """Tiny idx files (6 train, 4 test); patch the spec's md5s and split sizes to match."""
    rng = np.random.default_rng(seed)
    arrays = {
        idx.TRAIN_IMAGES: rng.integers(0, 256, (6, 28, 28), dtype=np.uint8),
        idx.TRAIN_LABELS: np.array([0, 9, 3, 3, 1, 2], dtype=np.uint8),
        idx.TEST_IMAGES: rng.integers(0, 256, (4, 28, 28), dtype=np.uint8),
        idx.TEST_LABELS: np.array([5, 4, 9, 0], dtype=np.uint8),
    }
    directory.mkdir(parents=True, exist_ok=True)
    for name, arr in arrays.items():
        raw = idx_bytes(arr)
        gz = gzip.compress(raw, mtime=0)
        (directory / name).write_bytes(gz)
        monkeypatch.setitem(spec.gz_md5, name, md5(gz))
        if spec.raw_md5.get(name) is not None:
            monkeypatch.setitem(spec.raw_md5, name, md5(raw))
    monkeypatch.setitem(spec.split_sizes, "train", 6)
    monkeypatch.setitem(spec.split_sizes, "test", 4)
    return arrays


@pytest.mark.parametrize("spec", [idx.FASHION_MNIST, idx.MNIST], ids=lambda s: s.name)
def test_idx_decodes(
    spec: idx.IdxSpec, tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = tmp_path / "data"
    arrays = write_idx(d, spec, monkeypatch)
    ds = load_dataset(spec.name, d, cache_dir=cache)
    assert ds.name == spec.name
    assert ds.source == str(d)
    assert ds.classes == spec.classes
    assert ds.num_classes == 10
    check_dataset(
        ds,
        arrays[idx.TRAIN_IMAGES][:, None],
        arrays[idx.TRAIN_LABELS].tolist(),
        arrays[idx.TEST_IMAGES][:, None],
        arrays[idx.TEST_LABELS].tolist(),
    )
    with pytest.raises(AttributeError):
        ds.name = "x"  # type: ignore[misc]  # frozen


def test_fashion_mnist_recompressed_passes(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Different gzip bytes, same content (as in Debian's package): the content md5 counts."""
    d = tmp_path / "data"
    arrays = write_idx(d, idx.FASHION_MNIST, monkeypatch)
    for name, arr in arrays.items():
        (d / name).write_bytes(gzip.compress(idx_bytes(arr), compresslevel=1, mtime=7))
    ds = load_dataset("fashion-mnist", d, cache_dir=cache)
    assert ds.train_y.tolist() == arrays[idx.TRAIN_LABELS].tolist()


def test_mnist_recompressed_is_rejected(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MNIST's content md5s are unknown: only the official gzip bytes pass."""
    d = tmp_path / "data"
    arrays = write_idx(d, idx.MNIST, monkeypatch)
    (d / idx.TEST_LABELS).write_bytes(gzip.compress(idx_bytes(arrays[idx.TEST_LABELS]), mtime=9))
    with pytest.raises(DatasetError) as info:
        load_dataset("mnist", d, cache_dir=cache)
    text = str(info.value)
    assert str(d / idx.TEST_LABELS) in text
    assert idx.MNIST.gz_md5[idx.TEST_LABELS] in text
    assert "download=True" in text


def test_idx_truncated_and_corrupt(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = tmp_path / "data"
    write_idx(d, idx.FASHION_MNIST, monkeypatch)
    path = d / idx.TRAIN_IMAGES
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(DatasetError, match="corrupt or truncated") as info:
        load_dataset("fashion-mnist", d, cache_dir=cache)
    assert str(path) in str(info.value)
    raw = bytearray(gzip.decompress(good))
    raw[-1] ^= 0xFF
    path.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(DatasetError, match="md5 of its decompressed content") as info:
        load_dataset("fashion-mnist", d, cache_dir=cache)
    assert str(path) in str(info.value)
    assert not list(cache.glob("*.npz")), "nothing cached from a failed load"


def test_idx_official_checksums_enforced(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = tmp_path / "data"
    write_idx(d, idx.MNIST, monkeypatch)
    monkeypatch.undo()  # the official tables again
    with pytest.raises(DatasetError, match="f68b3c2dcbeaaa9fbdd348bbdeb94873"):
        load_dataset("mnist", d, cache_dir=cache)


# ------------------------------------------------------------------------- CIFAR pickles
def write_pickle(path: Path, obj: object, protocol: int = 2) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj, protocol=protocol))


def write_cifar(
    root: Path, spec: cifar_pickle.CifarSpec, monkeypatch: pytest.MonkeyPatch, per_file: int = 2
) -> tuple[U8, list[int], U8, list[int], list[str]]:
    """Official layout under root/spec.folder; patches md5s and split sizes to match."""
    rng = np.random.default_rng(1)
    folder = root / spec.folder
    xs: dict[str, list[U8]] = {"train": [], "test": []}
    ys: dict[str, list[int]] = {"train": [], "test": []}
    for split, files in (("train", spec.train_files), ("test", spec.test_files)):
        for name in files:
            n = per_file if split == "train" or len(files) > 1 else per_file + 1
            data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
            labels = rng.integers(0, spec.num_classes, n).tolist()
            batch: dict[bytes, object] = {b"batch_label": name.encode(), b"data": data,
                                          b"filenames": [b"x.png"] * n}  # fmt: skip
            batch[spec.label_key] = labels
            if spec is cifar_pickle.CIFAR100:
                batch[b"coarse_labels"] = [v // 5 for v in labels]
            write_pickle(folder / name, batch, protocol=2 if split == "train" else 5)
            xs[split].append(data.reshape(n, 3, 32, 32))
            ys[split] += labels
    names = [f"class_{i}" for i in range(spec.num_classes)]
    meta: dict[bytes, object] = {spec.names_key: [n.encode() for n in names]}
    if spec is cifar_pickle.CIFAR10:
        meta[b"num_cases_per_batch"] = per_file
    else:
        meta[b"coarse_label_names"] = [b"c%d" % i for i in range(20)]
    write_pickle(folder / spec.meta_file, meta)
    for name in spec.files:
        monkeypatch.setitem(spec.md5, name, md5((folder / name).read_bytes()))
    train_x, test_x = np.concatenate(xs["train"]), np.concatenate(xs["test"])
    monkeypatch.setitem(spec.split_sizes, "train", len(train_x))
    monkeypatch.setitem(spec.split_sizes, "test", len(test_x))
    return train_x, ys["train"], test_x, ys["test"], names


@pytest.mark.parametrize(
    "spec", [cifar_pickle.CIFAR10, cifar_pickle.CIFAR100], ids=lambda s: s.name
)
def test_cifar_decodes(
    spec: cifar_pickle.CifarSpec, tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "data"
    train_x, train_y, test_x, test_y, names = write_cifar(root, spec, monkeypatch)
    ds = load_dataset(spec.name, root, cache_dir=cache)  # found in root/<official folder>
    assert ds.name == spec.name
    assert ds.source == str(root / spec.folder)
    assert ds.classes == tuple(names)
    assert ds.num_classes == spec.num_classes
    assert ds.input_shape == (3, 32, 32)
    check_dataset(ds, train_x, train_y, test_x, test_y)


def test_cifar_bad_md5_names_file(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "data"
    write_cifar(root, cifar_pickle.CIFAR10, monkeypatch)
    path = root / "cifar-10-batches-py" / "data_batch_3"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DatasetError) as info:
        load_dataset("cifar10", root, cache_dir=cache)
    text = str(info.value)
    assert str(path) in text
    assert "truncated" in text
    assert cifar_pickle.CIFAR10.md5["data_batch_3"] in text
    assert "download=True" in text


def test_cifar_truncated_pickle_with_matching_md5(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file that passes its (patched) md5 but does not unpickle: one clear error."""
    root = tmp_path / "data"
    write_cifar(root, cifar_pickle.CIFAR100, monkeypatch)
    path = root / "cifar-100-python" / "test"
    path.write_bytes(path.read_bytes()[:100])
    monkeypatch.setitem(cifar_pickle.CIFAR100.md5, "test", md5(path.read_bytes()))
    with pytest.raises(DatasetError, match="corrupt or truncated") as info:
        load_dataset("cifar100", root, cache_dir=cache)
    assert str(path) in str(info.value)


class _Evil:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("echo pwned",))


def test_cifar_unpickler_refuses_code(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "data"
    write_cifar(root, cifar_pickle.CIFAR10, monkeypatch)
    path = root / "cifar-10-batches-py" / "batches.meta"
    write_pickle(path, {b"label_names": _Evil()})
    monkeypatch.setitem(cifar_pickle.CIFAR10.md5, "batches.meta", md5(path.read_bytes()))
    with pytest.raises(DatasetError, match=r"system is not allowed") as info:
        load_dataset("cifar10", root, cache_dir=cache)
    assert str(path) in str(info.value)


def test_cifar_wrong_counts_and_labels(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "data"
    write_cifar(root, cifar_pickle.CIFAR10, monkeypatch)
    monkeypatch.setitem(cifar_pickle.CIFAR10.split_sizes, "train", 50_000)
    with pytest.raises(DatasetError, match=r"10 images in data_batch_1.*expected 50000"):
        load_dataset("cifar10", root, cache_dir=cache)


# ------------------------------------------------------------------------- image folders
def image_bytes(arr: U8, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def make_folder_files(
    channels: int = 3, size: tuple[int, int] = (6, 5)
) -> dict[str, tuple[bytes, U8, str]]:
    """relative path -> (file bytes, expected decoded C x H x W array, class)."""
    rng = np.random.default_rng(3)
    files: dict[str, tuple[bytes, U8, str]] = {}
    layout = {"train": {"cat": 3, "ant": 2, "dog": 2}, "test": {"dog": 1, "ant": 2}}
    for split, classes in layout.items():
        for cls, n in classes.items():
            for i in range(n):
                h, w = size
                shape = (h, w, 3) if channels == 3 else (h, w)
                arr = rng.integers(0, 256, shape, dtype=np.uint8)
                fmt = "JPEG" if (i % 2 == 0 and channels == 3) else "PNG"
                data = image_bytes(arr, fmt)
                decoded = np.asarray(
                    Image.open(io.BytesIO(data)).convert("RGB" if channels == 3 else "L")
                )
                if fmt == "PNG":
                    assert np.array_equal(decoded, arr)  # lossless: exactly what was written
                chw = decoded.transpose(2, 0, 1) if channels == 3 else decoded[None]
                ext = "jpg" if fmt == "JPEG" else "png"
                files[f"{split}/{cls}/{i:03d}.{ext}"] = (data, np.ascontiguousarray(chw), cls)
    return files


def expected_arrays(
    files: dict[str, tuple[bytes, U8, str]],
) -> tuple[U8, list[int], U8, list[int], tuple[str, ...]]:
    classes = tuple(sorted({c for p, (_, _, c) in files.items() if p.startswith("train/")}))
    out = []
    for split in ("train", "test"):
        paths = sorted(p for p in files if p.startswith(split + "/"))
        out.append(np.stack([files[p][1] for p in paths]))
        out.append([classes.index(files[p][2]) for p in paths])
    return out[0], out[1], out[2], out[3], classes


def write_dir(root: Path, files: dict[str, tuple[bytes, U8, str]]) -> Path:
    for rel, (data, _, _) in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (root / "train" / "cat" / "README.txt").write_text("not an image: ignored")
    return root


def write_tar(path: Path, files: dict[str, tuple[bytes, U8, str]], prefix: str = "") -> Path:
    with tarfile.open(path, "w:xz") as tar:
        for rel in reversed(list(files)):  # archive order must not matter
            info = tarfile.TarInfo(prefix + rel)
            info.size = len(files[rel][0])
            tar.addfile(info, io.BytesIO(files[rel][0]))
    return path


@pytest.mark.parametrize("kind", ["dir", "tar.xz", "tar.xz-with-top-folder"])
def test_image_folder_decodes(kind: str, tmp_path: Path, cache: Path) -> None:
    files = make_folder_files()
    if kind == "dir":
        src = write_dir(tmp_path / "pets", files)
    else:
        prefix = "./pets/" if kind.endswith("top-folder") else ""
        src = write_tar(tmp_path / "pets.tar.xz", files, prefix)
    ds = load_dataset("image-folder", src, cache_dir=cache)
    train_x, train_y, test_x, test_y, classes = expected_arrays(files)
    assert ds.name == "pets"
    assert ds.source == str(src)
    assert ds.classes == classes == ("ant", "cat", "dog")
    assert ds.input_shape == (3, 6, 5)
    check_dataset(ds, train_x, train_y, test_x, test_y)


def test_image_folder_jpeg_is_close_to_original(tmp_path: Path, cache: Path) -> None:
    arr = np.tile(np.linspace(0, 255, 16, dtype=np.uint8), (16, 1))
    img = np.stack([arr, arr.T, 255 - arr], axis=-1)
    for split in ("train", "test"):
        (tmp_path / "f" / split / "a").mkdir(parents=True)
        (tmp_path / "f" / split / "a" / "0.jpg").write_bytes(image_bytes(img, "JPEG"))
    ds = load_dataset("image-folder", tmp_path / "f", cache_dir=cache)
    diff = ds.train_x[0].numpy().astype(int) - img.transpose(2, 0, 1).astype(int)
    assert np.abs(diff).mean() < 3


def test_image_folder_grayscale_one_channel(tmp_path: Path, cache: Path) -> None:
    files = make_folder_files(channels=1)
    ds = load_dataset("image-folder", write_dir(tmp_path / "gray", files), cache_dir=cache)
    train_x, train_y, test_x, test_y, _ = expected_arrays(files)
    assert ds.input_shape == (1, 6, 5)
    check_dataset(ds, train_x, train_y, test_x, test_y)


def test_image_folder_errors(tmp_path: Path, cache: Path) -> None:
    files = make_folder_files()
    src = write_dir(tmp_path / "pets", files)
    bad = src / "test" / "dog" / "000.jpg"
    bad.write_bytes(b"\xff\xd8\xff not really a jpeg")
    with pytest.raises(DatasetError, match="not a readable image") as info:
        load_dataset("image-folder", src, cache_dir=cache)
    assert str(bad) in str(info.value)
    bad.write_bytes(image_bytes(np.zeros((7, 5, 3), np.uint8), "PNG"))
    with pytest.raises(DatasetError, match=r"test/dog/000\.jpg is 5x7.*all images must"):
        load_dataset("image-folder", src, cache_dir=cache)
    bad.unlink()
    (src / "test" / "eel").mkdir()
    (src / "test" / "eel" / "0.png").write_bytes(image_bytes(np.zeros((6, 5, 3), np.uint8), "PNG"))
    with pytest.raises(DatasetError, match=r"test classes \['eel'\] have no train/ folder"):
        load_dataset("image-folder", src, cache_dir=cache)
    with pytest.raises(DatasetError, match="expected train/<class>/<image>"):
        load_dataset("image-folder", src / "train", cache_dir=cache)
    with pytest.raises(DatasetError, match="no such file or directory"):
        load_dataset("image-folder", tmp_path / "nowhere", cache_dir=cache)
    with pytest.raises(DatasetError, match="needs data_dir"):
        load_dataset("image-folder", cache_dir=cache)


def test_image_folder_truncated_archive(tmp_path: Path, cache: Path) -> None:
    archive = write_tar(tmp_path / "pets.tar.xz", make_folder_files())
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match="corrupt or truncated") as info:
        load_dataset("image-folder", archive, cache_dir=cache)
    assert str(archive) in str(info.value)
    member = "train/cat/001.png"
    files = make_folder_files()
    files[member] = (b"garbage", files[member][1], "cat")
    write_tar(archive, files)
    with pytest.raises(DatasetError, match=f"member {member} is not a readable image"):
        load_dataset("image-folder", archive, cache_dir=cache)


def test_cifar10_falls_back_to_jpeg_folder(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bigbatch.train.data import registry
    from bigbatch.train.data.registry import CIFAR10_CLASSES

    monkeypatch.setattr(registry, "CIFAR10_JPEG_COUNTS", (10, 10))  # a miniature copy

    rng = np.random.default_rng(5)
    files = {}
    for split in ("train", "test"):
        for cls in CIFAR10_CLASSES:
            arr = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            files[f"{split}/{cls}/0000.png"] = (
                image_bytes(arr, "PNG"),
                arr.transpose(2, 0, 1),
                cls,
            )
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    archive = write_tar(data_dir / "cifar10-jpeg.tar.xz", files)
    ds = load_dataset("cifar10", data_dir, cache_dir=cache)
    assert ds.name == "cifar10-jpeg"
    assert ds.display_name == "CIFAR-10 (JPEG)"
    assert "lossy" in ds.notes
    assert ds.source == str(archive)
    assert ds.classes == CIFAR10_CLASSES
    assert ds.train_y.tolist() == list(range(10))
    train_x, train_y, test_x, test_y, _ = expected_arrays(files)
    check_dataset(ds, train_x, train_y, test_x, test_y)
    # The archive itself as data_dir, and an extracted folder, work too.
    assert load_dataset("cifar10", archive, cache_dir=cache).name == "cifar10-jpeg"
    archive.unlink()
    folder = write_dir(data_dir / "cifar10-jpeg", files)
    ds2 = load_dataset("cifar10", data_dir, cache_dir=cache)
    assert (ds2.name, ds2.source) == ("cifar10-jpeg", str(folder))


def test_a_partial_cifar10_jpeg_copy_is_refused(tmp_path: Path, cache: Path) -> None:
    from bigbatch.train.data.registry import CIFAR10_CLASSES

    rng = np.random.default_rng(6)
    files = {}
    for split in ("train", "test"):
        for cls in CIFAR10_CLASSES:
            arr = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            files[f"{split}/{cls}/0000.png"] = (
                image_bytes(arr, "PNG"),
                arr.transpose(2, 0, 1),
                cls,
            )
    data_dir = tmp_path / "data"
    write_dir(data_dir / "cifar10-jpeg", files)
    with pytest.raises(
        DatasetError, match=r"10 training and 10 test images; CIFAR-10 \(JPEG\) has 50,000"
    ):
        load_dataset("cifar10", data_dir, cache_dir=cache)


def test_cifar10_official_pickles_beat_jpeg(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir = tmp_path / "data"
    write_dir(data_dir / "cifar10-jpeg", make_folder_files())
    env = tmp_path / "env"
    write_cifar(env, cifar_pickle.CIFAR10, monkeypatch)
    monkeypatch.setenv(sources.ENV_VAR, str(env))
    ds = load_dataset("cifar10", data_dir, cache_dir=cache)
    assert ds.name == "cifar10"
    assert ds.source == str(env / "cifar-10-batches-py")


# ------------------------------------------------------------------------- digits, names
def test_digits(cache: Path) -> None:
    ds = load_dataset("digits", cache_dir=cache)
    assert ds.name == "digits"
    assert ds.input_shape == (1, 8, 8)
    assert ds.classes == tuple("0123456789")
    assert len(ds.train_x) + len(ds.test_x) == 1797
    assert len(ds.test_x) == sum((n + 4) // 5 for n in np.bincount(np.r_[ds.train_y, ds.test_y]))
    assert int(ds.train_x.max()) == 255
    assert int(ds.train_x.min()) == 0
    # Same as scikit-learn's own loader, rescaled, with the stratified every-fifth split.
    from sklearn.datasets import load_digits

    ref = load_digits()
    x = np.round(ref.images * 255 / 16).astype(np.uint8)
    test = np.zeros(len(ref.target), dtype=bool)
    for c in range(10):
        test[np.flatnonzero(ref.target == c)[::5]] = True
    check_dataset(
        ds,
        x[~test][:, None],
        ref.target[~test].tolist(),
        x[test][:, None],
        ref.target[test].tolist(),
    )
    again = load_dataset("digits", cache_dir=cache)
    assert torch.equal(again.test_x, ds.test_x)


def test_digits_without_sklearn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(digits.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DatasetError, match="pip install scikit-learn"):
        load_dataset("digits")


def test_unknown_name() -> None:
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'") as info:
        load_dataset("imagenet")
    for name in DATASET_NAMES:
        assert name in str(info.value)
    assert DATASET_NAMES == (
        "fashion-mnist",
        "mnist",
        "cifar10",
        "cifar100",
        "image-folder",
        "digits",
        "text",
    )


def test_channel_stats_exact() -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (9000, 3, 4, 4), dtype=np.uint8)  # more than one chunk
    mean, std = channel_stats(x, chunk=4096)
    f = x.astype(np.float64) / 255
    np.testing.assert_allclose(mean, f.mean(axis=(0, 2, 3)), rtol=1e-13)
    np.testing.assert_allclose(std, f.std(axis=(0, 2, 3)), rtol=1e-11)
