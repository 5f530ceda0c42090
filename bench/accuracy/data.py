"""Datasets for the accuracy experiments: IDX (MNIST, Fashion-MNIST) and CIFAR binary readers.

Nothing is downloaded. The files are looked up in, in order: the ``--data-dir`` option,
``$FASTOPT_DATA``, ``<repo>/../shared/data`` and ``./data``. MNIST and Fashion-MNIST are
checked against the SHA256 sums below (the authors' published files); CIFAR only against
its known file sizes, as no copy was available here to take checksums from.

Whole datasets are held as tensors on the training device; a batch is an index slice of a
random permutation (:func:`batches`), which on small images is much faster than a
per-item DataLoader.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

ENV_VAR = "FASTOPT_DATA"
REPO_ROOT = Path(__file__).resolve().parents[2]

# sha256 of each file, from shared/data/SHA256SUMS (equal to the authors' published files)
SHA256 = {
    "mnist/t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "mnist/t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
    "mnist/train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    "mnist/train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    "fashion-mnist/t10k-images-idx3-ubyte.gz": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
    "fashion-mnist/t10k-labels-idx1-ubyte.gz": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
    "fashion-mnist/train-images-idx3-ubyte.gz": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
    "fashion-mnist/train-labels-idx1-ubyte.gz": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
}

_IDX_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
_CIFAR = {
    # name: (folder, train files, test files, label bytes per record, label byte used, classes)
    "cifar10": (
        "cifar-10-batches-bin",
        [f"data_batch_{i}.bin" for i in range(1, 6)],
        ["test_batch.bin"],
        1,
        0,
        10,
    ),
    "cifar100": ("cifar-100-binary", ["train.bin"], ["test.bin"], 2, 1, 100),
}
_CIFAR_PIXELS = 3 * 32 * 32
# IDX type codes -> numpy big-endian dtypes
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

DATASETS = ("mnist", "fashion-mnist", "cifar10", "cifar100")


class DataError(FileNotFoundError):
    """A dataset file is missing, truncated or has the wrong checksum."""


@dataclasses.dataclass
class Dataset:
    """A whole dataset as tensors: images N x C x H x W float32 in [0, 1], labels int64."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: int

    def to(self, device: torch.device | str) -> Dataset:
        """The same data on ``device``."""
        move = {f: getattr(self, f).to(device) for f in ("x_train", "y_train", "x_test", "y_test")}
        return dataclasses.replace(self, **move)

    def subset(
        self, train: int | None = None, test: int | None = None, seed: int = 0, balanced: bool = True
    ) -> Dataset:
        """A random subset of ``train`` / ``test`` items (None: all), fixed by ``seed``.

        ``balanced`` takes n / classes items of every class (the first of each class in a
        fixed permutation), so that chance accuracy stays exactly 1 / classes; otherwise
        the first n items of the permutation.
        """
        gen = torch.Generator().manual_seed(seed)
        out = {}
        for split, n in (("train", train), ("test", test)):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if n is not None and n < len(y):
                perm = torch.randperm(len(y), generator=gen).to(y.device)
                if balanced:
                    per_class = max(1, n // self.classes)
                    parts = [perm[y[perm] == c][:per_class] for c in range(self.classes)]
                    perm = torch.cat(parts)[
                        torch.randperm(per_class * self.classes, generator=gen).to(y.device)
                    ]
                idx = perm[:n]
                x, y = x[idx], y[idx]
            out[f"x_{split}"], out[f"y_{split}"] = x, y
        return dataclasses.replace(self, **out)


# --- readers ------------------------------------------------------------------------------


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (gzip-compressed if its name ends in .gz) into a numpy array.

    IDX: two zero bytes, a type code, the number of dimensions d, then d big-endian uint32
    sizes and the data in row-major order.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path}: not an IDX file (bad magic {raw[:4].hex()})")
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int(s) for s in np.frombuffer(raw[4:header], dtype=">u4"))
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise DataError(
            f"{path}: IDX size mismatch, {len(raw)} bytes for shape {shape} (expected {expected})"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def read_cifar_bin(
    path: str | os.PathLike, label_bytes: int = 1, label_index: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR binary file: records of ``label_bytes`` label bytes + 3072 pixel bytes.

    CIFAR-10 has 1 label byte; CIFAR-100 has 2 (coarse, fine; ``label_index=1`` takes the
    fine label). Images come back N x 3 x 32 x 32 uint8 (the file stores R, G, B planes).
    """
    path = Path(path)
    raw = np.fromfile(path, dtype=np.uint8)
    record = label_bytes + _CIFAR_PIXELS
    if raw.size == 0 or raw.size % record:
        raise DataError(f"{path}: {raw.size} bytes is not a whole number of {record}-byte CIFAR records")
    rows = raw.reshape(-1, record)
    return rows[:, label_bytes:].reshape(-1, 3, 32, 32), rows[:, label_index].astype(np.int64)


# --- locating and checking files --------------------------------------------------------------


def search_dirs(data_dir: str | os.PathLike | None = None) -> list[tuple[str, Path]]:
    """The candidate data folders, in search order, each with where it came from."""
    if data_dir is not None:  # an explicit option is the only place looked at
        return [("--data-dir", Path(data_dir))]
    dirs = []
    if os.environ.get(ENV_VAR):
        dirs.append((f"${ENV_VAR}", Path(os.environ[ENV_VAR])))
    dirs.append(("<repo>/../shared/data", REPO_ROOT.parent / "shared" / "data"))
    dirs.append(("./data", Path.cwd() / "data"))
    return dirs


def required_files(name: str) -> list[str]:
    """The files (relative to the data folder) that dataset ``name`` needs."""
    if name in ("mnist", "fashion-mnist"):
        return [f"{name}/{f}" for f in _IDX_FILES.values()]
    if name in _CIFAR:
        folder, train, test, *_ = _CIFAR[name]
        return [f"{folder}/{f}" for f in train + test]
    raise ValueError(f"unknown dataset {name!r}; known: {DATASETS}")


def _expected_size(rel: str) -> int | None:
    if rel.startswith("cifar-10-batches-bin/"):
        return 10000 * (1 + _CIFAR_PIXELS)
    if rel == "cifar-100-binary/train.bin":
        return 50000 * (2 + _CIFAR_PIXELS)
    if rel == "cifar-100-binary/test.bin":
        return 10000 * (2 + _CIFAR_PIXELS)
    return None


def _describe(rel: str) -> str:
    if rel in SHA256:
        return f"{rel} (expected SHA256 {SHA256[rel]})"
    size = _expected_size(rel)
    return f"{rel} ({size:,} bytes)" if size else rel


def find_data_dir(name: str, data_dir: str | os.PathLike | None = None) -> Path:
    """The first search folder holding every file of dataset ``name``.

    Raises :class:`DataError` naming the first missing file, its expected checksum and
    every folder searched.
    """
    needed = required_files(name)
    tried = []
    for origin, folder in search_dirs(data_dir):
        missing = [rel for rel in needed if not (folder / rel).is_file()]
        if not missing:
            return folder
        tried.append((origin, folder, missing))
    origin, folder, missing = tried[0]
    lines = [f"dataset {name!r}: missing file {folder / missing[0]}", f"  wanted: {_describe(missing[0])}"]
    if len(missing) > 1:
        lines.append(f"  and {len(missing) - 1} more of: " + ", ".join(missing[1:]))
    lines.append("  searched: " + "; ".join(f"{o} = {f}" for o, f, _ in tried))
    lines.append(f"  (pass --data-dir, or set ${ENV_VAR}; nothing is downloaded)")
    raise DataError("\n".join(lines))


def sha256_of(path: str | os.PathLike) -> str:
    """The hex SHA256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(folder: str | os.PathLike, rel: str) -> None:
    """Check one file against its known SHA256 (or size, for CIFAR); raise DataError if wrong."""
    path = Path(folder) / rel
    if not path.is_file():
        raise DataError(f"missing file {path}; wanted: {_describe(rel)}")
    if rel in SHA256:
        got = sha256_of(path)
        if got != SHA256[rel]:
            raise DataError(
                f"{path}: SHA256 {got} does not match the expected {SHA256[rel]} (corrupt or wrong file)"
            )
    size = _expected_size(rel)
    if size is not None and path.stat().st_size != size:
        raise DataError(f"{path}: {path.stat().st_size:,} bytes, expected {size:,}")


# --- loading ----------------------------------------------------------------------------------

_cache: dict[tuple[str, str], Dataset] = {}


def load(name: str, data_dir: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> Dataset:
    """Load a whole dataset as tensors on ``device``, after checking its files.

    Images are float32 in [0, 1], N x C x H x W; the decoded CPU copy is cached per process.
    """
    folder = find_data_dir(name, data_dir)
    key = (name, str(folder))
    if key not in _cache:
        for rel in required_files(name):
            verify(folder, rel)
        _cache[key] = _read(name, folder)
    return _cache[key].to(device)


def _read(name: str, folder: Path) -> Dataset:
    if name in ("mnist", "fashion-mnist"):
        arrays = {k: read_idx(folder / name / f) for k, f in _IDX_FILES.items()}
        x = {
            s: torch.from_numpy(arrays[f"{s}_images"]).float().div_(255.0).unsqueeze(1)
            for s in ("train", "test")
        }
        y = {s: torch.from_numpy(arrays[f"{s}_labels"].astype(np.int64)) for s in ("train", "test")}
        return Dataset(name, x["train"], y["train"], x["test"], y["test"], 10)
    folder_name, train, test, label_bytes, label_index, classes = _CIFAR[name]
    parts = {}
    for split, files in (("train", train), ("test", test)):
        xs, ys = zip(*(read_cifar_bin(folder / folder_name / f, label_bytes, label_index) for f in files))
        parts[split] = (
            torch.from_numpy(np.concatenate(xs)).float().div_(255.0),
            torch.from_numpy(np.concatenate(ys)),
        )
    return Dataset(name, *parts["train"], *parts["test"], classes)


def batches(
    n: int, batch_size: int, generator: torch.Generator, device: torch.device | str = "cpu"
) -> Iterator[torch.Tensor]:
    """Index tensors of one epoch: a random permutation of range(n) cut into batches.

    The last batch may be smaller. The permutation is drawn on the CPU from ``generator``
    (so it is the same on every device) and moved to ``device``.
    """
    perm = torch.randperm(n, generator=generator).to(device)
    return iter(perm.split(batch_size))
