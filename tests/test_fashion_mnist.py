"""Tests of the Fashion-MNIST loader: decoding, verification, search order and download.

Most tests write tiny idx gzip files themselves and patch the module's md5 tables and
split sizes to match; one test loads the real files from ``shared/data/fashion-mnist``
beside the repository; the download tests run against an ``http.server`` on 127.0.0.1.
"""

from __future__ import annotations

import gzip
import hashlib
import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import torch

from bigbatch.train import DatasetError, FashionMNIST, load_fashion_mnist
from bigbatch.train.data import fashion_mnist as fm
from tests.http_server import Server

REAL_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "fashion-mnist"
SIZES = {"train": 6, "test": 4}


# ------------------------------------------------------------------------- helpers
def idx_bytes(arr: npt.NDArray[np.uint8]) -> bytes:
    """The uncompressed idx encoding of a uint8 array (magic from its number of dims)."""
    magic = (0x08 << 8) | arr.ndim
    dims = b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return magic.to_bytes(4, "big") + dims + arr.tobytes()


def md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


@dataclass
class Tiny:
    """Tiny dataset: raw idx bytes and gzip bytes per file name, and the arrays."""

    raw: dict[str, bytes]
    gz: dict[str, bytes]
    arrays: dict[str, npt.NDArray[np.uint8]]

    def write(self, directory: Path, names: tuple[str, ...] = fm.FILES) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        for name in names:
            (directory / name).write_bytes(self.gz[name])
        return directory


