"""bench/accuracy/data.py: IDX and CIFAR readers, the data-folder search, checksums."""

from __future__ import annotations

import gzip
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # bench/ is not an installed package

from bench.accuracy import data  # noqa: E402

SHARED = REPO.parent / "shared" / "data"


def write_idx(path: Path, array: np.ndarray, code: int = 0x08, compress: bool = True) -> Path:
    """An IDX file: 0, 0, type code, ndim, big-endian sizes, big-endian data."""
    dtype = np.dtype(data._IDX_DTYPES[code])
    payload = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload += array.astype(dtype).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)
    return path


def write_fake_mnist(folder: Path, name: str = "mnist", n_train: int = 12, n_test: int = 5) -> None:
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / name / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(folder / name / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, n))


def write_cifar(path: Path, labels: list[tuple[int, ...]]) -> np.ndarray:
    """CIFAR records (label bytes + 3072 pixels); returns the images written."""
    rng = np.random.default_rng(len(labels))
    images = rng.integers(0, 256, (len(labels), 3, 32, 32), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(bytes(lab) + img.tobytes() for lab, img in zip(labels, images)))
    return images


# --- IDX -------------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_roundtrip_images_and_labels(tmp_path: Path, compress: bool) -> None:
    images = np.arange(3 * 28 * 28).reshape(3, 28, 28) % 256
    labels = np.array([7, 0, 9])
    suffix = ".gz" if compress else ""
    got_images = data.read_idx(write_idx(tmp_path / f"img{suffix}", images, compress=compress))
    got_labels = data.read_idx(write_idx(tmp_path / f"lab{suffix}", labels, compress=compress))
    assert got_images.shape == (3, 28, 28) and got_images.dtype == np.uint8
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)


def test_read_idx_other_dtypes_are_big_endian(tmp_path: Path) -> None:
    values = np.array([[1.5, -2.0], [1e6, 3.25]])
    got = data.read_idx(write_idx(tmp_path / "f.gz", values, code=0x0D))
    np.testing.assert_array_equal(got, values.astype(np.float32))
    ints = np.array([-70000, 5, 123456])
    np.testing.assert_array_equal(data.read_idx(write_idx(tmp_path / "i.gz", ints, code=0x0C)), ints)


