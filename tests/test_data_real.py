"""The loaders on the real datasets kept in ``shared/data`` beside the repository.

Fashion-MNIST (the official idx files: md5s, shapes, counts, class balance) and the CIFAR-10
JPEG archive (``cifar10-jpeg.tar.xz``: 50,000/10,000 images, 3x32x32, 10 classes of 5,000),
which decodes 60,000 JPEGs once (~9 s) and is then read back from the decoded-array cache.
The cache lives in a temporary directory, never in the user's home.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from bigbatch.train.data import load_dataset, sources
from bigbatch.train.data.registry import CIFAR10_CLASSES
from bigbatch.train.data.sources import file_md5

REAL = Path(__file__).resolve().parents[2] / "shared" / "data"
FASHION = REAL / "fashion-mnist"
CIFAR_JPEG = REAL / "cifar10-jpeg.tar.xz"
#: Official md5s of the Fashion-MNIST gzip files (as listed in shared/data/README.md).
FASHION_MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
CIFAR_JPEG_MD5 = "bee70e02b274d6baa71cd661402d3c8a"


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(sources.ENV_VAR, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(sources, "SYSTEM_ROOT", tmp_path / "system")
    monkeypatch.setattr(sources, "USER_ROOT", tmp_path / "home" / ".cache" / "bigbatch")


def require(path: Path) -> None:
    assert path.exists(), (
        f"the real data is expected at {path} (shared/data beside the repository root); "
        "see shared/data/README.md"
    )


@pytest.mark.slow
def test_fashion_mnist_real(tmp_path: Path) -> None:
    require(FASHION)
    for name, expected in FASHION_MD5.items():
        assert file_md5(FASHION / name) == expected, name
    ds = load_dataset("fashion-mnist", REAL, cache_dir=tmp_path / "decoded")  # REAL/fashion-mnist
    assert ds.name == "fashion-mnist"
    assert ds.source == str(FASHION)
    assert ds.train_x.shape == (60_000, 1, 28, 28)
    assert ds.test_x.shape == (10_000, 1, 28, 28)
    assert ds.train_x.dtype == torch.uint8
    assert ds.num_classes == 10
    assert ds.classes[0] == "T-shirt/top"
    assert ds.train_y.bincount().tolist() == [6000] * 10
    assert ds.test_y.bincount().tolist() == [1000] * 10
    assert ds.train_y[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
    assert abs(ds.mean[0] - 0.2860) < 1e-4
    assert abs(ds.std[0] - 0.3530) < 1e-4
    cached = load_dataset("fashion-mnist", FASHION, cache_dir=tmp_path / "decoded")
    assert torch.equal(cached.train_x, ds.train_x)


@pytest.mark.slow
def test_cifar10_jpeg_real(tmp_path: Path) -> None:
    require(CIFAR_JPEG)
    assert file_md5(CIFAR_JPEG) == CIFAR_JPEG_MD5
    cache = tmp_path / "decoded"
    start = time.perf_counter()
    ds = load_dataset("cifar10", REAL, cache_dir=cache)  # no pickles there: the JPEG archive
    first = time.perf_counter() - start
    assert ds.name == "cifar10-jpeg"
    assert ds.display_name == "CIFAR-10 (JPEG)"
    assert "lossy" in ds.notes
    assert ds.source == str(CIFAR_JPEG)
    assert ds.train_x.shape == (50_000, 3, 32, 32)
    assert ds.test_x.shape == (10_000, 3, 32, 32)
    assert ds.classes == CIFAR10_CLASSES
    assert ds.train_y.bincount().tolist() == [5000] * 10
    assert ds.test_y.bincount().tolist() == [1000] * 10
    # Official CIFAR-10 means are (0.4914, 0.4822, 0.4465); the JPEG copy is within 2e-4.
    for got, official in zip(ds.mean, (0.4914, 0.4822, 0.4465), strict=True):
        assert abs(got - official) < 5e-4
    start = time.perf_counter()
    again = load_dataset("image-folder", CIFAR_JPEG, cache_dir=cache)  # same entry, by path
    second = time.perf_counter() - start
    assert again.name == "cifar10-jpeg"
    assert torch.equal(again.train_x, ds.train_x)
    assert torch.equal(again.test_y, ds.test_y)
    assert second < max(3.0, first / 4), (first, second)