def make_tiny(seed: int = 0) -> Tiny:
    rng = np.random.default_rng(seed)
    arrays = {
        fm.TRAIN_IMAGES: rng.integers(0, 256, (SIZES["train"], 28, 28), dtype=np.uint8),
        fm.TRAIN_LABELS: rng.integers(0, 10, SIZES["train"], dtype=np.uint8),
        fm.TEST_IMAGES: rng.integers(0, 256, (SIZES["test"], 28, 28), dtype=np.uint8),
        fm.TEST_LABELS: rng.integers(0, 10, SIZES["test"], dtype=np.uint8),
    }
    arrays[fm.TRAIN_IMAGES][0, 0, :2] = (0, 255)  # both ends of the pixel range
    raw = {name: idx_bytes(a) for name, a in arrays.items()}
    gz = {name: gzip.compress(b, mtime=0) for name, b in raw.items()}
    return Tiny(raw, gz, arrays)


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No env var, and the system and cache directories point at empty temp paths."""
    monkeypatch.delenv(fm.ENV_VAR, raising=False)
    monkeypatch.setattr(fm, "SYSTEM_DIR", tmp_path / "system")
    monkeypatch.setattr(fm, "CACHE_DIR", tmp_path / "cache")
    return tmp_path


@pytest.fixture
def tiny(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> Tiny:
    """A tiny dataset whose md5s and sizes the module is patched to expect."""
    data = make_tiny()
    for name in fm.FILES:
        monkeypatch.setitem(fm.RAW_MD5, name, md5(data.raw[name]))
        monkeypatch.setitem(fm.GZ_MD5, name, md5(data.gz[name]))
    for split, size in SIZES.items():
        monkeypatch.setitem(fm.SPLIT_SIZES, split, size)
    return data


def check_matches(ds: FashionMNIST, data: Tiny) -> None:
    for x, name in ((ds.train_x, fm.TRAIN_IMAGES), (ds.test_x, fm.TEST_IMAGES)):
        a = data.arrays[name]
        assert x.dtype == torch.float32
        assert x.shape == (len(a), 1, 28, 28)
        expected = torch.from_numpy(a.astype(np.float32) / np.float32(255.0)).unsqueeze(1)
        torch.testing.assert_close(x, expected, rtol=0, atol=1e-7)
    assert float(ds.train_x.min()) == 0.0
    assert float(ds.train_x.max()) == 1.0
    for y, name in ((ds.train_y, fm.TRAIN_LABELS), (ds.test_y, fm.TEST_LABELS)):
        assert y.dtype == torch.int64
        assert y.tolist() == data.arrays[name].tolist()


# ------------------------------------------------------------------------- decoding
def test_decodes_tiny_files(tiny: Tiny, tmp_path: Path) -> None:
    d = tiny.write(tmp_path / "data")
    ds = load_fashion_mnist(d)
    check_matches(ds, tiny)
    assert ds.source == d
    with pytest.raises(AttributeError):
        ds.train_x = ds.test_x  # type: ignore[misc]  # frozen


def test_recompressed_files_pass(tiny: Tiny, tmp_path: Path) -> None:
    """Different gzip bytes, same content (as in Debian's package): md5 is of the content."""
    d = tmp_path / "debian"
    d.mkdir()
    for name in fm.FILES:
        buf = io.BytesIO()
        with gzip.GzipFile(filename=name[:-3], mode="wb", compresslevel=1, fileobj=buf,
                           mtime=1_234_567) as f:  # fmt: skip
            f.write(tiny.raw[name])
        assert md5(buf.getvalue()) != fm.GZ_MD5[name]
        (d / name).write_bytes(buf.getvalue())
    check_matches(load_fashion_mnist(d), tiny)


def test_read_idx_header(tmp_path: Path) -> None:
    arr = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
    path = tmp_path / "x.gz"
    path.write_bytes(gzip.compress(idx_bytes(arr)))
    out = fm.read_idx(path, magic=fm.IDX_IMAGES_MAGIC, expected_md5=None)
    assert out.shape == (2, 3, 5)
    np.testing.assert_array_equal(out, arr)
    with pytest.raises(DatasetError, match="magic number 2051, expected 2049"):
        fm.read_idx(path, magic=fm.IDX_LABELS_MAGIC, expected_md5=None)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"\x00\x00", "too short for an idx header"),
        ((2049).to_bytes(4, "big") + b"\x00\x00", "too short for a 1-d idx header"),
        ((2049).to_bytes(4, "big") + (5).to_bytes(4, "big") + b"\x01" * 4, "needs 13"),
        ((2049).to_bytes(4, "big") + (5).to_bytes(4, "big") + b"\x01" * 6, "needs 13"),
    ],
)
def test_read_idx_rejects_bad_headers(tmp_path: Path, raw: bytes, message: str) -> None:
    path = tmp_path / "bad.gz"
    path.write_bytes(gzip.compress(raw))
    with pytest.raises(DatasetError, match=message):
        fm.read_idx(path, magic=fm.IDX_LABELS_MAGIC, expected_md5=md5(raw))


