"""Tests of where datasets are found, the decoded-array cache, and the checked download.

Search order (data_dir, then ``$BIGBATCH_DATA_DIR``, then the system dir, then the user
cache), the one "not found" message, cache hits, invalidation and rebuilds, and downloads
from an ``http.server`` on 127.0.0.1 serving files the tests write (idx files and a CIFAR
archive), including a corrupt download. Home, system and cache dirs all live in tmp_path.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import torch

from bigbatch.train.data import DatasetError, cifar_pickle, idx, load_dataset, sources
from tests.http_server import Server

SPEC = idx.MNIST


def md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv(sources.ENV_VAR, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home" / ".cache"))
    monkeypatch.setattr(sources, "SYSTEM_ROOT", tmp_path / "system")
    monkeypatch.setattr(sources, "USER_ROOT", tmp_path / "home" / ".cache" / "bigbatch")
    for var in ("no_proxy", "NO_PROXY"):  # never send 127.0.0.1 through a proxy
        monkeypatch.setenv(var, "*")
    return tmp_path


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "decoded"


def idx_bytes(arr: npt.NDArray[np.uint8]) -> bytes:
    magic = (0x08 << 8) | arr.ndim
    dims = b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return magic.to_bytes(4, "big") + dims + arr.tobytes()


@pytest.fixture
def tiny(monkeypatch: pytest.MonkeyPatch) -> dict[str, bytes]:
    """Gzip bytes of tiny MNIST files (3 train, 2 test); the spec patched to accept them."""
    rng = np.random.default_rng(0)
    arrays = {
        idx.TRAIN_IMAGES: rng.integers(0, 256, (3, 28, 28), dtype=np.uint8),
        idx.TRAIN_LABELS: np.array([1, 2, 3], dtype=np.uint8),
        idx.TEST_IMAGES: rng.integers(0, 256, (2, 28, 28), dtype=np.uint8),
        idx.TEST_LABELS: np.array([7, 8], dtype=np.uint8),
    }
    gz = {name: gzip.compress(idx_bytes(a), mtime=0) for name, a in arrays.items()}
    for name, data in gz.items():
        monkeypatch.setitem(SPEC.gz_md5, name, md5(data))
    monkeypatch.setitem(SPEC.split_sizes, "train", 3)
    monkeypatch.setitem(SPEC.split_sizes, "test", 2)
    return gz


def write(directory: Path, files: dict[str, bytes], names: tuple[str, ...] | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name in files if names is None else names:
        (directory / name).write_bytes(files[name])
    return directory


# ------------------------------------------------------------------------- search order
def test_search_order(
    tiny: dict[str, bytes], tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    explicit = write(tmp_path / "explicit", tiny)
    env = write(tmp_path / "env" / "mnist", tiny)  # the per-dataset subfolder layout
    system = write(tmp_path / "system" / "mnist", tiny)
    user = write(tmp_path / "home" / ".cache" / "bigbatch" / "mnist", tiny)
    monkeypatch.setenv(sources.ENV_VAR, str(tmp_path / "env"))
    assert load_dataset("mnist", explicit, cache_dir=cache).source == str(explicit)
    assert load_dataset("mnist", cache_dir=cache).source == str(env)
    # An explicit directory without the files falls through to the next place.
    assert load_dataset("mnist", tmp_path / "empty", cache_dir=cache).source == str(env)
    monkeypatch.delenv(sources.ENV_VAR)
    assert load_dataset("mnist", cache_dir=cache).source == str(system)
    for p in system.iterdir():
        p.unlink()
    assert load_dataset("mnist", cache_dir=cache).source == str(user)
    assert sources.search_dirs("mnist", explicit, subdirs=("sub",)) == [
        explicit,
        explicit / "sub",
        explicit / "mnist",
        explicit / "mnist" / "sub",
        system,
        system / "sub",
        user,
        user / "sub",
    ]


def test_missing_message(
    tiny: dict[str, bytes], tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = write(tmp_path / "data", tiny, names=(idx.TRAIN_IMAGES, idx.TEST_IMAGES))
    monkeypatch.setenv(sources.ENV_VAR, str(tmp_path / "env"))
    with pytest.raises(DatasetError) as info:
        load_dataset("mnist", d, cache_dir=cache)
    text = str(info.value)
    assert text.startswith("MNIST not found")
    assert f"{d}  (missing: {idx.TRAIN_LABELS}, {idx.TEST_LABELS})" in text
    assert f"{d / 'mnist'}  (no such directory)" in text
    assert f"{tmp_path / 'env'}  (no such directory)" in text
    assert str(tmp_path / "system" / "mnist") in text
    assert str(tmp_path / "home" / ".cache" / "bigbatch" / "mnist") in text
    for hint in ("--data-dir", "BIGBATCH_DATA_DIR", "download=True", idx.BASE_URLS["mnist"]):
        assert hint in text
    assert "load_dataset('digits')" in text  # offline fallback named, never taken silently
    assert not cache.exists()


def test_missing_cifar10_mentions_jpeg_and_apt(tmp_path: Path, cache: Path) -> None:
    with pytest.raises(DatasetError) as info:
        load_dataset("cifar10", tmp_path / "nothing", cache_dir=cache)
    text = str(info.value)
    assert "cifar10-jpeg.tar.xz" in text
    assert f"{tmp_path / 'nothing' / 'cifar-10-batches-py'}  (no such directory)" in text
    assert "digits" in text
    with pytest.raises(DatasetError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", cache_dir=cache)


# ------------------------------------------------------------------------- cache
def test_cache_hit_and_invalidation(
    tiny: dict[str, bytes], tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = write(tmp_path / "data", tiny)
    calls: list[Path] = []
    real = idx.load_idx_dir

    def counting(spec: idx.IdxSpec, source: Path) -> Any:
        calls.append(source)
        return real(spec, source)

    monkeypatch.setattr(idx, "load_idx_dir", counting)
    first = load_dataset("mnist", d, cache_dir=cache)
    assert len(calls) == 1
    (entry,) = cache.glob("mnist-*.npz")
    assert not [p for p in cache.iterdir() if p.suffix == ".part"]
    second = load_dataset("mnist", d, cache_dir=cache)
    assert len(calls) == 1, "second load must come from the cache"
    for a, b in zip(
        (first.train_x, first.train_y, first.test_x, first.test_y),
        (second.train_x, second.train_y, second.test_x, second.test_y),
        strict=True,
    ):
        assert torch.equal(a, b)
    assert (second.classes, second.mean, second.std, second.source) == (
        first.classes,
        first.mean,
        first.std,
        first.source,
    )
    # A source file's mtime changes: the entry is rebuilt in place.
    path = d / idx.TEST_LABELS
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    load_dataset("mnist", d, cache_dir=cache)
    assert len(calls) == 2
    assert list(cache.glob("mnist-*.npz")) == [entry]
    load_dataset("mnist", d, cache_dir=cache)
    assert len(calls) == 2
    # A new loader version, or a changed checksum table: rebuilt as well.
    monkeypatch.setattr(idx, "LOADER_VERSION", idx.LOADER_VERSION + 1)
    load_dataset("mnist", d, cache_dir=cache)
    assert len(calls) == 3
    monkeypatch.setitem(SPEC.gz_md5, "unused-file", "0" * 32)
    load_dataset("mnist", d, cache_dir=cache)
    assert len(calls) == 4
    # Another source directory gets its own entry.
    other = write(tmp_path / "other", tiny)
    assert load_dataset("mnist", other, cache_dir=cache).source == str(other)
    assert len(list(cache.glob("mnist-*.npz"))) == 2


@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong-dtype"])
def test_corrupt_cache_is_rebuilt(
    damage: str,
    tiny: dict[str, bytes],
    tmp_path: Path,
    cache: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    d = write(tmp_path / "data", tiny)
    good = load_dataset("mnist", d, cache_dir=cache)
    (entry,) = cache.glob("*.npz")
    data = entry.read_bytes()
    if damage == "garbage":
        entry.write_bytes(b"not a zip file")
    elif damage == "truncated":
        entry.write_bytes(data[: len(data) // 2])
    else:
        with np.load(entry) as z:
            arrays = {k: z[k] for k in z.files}
        arrays["train_x"] = arrays["train_x"].astype(np.float32)
        np.savez(entry, **arrays)
    with caplog.at_level("WARNING"):
        again = load_dataset("mnist", d, cache_dir=cache)
    assert "unreadable" in caplog.text
    assert torch.equal(again.train_x, good.train_x)
    with np.load(entry) as z:  # rewritten whole
        assert z["train_x"].dtype == np.uint8


def test_default_cache_dir_is_under_home(tiny: dict[str, bytes], tmp_path: Path) -> None:
    d = write(tmp_path / "data", tiny)
    load_dataset("mnist", d)
    assert (
        len(list((tmp_path / "home" / ".cache" / "bigbatch" / "decoded").glob("mnist-*.npz"))) == 1
    )


def test_unwritable_cache_is_not_fatal(
    tiny: dict[str, bytes], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    d = write(tmp_path / "data", tiny)
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache directory should be")
    with caplog.at_level("WARNING"):
        ds = load_dataset("mnist", d, cache_dir=blocker / "decoded")
    assert ds.train_y.tolist() == [1, 2, 3]
    assert "could not write the cache" in caplog.text


# ------------------------------------------------------------------------- download
@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    srv = Server(tmp_path / "www")
    (srv.root / "files").mkdir(parents=True)
    srv.thread.start()
    try:
        yield srv
    finally:
        srv.httpd.shutdown()
        srv.httpd.server_close()
        srv.thread.join(timeout=5)


def leftovers(d: Path) -> list[str]:
    return [p.name for p in d.rglob("*") if p.name.startswith(".") or p.suffix == ".part"]


def test_download_idx(
    tiny: dict[str, bytes],
    server: Server,
    tmp_path: Path,
    cache: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    write(server.root / "files", tiny)
    monkeypatch.setitem(idx.BASE_URLS, "mnist", server.url.rstrip("/"))
    ds = load_dataset("mnist", download=True, cache_dir=cache)
    target = tmp_path / "home" / ".cache" / "bigbatch" / "mnist"
    assert ds.source == str(target)
    assert sorted(p.name for p in target.iterdir()) == sorted(idx.FILES)
    assert sorted(r.rsplit("/", 1)[-1] for r in server.requests) == sorted(idx.FILES)
    assert ds.test_y.tolist() == [7, 8]
    # Found now: no second download, with or without download=True.
    server.requests.clear()
    assert load_dataset("mnist", download=True, cache_dir=cache).source == str(target)
    assert load_dataset("mnist", cache_dir=cache).source == str(target)
    assert server.requests == []


def test_download_into_data_dir_only_missing(
    tiny: dict[str, bytes],
    server: Server,
    tmp_path: Path,
    cache: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    write(server.root / "files", tiny)
    monkeypatch.setitem(idx.BASE_URLS, "mnist", server.url)
    target = write(tmp_path / "dl", tiny, names=(idx.TRAIN_IMAGES,))
    ds = load_dataset("mnist", target, download=True, cache_dir=cache)
    assert ds.source == str(target)
    assert sorted(r.rsplit("/", 1)[-1] for r in server.requests) == sorted(
        set(idx.FILES) - {idx.TRAIN_IMAGES}
    )


def test_download_checksum_mismatch(
    tiny: dict[str, bytes],
    server: Server,
    tmp_path: Path,
    cache: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    files = dict(tiny)
    files[idx.TEST_IMAGES] = tiny[idx.TEST_IMAGES][:-20]  # a corrupt copy on the server
    write(server.root / "files", files)
    monkeypatch.setitem(idx.BASE_URLS, "mnist", server.url)
    target = tmp_path / "dl"
    with pytest.raises(DatasetError) as info:
        load_dataset("mnist", target, download=True, cache_dir=cache)
    text = str(info.value)
    assert server.url + idx.TEST_IMAGES in text
    assert f"md5 {md5(files[idx.TEST_IMAGES])}, expected {SPEC.gz_md5[idx.TEST_IMAGES]}" in text
    assert not (target / idx.TEST_IMAGES).exists()
    assert leftovers(target) == []
    assert not cache.exists()


def test_download_offline_message(
    tiny: dict[str, bytes], tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Port 9 (discard) on 127.0.0.1: nothing listens there; the request fails like offline.
    monkeypatch.setitem(idx.BASE_URLS, "mnist", "http://127.0.0.1:9/")
    target = tmp_path / "dl"
    with pytest.raises(DatasetError) as info:
        load_dataset("mnist", target, download=True, cache_dir=cache)
    text = str(info.value)
    assert (
        f"downloading http://127.0.0.1:9/{idx.TRAIN_IMAGES} to {target / idx.TRAIN_IMAGES} failed"
        in text
    )
    assert "offline" in text
    assert "load_dataset('digits')" in text
    assert leftovers(target) == []


def cifar_archive(monkeypatch: pytest.MonkeyPatch) -> tuple[bytes, npt.NDArray[np.uint8]]:
    """A cifar-10-python.tar.gz with tiny batches; the spec patched to accept them."""
    spec = cifar_pickle.CIFAR10
    rng = np.random.default_rng(2)
    buf = io.BytesIO()
    xs = []
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name in spec.files:
            if name == spec.meta_file:
                obj: dict[bytes, Any] = {b"label_names": [b"c%d" % i for i in range(10)]}
            else:
                data = rng.integers(0, 256, (1, 3072), dtype=np.uint8)
                xs.append(data)
                obj = {b"data": data, b"labels": [len(xs) % 10]}
            blob = pickle.dumps(obj, protocol=2)
            monkeypatch.setitem(spec.md5, name, md5(blob))
            info = tarfile.TarInfo(f"{spec.folder}/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
        evil = tarfile.TarInfo("../escaped.txt")  # never extracted
        evil.size = 1
        tar.addfile(evil, io.BytesIO(b"x"))
    monkeypatch.setitem(spec.split_sizes, "train", 5)
    monkeypatch.setitem(spec.split_sizes, "test", 1)
    archive = buf.getvalue()
    monkeypatch.setitem(spec.archive_md5, spec.archive, md5(archive))
    return archive, np.concatenate(xs).reshape(-1, 3, 32, 32)


def test_download_cifar(
    server: Server, tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive, x = cifar_archive(monkeypatch)
    (server.root / "files" / "cifar-10-python.tar.gz").write_bytes(archive)
    monkeypatch.setitem(cifar_pickle.URLS, "cifar10", server.url + "cifar-10-python.tar.gz")
    target = tmp_path / "dl"
    ds = load_dataset("cifar10", target, download=True, cache_dir=cache)
    assert ds.name == "cifar10"
    assert ds.source == str(target / "cifar-10-batches-py")
    assert np.array_equal(ds.train_x.numpy(), x[:5])
    assert np.array_equal(ds.test_x.numpy(), x[5:])
    assert ds.classes == tuple(f"c{i}" for i in range(10))
    assert sorted(p.name for p in target.iterdir()) == ["cifar-10-batches-py"]  # archive removed
    assert not (tmp_path / "escaped.txt").exists()
    server.requests.clear()
    load_dataset("cifar10", target, download=True, cache_dir=cache)
    assert server.requests == []


def test_download_cifar_corrupt(
    server: Server, tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive, _ = cifar_archive(monkeypatch)
    (server.root / "files" / "cifar-10-python.tar.gz").write_bytes(archive[:-100])
    monkeypatch.setitem(cifar_pickle.URLS, "cifar10", server.url + "cifar-10-python.tar.gz")
    target = tmp_path / "dl"
    with pytest.raises(DatasetError, match="failed verification") as info:
        load_dataset("cifar10", target, download=True, cache_dir=cache)
    assert "cifar-10-python.tar.gz" in str(info.value)
    assert not (target / "cifar-10-python.tar.gz").exists()
    assert not (target / "cifar-10-batches-py").exists()
    assert leftovers(target) == []