def test_read_idx_rejects_bad_magic_and_truncation(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gz"
    with gzip.open(bad, "wb") as f:
        f.write(b"\x01\x02\x08\x01" + b"\x00" * 8)
    with pytest.raises(data.DataError, match="not an IDX file"):
        data.read_idx(bad)
    good = write_idx(tmp_path / "x", np.zeros((2, 4, 4)), compress=False)
    good.write_bytes(good.read_bytes()[:-3])
    with pytest.raises(data.DataError, match="size mismatch"):
        data.read_idx(good)


# --- CIFAR -----------------------------------------------------------------------------------


def test_read_cifar10_records(tmp_path: Path) -> None:
    images = write_cifar(tmp_path / "b.bin", [(3,), (9,), (0,)])
    x, y = data.read_cifar_bin(tmp_path / "b.bin")
    assert x.shape == (3, 3, 32, 32) and x.dtype == np.uint8
    np.testing.assert_array_equal(x, images)
    np.testing.assert_array_equal(y, [3, 9, 0])


def test_read_cifar100_takes_the_fine_label(tmp_path: Path) -> None:
    images = write_cifar(tmp_path / "train.bin", [(1, 42), (19, 99)])
    x, y = data.read_cifar_bin(tmp_path / "train.bin", label_bytes=2, label_index=1)
    np.testing.assert_array_equal(x, images)
    np.testing.assert_array_equal(y, [42, 99])
    _, coarse = data.read_cifar_bin(tmp_path / "train.bin", label_bytes=2, label_index=0)
    np.testing.assert_array_equal(coarse, [1, 19])


def test_read_cifar_rejects_partial_records(tmp_path: Path) -> None:
    write_cifar(tmp_path / "b.bin", [(1,), (2,)])
    path = tmp_path / "b.bin"
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(data.DataError, match="whole number"):
        data.read_cifar_bin(path)


def test_cifar10_dataset_from_batches(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-bin"
    for i in range(1, 6):
        write_cifar(folder / f"data_batch_{i}.bin", [(i,), (i + 1,)])
    write_cifar(folder / "test_batch.bin", [(7,)])
    ds = data._read("cifar10", tmp_path)
    assert ds.x_train.shape == (10, 3, 32, 32) and ds.x_test.shape == (1, 3, 32, 32)
    assert ds.classes == 10 and ds.y_train.tolist() == [1, 2, 2, 3, 3, 4, 4, 5, 5, 6]
    assert 0.0 <= float(ds.x_train.min()) and float(ds.x_train.max()) <= 1.0


def test_cifar_size_check(tmp_path: Path) -> None:
    write_cifar(tmp_path / "cifar-10-batches-bin" / "test_batch.bin", [(1,)])
    with pytest.raises(data.DataError, match="30,730,000"):
        data.verify(tmp_path, "cifar-10-batches-bin/test_batch.bin")


# --- locating files, checksums ---------------------------------------------------------------


def test_missing_file_error_names_file_and_checksum(tmp_path: Path) -> None:
    with pytest.raises(data.DataError) as info:
        data.find_data_dir("mnist", tmp_path)
    message = str(info.value)
    assert "train-images-idx3-ubyte.gz" in message
    assert data.SHA256["mnist/train-images-idx3-ubyte.gz"] in message
    assert str(tmp_path) in message and "--data-dir" in message


def test_search_order_env_var_then_shared(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path))
    origins = [origin for origin, _ in data.search_dirs()]
    assert origins == [f"${data.ENV_VAR}", "<repo>/../shared/data", "./data"]
    write_fake_mnist(tmp_path)
    assert data.find_data_dir("mnist") == tmp_path
    # an explicit --data-dir is the only place looked at
    assert [o for o, _ in data.search_dirs(tmp_path / "x")] == ["--data-dir"]


def test_wrong_checksum_is_refused(tmp_path: Path) -> None:
    write_fake_mnist(tmp_path)
    with pytest.raises(data.DataError, match="SHA256 .* does not match"):
        data.load("mnist", tmp_path)


def test_checksums_match_shared_sums_file() -> None:
    sums = SHARED / "SHA256SUMS"
    if not sums.exists():
        pytest.skip("shared/data is not beside this checkout")
    listed = dict(reversed(line.split()) for line in sums.read_text().splitlines() if line.strip())
    assert listed == data.SHA256


def test_real_files_pass_the_checksum_and_load() -> None:
    if not SHARED.is_dir():
        pytest.skip("shared/data is not beside this checkout")
    for rel in data.SHA256:
        data.verify(SHARED, rel)
    ds = data.load("fashion-mnist", SHARED)
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert torch.bincount(ds.y_train).tolist() == [6000] * 10
    assert torch.bincount(ds.y_test).tolist() == [1000] * 10
    mnist = data.load("mnist", SHARED)
    assert abs(float(mnist.x_train.mean()) - 0.1307) < 1e-3  # the well-known MNIST mean


# --- batching and subsets --------------------------------------------------------------------


def test_batches_cover_every_index_once() -> None:
    gen = torch.Generator().manual_seed(0)
    parts = list(data.batches(10, 4, gen))
    assert [len(p) for p in parts] == [4, 4, 2]
    assert sorted(torch.cat(parts).tolist()) == list(range(10))
    again = list(data.batches(10, 4, torch.Generator().manual_seed(0)))
    assert all(torch.equal(a, b) for a, b in zip(parts, again))


def test_subset_is_deterministic(tmp_path: Path) -> None:
    write_fake_mnist(tmp_path)
    ds = data._read("mnist", tmp_path)
    a, b = ds.subset(5, 2, seed=3, balanced=False), ds.subset(5, 2, seed=3, balanced=False)
    assert a.x_train.shape == (5, 1, 28, 28) and a.x_test.shape == (2, 1, 28, 28)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)


def test_balanced_subset_keeps_chance_at_one_in_ten() -> None:
    y = torch.arange(1000) % 10
    ds = data.Dataset("toy", y.float().view(-1, 1, 1, 1), y, y.float().view(-1, 1, 1, 1), y, 10)
    sub = ds.subset(200, 50, seed=0)
    assert torch.bincount(sub.y_train).tolist() == [20] * 10
    assert torch.bincount(sub.y_test).tolist() == [5] * 10
    assert torch.equal(sub.x_train.view(-1).long(), sub.y_train)  # images stay with their labels