def test_wrong_sample_count(tiny: Tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(fm.SPLIT_SIZES, "test", 5)
    with pytest.raises(DatasetError, match=r"t10k-images.*expected \(5, 28, 28\)"):
        load_fashion_mnist(tiny.write(tmp_path / "data"))


def test_label_out_of_range(tiny: Tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = tiny.write(tmp_path / "data")
    raw = idx_bytes(np.array([0, 1, 10, 2], dtype=np.uint8))
    (d / fm.TEST_LABELS).write_bytes(gzip.compress(raw))
    monkeypatch.setitem(fm.RAW_MD5, fm.TEST_LABELS, md5(raw))
    with pytest.raises(DatasetError, match="label 10 outside"):
        load_fashion_mnist(d)


# ------------------------------------------------------------------------- corrupt files
def test_truncated_file(tiny: Tiny, tmp_path: Path) -> None:
    d = tiny.write(tmp_path / "data")
    gz = tiny.gz[fm.TRAIN_IMAGES]
    (d / fm.TRAIN_IMAGES).write_bytes(gz[: len(gz) // 2])
    with pytest.raises(DatasetError) as info:
        load_fashion_mnist(d)
    text = str(info.value)
    assert str(d / fm.TRAIN_IMAGES) in text
    assert "corrupt or truncated" in text
    assert fm.RAW_MD5[fm.TRAIN_IMAGES] in text


def test_not_gzip(tiny: Tiny, tmp_path: Path) -> None:
    d = tiny.write(tmp_path / "data")
    (d / fm.TEST_LABELS).write_bytes(b"<html>404 Not Found</html>")
    with pytest.raises(DatasetError, match=r"t10k-labels-idx1-ubyte\.gz is corrupt"):
        load_fashion_mnist(d)


def test_corrupt_content(tiny: Tiny, tmp_path: Path) -> None:
    """A well-formed gzip file with one flipped pixel fails the content md5."""
    d = tiny.write(tmp_path / "data")
    raw = bytearray(tiny.raw[fm.TEST_IMAGES])
    raw[-1] ^= 0xFF
    (d / fm.TEST_IMAGES).write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(DatasetError) as info:
        load_fashion_mnist(d)
    text = str(info.value)
    assert str(d / fm.TEST_IMAGES) in text
    assert f"md5 of its decompressed content is {md5(bytes(raw))}" in text
    assert fm.RAW_MD5[fm.TEST_IMAGES] in text


def test_real_md5s_are_enforced(tmp_path: Path, isolated: Path) -> None:
    """Without patching, tiny files are rejected by the official content md5."""
    d = make_tiny().write(tmp_path / "data")
    with pytest.raises(DatasetError, match="f4a8712d7a061bf5bd6d2ca38dc4d50a"):
        load_fashion_mnist(d)


# ------------------------------------------------------------------------- search order
def test_missing_file_message(tiny: Tiny, tmp_path: Path) -> None:
    d = tiny.write(tmp_path / "data", names=(fm.TRAIN_IMAGES, fm.TRAIN_LABELS, fm.TEST_IMAGES))
    with pytest.raises(DatasetError) as info:
        load_fashion_mnist(d)
    text = str(info.value)
    assert f"{d}  (missing: {fm.TEST_LABELS})" in text
    assert f"{d / 'fashion-mnist'}  (no such directory)" in text
    assert str(fm.SYSTEM_DIR) in text
    assert str(fm.CACHE_DIR) in text
    for hint in ("--data-dir", "BIGBATCH_DATA_DIR", "apt-get install dataset-fashion-mnist",
                 "download=True"):  # fmt: skip
        assert hint in text


def test_env_var_and_subfolder(tiny: Tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "datasets"
    tiny.write(root / "fashion-mnist")
    monkeypatch.setenv(fm.ENV_VAR, str(root))
    ds = load_fashion_mnist()
    assert ds.source == root / "fashion-mnist"
    check_matches(ds, tiny)


def test_search_order(tiny: Tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    explicit = tiny.write(tmp_path / "explicit")
    env = tiny.write(tmp_path / "env")
    system = tiny.write(tmp_path / "system")
    monkeypatch.setenv(fm.ENV_VAR, str(env))
    assert load_fashion_mnist(explicit).source == explicit
    assert load_fashion_mnist().source == env
    # An explicit directory without the files falls through to the next place.
    assert load_fashion_mnist(tmp_path / "empty").source == env
    monkeypatch.delenv(fm.ENV_VAR)
    assert load_fashion_mnist().source == system
    assert fm.candidate_dirs(explicit) == [
        explicit,
        explicit / "fashion-mnist",
        system,
        fm.CACHE_DIR,
    ]


# ------------------------------------------------------------------------- real data
@pytest.mark.slow
def test_real_files() -> None:
    assert REAL_DIR.is_dir(), (
        f"the real Fashion-MNIST files are expected in {REAL_DIR} (shared/ beside the "
        "repository root); put the four official .gz files there"
    )
    ds = load_fashion_mnist(REAL_DIR)
    assert ds.source == REAL_DIR
    assert ds.train_x.shape == (60_000, 1, 28, 28)
    assert ds.test_x.shape == (10_000, 1, 28, 28)
    assert ds.train_x.dtype == ds.test_x.dtype == torch.float32
    assert ds.train_y.dtype == ds.test_y.dtype == torch.int64
    assert float(ds.train_x.min()) == 0.0
    assert float(ds.train_x.max()) == 1.0
    assert abs(float(ds.train_x.mean()) - 0.2860) < 1e-3
    assert ds.train_y.bincount().tolist() == [6000] * 10
    assert ds.test_y.bincount().tolist() == [1000] * 10
    assert ds.train_y[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
    assert ds.test_y[:10].tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]


# ------------------------------------------------------------------------- download
@pytest.fixture
def server(tiny: Tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    for var in ("no_proxy", "NO_PROXY"):  # never send 127.0.0.1 through a proxy
        monkeypatch.setenv(var, "*")
    srv = Server(tmp_path / "www")
    tiny.write(srv.root / "files")
    srv.thread.start()
    try:
        yield srv
    finally:
        srv.httpd.shutdown()
        srv.httpd.server_close()
        srv.thread.join(timeout=5)


def no_leftovers(d: Path) -> bool:
    return not [p for p in d.iterdir() if p.name.startswith(".") or p.suffix == ".part"]


def test_download_into_data_dir(tiny: Tiny, server: Server, tmp_path: Path) -> None:
    target = tmp_path / "dl" / "nested"
    ds = load_fashion_mnist(target, download=True, base_url=server.url)
    check_matches(ds, tiny)
    assert ds.source == target
    assert sorted(p.name for p in target.iterdir()) == sorted(fm.FILES)
    assert server.fetched() == sorted(fm.FILES)
    # A second load finds the files and does not download again.
    server.requests.clear()
    assert load_fashion_mnist(target, download=True, base_url=server.url).source == target
    assert server.requests == []


def test_download_base_url_constant_and_cache(
    tiny: Tiny, server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fm, "BASE_URL", server.url.rstrip("/"))  # no trailing slash
    ds = load_fashion_mnist(download=True)
    assert ds.source == fm.CACHE_DIR
    check_matches(ds, tiny)
    # Without download=True, the cache is found on the next call.
    assert load_fashion_mnist().source == fm.CACHE_DIR


def test_download_only_missing_files(tiny: Tiny, server: Server, tmp_path: Path) -> None:
    target = tiny.write(tmp_path / "partial", names=(fm.TRAIN_IMAGES, fm.TEST_IMAGES))
    check_matches(load_fashion_mnist(target, download=True, base_url=server.url), tiny)
    assert server.fetched() == sorted([fm.TRAIN_LABELS, fm.TEST_LABELS])


def test_download_checksum_mismatch(
    tiny: Tiny, server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wrong = "0" * 32
    monkeypatch.setitem(fm.GZ_MD5, fm.TEST_IMAGES, wrong)
    target = tmp_path / "dl"
    with pytest.raises(DatasetError) as info:
        load_fashion_mnist(target, download=True, base_url=server.url)
    text = str(info.value)
    assert server.url + fm.TEST_IMAGES in text
    assert f"md5 {md5(tiny.gz[fm.TEST_IMAGES])}, expected {wrong}" in text
    assert not (target / fm.TEST_IMAGES).exists()
    assert no_leftovers(target)


def test_download_http_error(tiny: Tiny, server: Server, tmp_path: Path) -> None:
    (server.root / "files" / fm.TRAIN_LABELS).unlink()
    target = tmp_path / "dl"
    with pytest.raises(DatasetError, match=r"train-labels-idx1-ubyte\.gz .*failed.*404"):
        load_fashion_mnist(target, download=True, base_url=server.url)
    assert not (target / fm.TRAIN_LABELS).exists()
    assert no_leftovers(target)


def test_found_files_need_no_network(tiny: Tiny, tmp_path: Path) -> None:
    d = tiny.write(tmp_path / "data")
    # Port 9 (discard) on 127.0.0.1: nothing listens there; any request would fail.
    check_matches(load_fashion_mnist(d, download=True, base_url="http://127.0.0.1:9/"), tiny)
