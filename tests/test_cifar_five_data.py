"""Split CIFAR-100 and 5-datasets against independent computations on small files in the official formats.

The synthetic files are written as the originals are: CIFAR batches as Python 2 pickles (protocol 2, Python 2 byte
strings for keys and pixel data, the numpy.core.multiarray global) that only load with encoding="latin1"; SVHN as
MATLAB v5 files with X uint8 (32, 32, 3, N) and y (N, 1) in 1..10; MNIST and Fashion-MNIST as gzip IDX; notMNIST as
pickled dicts. Two pixels of every image encode its index in its file, so each stored image can be traced back.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import struct
import sys
import types
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import scipy.io
import torch
from sklearn.utils import shuffle as sklearn_shuffle

from ness.data import DataError, files
from ness.data import cifar as cifar_module
from ness.data import five_datasets as five_module
from ness.data.cifar import load_cifar10, load_cifar100, split_cifar100
from ness.data.files import DatasetFiles
from ness.data.five_datasets import five_datasets, load_notmnist, load_svhn

# The md5 digests torchvision checks (cifar.py, svhn.py, mnist.py of torchvision.datasets).
PUBLISHED_MD5 = {
    "CIFAR-10": {
        "data_batch_1": "c99cafc152244af753f735de768cd75f",
        "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
        "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
        "data_batch_4": "634d18415352ddfa80567beed471001a",
        "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
        "test_batch": "40351d587109b95175f43aff81a1287e",
    },
    "CIFAR-100": {
        "train": "16019d7e3df5f24257cddd939b257f8d",
        "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
        "meta": "7973b15100ade9c7d40fb424638fde48",
    },
    "SVHN": {"train": "e26dedcc434d2e4c54c9b2d4a06d8373", "test": "eb5a983be6a315427106f1b164d9cef3"},
    "Fashion-MNIST": {
        "train_images": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train_labels": "25c81989df183df01b3e8a0aad5dffbe",
        "test_images": "bef4ecab320f06d8554ea6380940ec79",
        "test_labels": "bb300cfdad3c16e7a12a480ee83cd310",
    },
}
# METHODS_SPEC §1.2, typed here from the table: Normalize mean / std of each 5-datasets task.
SPEC_NORMALIZATION = {
    "cifar10": ((125.3 / 255, 123.0 / 255, 113.9 / 255), (63.0 / 255, 62.1 / 255, 66.7 / 255)),
    "mnist": ((0.1,), (0.2752,)),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.198, 0.201, 0.197)),
    "fashion_mnist": ((0.2190,), (0.3318,)),
    "notmnist": ((0.4254,), (0.4501,)),
}


def shuffled_labels(num_classes: int, per_class: int, seed: int) -> np.ndarray:
    """Every class `per_class` times, in a shuffled order (so file order is not class order)."""
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(num_classes), per_class))


CIFAR100_TRAIN = shuffled_labels(100, 10, seed=1)
CIFAR100_TEST = shuffled_labels(100, 3, seed=2)
CIFAR10_TRAIN = shuffled_labels(10, 20, seed=3)  # 5 batches of 40
CIFAR10_TEST = shuffled_labels(10, 10, seed=4)
MNIST_TRAIN, MNIST_TEST = shuffled_labels(10, 20, seed=5), shuffled_labels(10, 10, seed=6)
FASHION_TRAIN, FASHION_TEST = shuffled_labels(10, 15, seed=7), shuffled_labels(10, 8, seed=8)
SVHN_TRAIN, SVHN_TEST = shuffled_labels(10, 20, seed=9) + 1, shuffled_labels(10, 10, seed=10) + 1  # 1..10
NOTMNIST_TRAIN, NOTMNIST_TEST = shuffled_labels(10, 16, seed=11), shuffled_labels(10, 9, seed=12)


# ---------------------------------------------------------------- writing the official formats


class Py2Pickler(pickle._Pickler):
    """Writes `bytes` as Python 2 `str` (SHORT_BINSTRING / BINSTRING), as the 2009 CIFAR pickles hold them."""

    dispatch: ClassVar[dict] = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


def write_py2_pickle(path: Path, obj: object) -> Path:
    buffer = io.BytesIO()
    Py2Pickler(buffer, protocol=2).dump(obj)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n"))
    return path


def cifar_rows(n: int, seed: int) -> np.ndarray:
    """uint8 (n, 3072) image rows; the last two blue pixels, (2, 31, 30) and (2, 31, 31), encode the row index."""
    rows = np.random.default_rng(seed).integers(0, 256, size=(n, 3072), dtype=np.uint8)
    rows[:, 3070], rows[:, 3071] = np.arange(n) // 256, np.arange(n) % 256
    return rows


def write_cifar100(root: Path, train_rows: np.ndarray | None = None, train_labels: object = None) -> Path:
    folder = root / "cifar-100-python"
    for part, labels, rows in (
        ("train", CIFAR100_TRAIN if train_labels is None else train_labels, train_rows),
        ("test", CIFAR100_TEST, None),
    ):
        rows = cifar_rows(len(labels), seed=len(labels)) if rows is None else rows
        batch = {
            b"filenames": [b"img_%d.png" % i for i in range(len(labels))],
            b"batch_label": b"%s batch 1 of 1" % part.encode(),
            b"fine_labels": [int(y) for y in labels],
            b"coarse_labels": [int(y) // 5 for y in labels],
            b"data": rows,
        }
        write_py2_pickle(folder / part, batch)
    names = [b"class_%02d" % c for c in range(100)]
    write_py2_pickle(folder / "meta", {b"fine_label_names": names, b"coarse_label_names": names[:20]})
    return folder


def write_cifar10(root: Path) -> Path:
    folder = root / "cifar-10-batches-py"
    rows = cifar_rows(len(CIFAR10_TRAIN), seed=20)
    for b in range(5):
        part = slice(40 * b, 40 * (b + 1))
        batch = {
            b"batch_label": b"training batch",
            b"labels": [int(y) for y in CIFAR10_TRAIN[part]],
            b"data": rows[part],
        }
        write_py2_pickle(folder / f"data_batch_{b + 1}", batch)
    test = {b"batch_label": b"testing batch", b"labels": [int(y) for y in CIFAR10_TEST], b"data": cifar_rows(100, 21)}
    write_py2_pickle(folder / "test_batch", test)
    return folder


def rgb_ids(inputs: torch.Tensor) -> list[int]:
    return (inputs[:, 2, 31, 30].long() * 256 + inputs[:, 2, 31, 31].long()).tolist()


def svhn_x(n: int, seed: int) -> np.ndarray:
    """uint8 (32, 32, 3, n) as in the .mat files; pixels (31, 30) and (31, 31) of channel 2 encode the index."""
    x = np.random.default_rng(seed).integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)
    x[31, 30, 2], x[31, 31, 2] = np.arange(n) // 256, np.arange(n) % 256
    return x


def write_svhn(folder: Path, train_x: np.ndarray | None = None, train_y: object = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    train_y = SVHN_TRAIN[:, None].astype(np.uint8) if train_y is None else train_y
    train_x = svhn_x(len(SVHN_TRAIN), seed=30) if train_x is None else train_x
    scipy.io.savemat(folder / "train_32x32.mat", {"X": train_x, "y": train_y})
    test_y = SVHN_TEST[:, None].astype(np.uint8)
    scipy.io.savemat(folder / "test_32x32.mat", {"X": svhn_x(len(SVHN_TEST), seed=31), "y": test_y})
    return folder


def grey_images(n: int, size: int, seed: int) -> np.ndarray:
    """uint8 (n, size, size); the last two pixels of the last row encode the index."""
    images = np.random.default_rng(seed).integers(0, 256, size=(n, size, size), dtype=np.uint8)
    images[:, -1, -2], images[:, -1, -1] = np.arange(n) // 256, np.arange(n) % 256
    return images


def grey_ids(inputs: torch.Tensor, last: int = 31) -> list[int]:
    return (inputs[:, 0, last, last - 1].long() * 256 + inputs[:, 0, last, last].long()).tolist()


def write_idx(path: Path, array: np.ndarray) -> None:
    """Official IDX: big-endian magic 0x0800 | ndim, one big-endian uint32 per dimension, uint8 payload."""
    data = struct.pack(f">I{array.ndim}I", 0x0800 | array.ndim, *array.shape) + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)


def write_mnist_format(folder: Path, train_labels: np.ndarray, test_labels: np.ndarray, seed: int) -> Path:
    for prefix, labels in (("train", train_labels), ("t10k", test_labels)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", grey_images(len(labels), 28, seed + len(labels)))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return folder


def write_notmnist(folder: Path, train_features: object = None, train_labels: object = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if train_features is None:
        train_features = grey_images(len(NOTMNIST_TRAIN), 32, seed=40)[:, None]
    for part, features, labels in (
        ("train", train_features, NOTMNIST_TRAIN if train_labels is None else train_labels),
        ("test", grey_images(len(NOTMNIST_TEST), 32, seed=41)[:, None], NOTMNIST_TEST),
    ):
        with open(folder / f"notmnist_{part}.pkl", "wb") as f:
            pickle.dump({"features": features, "labels": labels}, f, protocol=2)
    return folder


def write_five(root: Path) -> Path:
    write_cifar10(root)
    write_mnist_format(root / "mnist", MNIST_TRAIN, MNIST_TEST, seed=50)
    write_svhn(root / "svhn")
    write_mnist_format(root / "fashion_mnist", FASHION_TRAIN, FASHION_TEST, seed=60)
    write_notmnist(root / "notmnist")
    return root


@pytest.fixture
def cifar100_root(tmp_path: Path) -> Path:
    write_cifar100(tmp_path)
    return tmp_path


@pytest.fixture
def five_root(tmp_path: Path) -> Path:
    return write_five(tmp_path)


def with_own_md5(spec: DatasetFiles, root: Path) -> DatasetFiles:
    """`spec` with every md5 replaced by the digest of the synthetic file under `root`, so the check can pass."""
    own = {}
    for role, official in spec.files.items():
        path = next(root / c for c in official.candidates if (root / c).is_file())
        own[role] = replace(official, md5=hashlib.md5(path.read_bytes()).hexdigest())
    return replace(spec, files=own)


def split_positions(n: int, pc_valid: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, val) positions as the official loaders draw them, straight from sklearn."""
    perm = sklearn_shuffle(np.arange(n), random_state=seed)
    n_val = int(pc_valid * n)
    return perm[n_val:].tolist(), perm[:n_val].tolist()


# ---------------------------------------------------------------- the file specs


@pytest.mark.parametrize(
    "spec",
    [cifar_module.CIFAR10_FILES, cifar_module.CIFAR100_FILES, five_module.SVHN_FILES, five_module.FASHION_MNIST_FILES],
    ids=lambda spec: spec.name,
)
def test_official_md5_are_the_published_ones(spec: DatasetFiles) -> None:
    assert {role: official.md5 for role, official in spec.files.items()} == PUBLISHED_MD5[spec.name]


def test_synthetic_cifar_pickle_is_python2_format(cifar100_root: Path) -> None:
    """The fixture is faithful: like the real files, it fails under Python 3's default ASCII decoding."""
    path = cifar100_root / "cifar-100-python" / "train"
    with pytest.raises(UnicodeDecodeError):
        pickle.loads(path.read_bytes())
    assert sorted(pickle.loads(path.read_bytes(), encoding="bytes")) == sorted(
        [b"filenames", b"batch_label", b"fine_labels", b"coarse_labels", b"data"]
    )
    data = load_cifar100(cifar100_root, verify_md5=False)
    assert data.train_images.dtype == np.uint8 and data.train_images.shape == (1000, 3, 32, 32)
    assert data.train_labels.dtype == np.int64 and data.train_labels.tolist() == CIFAR100_TRAIN.tolist()
    assert data.test_labels.tolist() == CIFAR100_TEST.tolist()
    assert data.class_names == tuple(f"class_{c:02d}" for c in range(100))


# ---------------------------------------------------------------- CIFAR-100 and Split CIFAR-100


def test_cifar_rows_are_channel_planes_then_rows(tmp_path: Path) -> None:
    rows = cifar_rows(len(CIFAR100_TRAIN), seed=0)
    rows[7] = (np.arange(3072) * 7 + 3) % 256
    write_cifar100(tmp_path, train_rows=rows)
    image = load_cifar100(tmp_path, verify_md5=False).train_images[7]
    expected = np.zeros((3, 32, 32), dtype=np.uint8)
    for c in range(3):
        for h in range(32):
            for w in range(32):
                expected[c, h, w] = (7 * (1024 * c + 32 * h + w) + 3) % 256
    np.testing.assert_array_equal(image, expected)


@pytest.mark.parametrize("seed", [0, 3])
def test_split_cifar100_matches_an_explicit_loop(cifar100_root: Path, seed: int) -> None:
    bench = split_cifar100(cifar100_root, seed=seed, pc_valid=0.1, verify_md5=False)
    assert bench.name == "split_cifar100" and len(bench) == 10
    assert bench.input_shape == (3, 32, 32) and not bench.shared_head
    for t, task in enumerate(bench.tasks):
        assert task.num_classes == 10
        pool = [i for i, y in enumerate(CIFAR100_TRAIN) if 10 * t <= y < 10 * t + 10]
        test = [i for i, y in enumerate(CIFAR100_TEST) if 10 * t <= y < 10 * t + 10]
        train_pos, val_pos = split_positions(len(pool), 0.1, seed)
        assert rgb_ids(task.train.inputs) == [pool[p] for p in train_pos]
        assert rgb_ids(task.val.inputs) == [pool[p] for p in val_pos]
        assert rgb_ids(task.test.inputs) == test and len(test) == 30
        for split, labels in ((task.train, CIFAR100_TRAIN), (task.val, CIFAR100_TRAIN), (task.test, CIFAR100_TEST)):
            assert split.labels.dtype == torch.int64
            assert split.labels.tolist() == [int(labels[i]) - 10 * t for i in rgb_ids(split.inputs)]
            assert split.inputs.dtype == torch.uint8 and split.inputs.shape[1:] == (3, 32, 32)
    assert bench.details["class_split"][2] == list(range(20, 30))
    assert bench.details["class_names"][2][0] == "class_20"
    assert bench.details["seed"] == seed and bench.details["pc_valid"] == 0.1
    assert bench.details["files"]["train"] == {
        "path": str(cifar100_root / "cifar-100-python" / "train"),
        "md5_verified": False,
    }


def test_split_cifar100_images_are_the_raw_bytes_in_one_shared_tensor(cifar100_root: Path) -> None:
    bench = split_cifar100(cifar100_root, seed=1, verify_md5=False)
    raw = cifar_rows(len(CIFAR100_TRAIN), seed=len(CIFAR100_TRAIN))
    task = bench.tasks[4]
    for j, i in enumerate(rgb_ids(task.val.inputs)):
        assert task.val.inputs[j].flatten().tolist() == raw[i].tolist()
    storage = bench.tasks[0].train.inputs.untyped_storage().data_ptr()
    for task in bench.tasks:
        assert task.train.inputs.untyped_storage().data_ptr() == storage
        assert task.val.inputs.untyped_storage().data_ptr() == storage
    assert sum(len(k.train) + len(k.val) for k in bench.tasks) == len(CIFAR100_TRAIN)
    assert bench.tasks[0].train.inputs.untyped_storage().nbytes() == len(CIFAR100_TRAIN) * 3072  # uint8, no copy


def test_split_cifar100_train_per_task_and_num_tasks(cifar100_root: Path) -> None:
    full = split_cifar100(cifar100_root, seed=2, verify_md5=False)
    small = split_cifar100(cifar100_root, seed=2, train_per_task=5, num_tasks=3, verify_md5=False)
    assert len(small) == 3 and small.details["num_tasks"] == 3
    for task, whole in zip(small.tasks, full.tasks[:3], strict=True):
        assert torch.equal(task.train.inputs, whole.train.inputs[:5])
        assert torch.equal(task.val.inputs, whole.val.inputs) and torch.equal(task.test.inputs, whole.test.inputs)
    assert small.details["task_sizes"] == [{"train": 5, "val": 5, "test": 30}] * 3
    with pytest.raises(ValueError, match="train_per_task=96"):
        split_cifar100(cifar100_root, seed=2, train_per_task=96, verify_md5=False)  # 100 - int(0.05*100) = 95
    for bad in (0, 11):
        with pytest.raises(ValueError, match=r"num_tasks must be in 1\.\.10"):
            split_cifar100(cifar100_root, seed=2, num_tasks=bad, verify_md5=False)
    with pytest.raises(ValueError, match="pc_valid"):
        split_cifar100(cifar100_root, seed=2, pc_valid=1.0, verify_md5=False)


def test_split_cifar100_transform_by_hand(cifar100_root: Path) -> None:
    task = split_cifar100(cifar100_root, seed=0, verify_md5=False).tasks[1]
    x = task.train.inputs[:2]
    out = task.transform(x)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 32, 32)
    mean, std = (125.3, 123.0, 113.9), (63.0, 62.1, 66.7)
    for c in range(3):
        v = int(x[1, c, 5, 9])
        assert float(out[1, c, 5, 9]) == pytest.approx((v / 255 - mean[c] / 255) / (std[c] / 255), rel=1e-5, abs=1e-6)


def test_cifar100_missing_file_lists_the_expected_path(cifar100_root: Path) -> None:
    (cifar100_root / "cifar-100-python" / "test").unlink()
    with pytest.raises(DataError) as err:
        split_cifar100(cifar100_root, seed=0, verify_md5=False)
    message = str(err.value)
    assert f"expected at {cifar100_root / 'cifar-100-python' / 'test'}" in message
    assert "cifar-100-python.tar.gz" in message and "train: expected" not in message


def test_cifar100_truncated_pickle(cifar100_root: Path) -> None:
    path = cifar100_root / "cifar-100-python" / "train"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(DataError, match=r"cannot unpickle it \(.*\); the file is truncated") as err:
        load_cifar100(cifar100_root, verify_md5=False)
    assert str(path) in str(err.value)


def test_cifar100_md5_fails_against_the_official_digest_and_passes_against_the_right_one(
    cifar100_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(DataError, match=f"expected {PUBLISHED_MD5['CIFAR-100']['train']}") as err:
        split_cifar100(cifar100_root, seed=0)
    assert str(cifar100_root / "cifar-100-python" / "train") in str(err.value)
    monkeypatch.setattr(cifar_module, "CIFAR100_FILES", with_own_md5(cifar_module.CIFAR100_FILES, cifar100_root))
    bench = split_cifar100(cifar100_root, seed=0)
    assert all(record["md5_verified"] for record in bench.details["files"].values())
    meta = cifar100_root / "cifar-100-python" / "meta"
    data = bytearray(meta.read_bytes())
    data[-3] ^= 1  # one flipped bit
    meta.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"md5 is [0-9a-f]{32}, expected") as err:
        split_cifar100(cifar100_root, seed=0)
    assert str(meta) in str(err.value)


def test_cifar100_labels_out_of_range(tmp_path: Path) -> None:
    labels = CIFAR100_TRAIN.copy()
    labels[13] = 100
    write_cifar100(tmp_path, train_labels=labels)
    with pytest.raises(DataError, match=r"outside 0\.\.99 \(first: 100 at index 13\)") as err:
        load_cifar100(tmp_path, verify_md5=False)
    assert str(tmp_path / "cifar-100-python" / "train") in str(err.value)


def test_cifar100_image_and_label_counts_must_match(tmp_path: Path) -> None:
    write_cifar100(tmp_path, train_rows=cifar_rows(len(CIFAR100_TRAIN) - 1, seed=0))
    with pytest.raises(DataError, match="999 images but 1000 labels") as err:
        load_cifar100(tmp_path, verify_md5=False)
    assert str(tmp_path / "cifar-100-python" / "train") in str(err.value)


@pytest.mark.parametrize(
    "rows", [np.zeros((1000, 3000), np.uint8), np.zeros((1000, 3072), np.float32)], ids=["shape", "dtype"]
)
def test_cifar100_data_must_be_uint8_rows_of_3072(tmp_path: Path, rows: np.ndarray) -> None:
    write_cifar100(tmp_path, train_rows=rows)
    with pytest.raises(DataError, match=r"expected a uint8 array of shape \(N, 3072\)"):
        load_cifar100(tmp_path, verify_md5=False)


def test_cifar100_rejects_a_cifar10_batch_and_a_missing_class(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    write_cifar100(tmp_path)
    (tmp_path / "cifar-100-python" / "train").write_bytes(
        (tmp_path / "cifar-10-batches-py" / "test_batch").read_bytes()
    )
    with pytest.raises(DataError, match="keys 'data' and 'fine_labels', found"):
        load_cifar100(tmp_path, verify_md5=False)
    labels = CIFAR100_TRAIN.copy()
    labels[labels == 37] = 38
    write_cifar100(tmp_path, train_labels=labels)
    with pytest.raises(DataError, match=r"no images of 1 of the 100 classes \(first missing: 37\)"):
        load_cifar100(tmp_path, verify_md5=False)


# ---------------------------------------------------------------- CIFAR-10


def test_load_cifar10_concatenates_the_five_batches_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_cifar10(tmp_path)
    monkeypatch.setattr(cifar_module, "CIFAR10_FILES", with_own_md5(cifar_module.CIFAR10_FILES, tmp_path))
    data = load_cifar10(tmp_path)  # md5 checked, against the synthetic files' own digests
    assert data.train_images.shape == (200, 3, 32, 32) and data.test_images.shape == (100, 3, 32, 32)
    assert rgb_ids(torch.from_numpy(data.train_images)) == list(range(200))
    assert data.train_labels.tolist() == CIFAR10_TRAIN.tolist() and data.test_labels.tolist() == CIFAR10_TEST.tolist()
    assert all(record["md5_verified"] for record in data.files.values()) and len(data.files) == 6
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"\x80\x02}q\x00.")  # a valid, wrong pickle
    with pytest.raises(DataError, match="data_batch_3: md5"):
        load_cifar10(tmp_path)


# ---------------------------------------------------------------- 5-datasets


def test_five_datasets_protocol(five_root: Path) -> None:
    bench = five_datasets(five_root, seed=7, pc_valid=0.1, verify_md5=False)
    assert bench.name == "five_datasets" and bench.input_shape == (3, 32, 32) and not bench.shared_head
    assert [task.name for task in bench.tasks] == ["cifar10", "mnist", "svhn", "fashion_mnist", "notmnist"]
    raw = {
        "cifar10": (CIFAR10_TRAIN, CIFAR10_TEST, rgb_ids),
        "mnist": (MNIST_TRAIN, MNIST_TEST, lambda x: grey_ids(x, last=29)),  # 27 + 2 pixels of padding
        "svhn": ([y % 10 for y in SVHN_TRAIN], [y % 10 for y in SVHN_TEST], rgb_ids),
        "fashion_mnist": (FASHION_TRAIN, FASHION_TEST, lambda x: grey_ids(x, last=29)),
        "notmnist": (NOTMNIST_TRAIN, NOTMNIST_TEST, grey_ids),
    }
    for task in bench.tasks:
        train_labels, test_labels, ids = raw[task.name]
        train_pos, val_pos = split_positions(len(train_labels), 0.1, seed=1)  # always 1, not the run seed 7
        assert task.num_classes == 10
        assert ids(task.train.inputs) == train_pos and ids(task.val.inputs) == val_pos
        assert ids(task.test.inputs) == list(range(len(test_labels)))
        assert task.train.labels.tolist() == [int(train_labels[i]) for i in train_pos]
        assert task.test.labels.tolist() == [int(y) for y in test_labels]
        channels = 3 if task.name in ("cifar10", "svhn") else 1
        assert task.train.inputs.dtype == torch.uint8 and task.train.inputs.shape[1:] == (channels, 32, 32)
        assert task.train.inputs.untyped_storage().data_ptr() == task.val.inputs.untyped_storage().data_ptr()
    assert bench.details["split_seed"] == 1 and bench.details["seed"] == 7
    assert bench.details["fashion_mnist_variant"] == "real"
    assert bench.details["task_sizes"][2] == {"train": 180, "val": 20, "test": 100}


def test_five_datasets_split_seed_not_run_seed(five_root: Path) -> None:
    a = five_datasets(five_root, seed=0, datasets=("notmnist",), verify_md5=False).tasks[0]
    b = five_datasets(five_root, seed=5, datasets=("notmnist",), verify_md5=False).tasks[0]
    c = five_datasets(five_root, seed=0, datasets=("notmnist",), split_seed=2, verify_md5=False).tasks[0]
    assert torch.equal(a.val.inputs, b.val.inputs) and torch.equal(a.train.inputs, b.train.inputs)
    train_pos, val_pos = split_positions(len(NOTMNIST_TRAIN), 0.05, seed=2)
    assert grey_ids(c.val.inputs) == val_pos and grey_ids(c.train.inputs) == train_pos
    assert grey_ids(c.val.inputs) != grey_ids(a.val.inputs)


def test_five_datasets_normalisation_and_channel_repeat_by_hand(five_root: Path) -> None:
    bench = five_datasets(five_root, seed=0, verify_md5=False)
    for task in bench.tasks:
        x = task.test.inputs[3:5]
        out = task.transform(x)
        assert out.dtype == torch.float32 and out.shape == (2, 3, 32, 32)
        mean, std = SPEC_NORMALIZATION[task.name]
        for c in range(3):
            source = c if len(mean) == 3 else 0  # grey: the one channel, repeated
            v = int(x[1, source, 12, 20])
            expected = (v / 255 - mean[source]) / std[source]
            assert float(out[1, c, 12, 20]) == pytest.approx(expected, rel=1e-5, abs=1e-6), (task.name, c)


def test_mnist_is_zero_padded_to_32(five_root: Path) -> None:
    task = five_datasets(five_root, seed=0, datasets=("mnist",), verify_md5=False).tasks[0]
    raw = grey_images(len(MNIST_TEST), 28, seed=50 + len(MNIST_TEST))
    image = task.test.inputs[6, 0]
    for h in range(32):
        for w in range(32):
            inside = 2 <= h < 30 and 2 <= w < 30
            assert int(image[h, w]) == (int(raw[6, h - 2, w - 2]) if inside else 0), (h, w)


def test_svhn_transpose_and_label_10_is_digit_0(tmp_path: Path) -> None:
    x = svhn_x(len(SVHN_TRAIN), seed=30)
    for h in range(32):
        for w in range(32):
            for c in range(3):
                x[h, w, c, 4] = (5 * h + 11 * w + 101 * c) % 256
    write_svhn(tmp_path, train_x=x)  # torchvision's layout: the .mat files at the root
    data = load_svhn(tmp_path, verify_md5=False)
    assert data.train_images.shape == (200, 3, 32, 32) and data.train_images.dtype == np.uint8
    for c in range(3):
        for h in range(32):
            for w in range(32):
                assert data.train_images[4, c, h, w] == (5 * h + 11 * w + 101 * c) % 256
    expected = []
    for y in SVHN_TRAIN:
        expected.append(0 if y == 10 else int(y))
    assert data.train_labels.dtype == np.int64 and data.train_labels.tolist() == expected
    assert 0 in expected and 10 not in data.test_labels.tolist()


def test_subset_keeps_the_official_order_and_needs_only_its_files(five_root: Path) -> None:
    for folder in ("mnist", "fashion_mnist", "notmnist"):
        for path in (five_root / folder).iterdir():
            path.unlink()
    bench = five_datasets(five_root, seed=0, datasets=["svhn", "cifar10"], verify_md5=False)
    assert [task.name for task in bench.tasks] == ["cifar10", "svhn"]
    assert bench.details["datasets"] == ["cifar10", "svhn"] and set(bench.details["files"]) == {"cifar10", "svhn"}
    with pytest.raises(DataError, match="MNIST file"):
        five_datasets(five_root, seed=0, datasets=("mnist",), verify_md5=False)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"datasets": ("mnist", "imagenet")}, "unknown dataset.*'imagenet'.*valid names: cifar10, mnist, svhn"),
        ({"datasets": ("svhn", "mnist", "svhn")}, "'svhn' given more than once"),
        ({"datasets": "mnist"}, r"such as \('mnist',\), not the string"),
        ({"datasets": ()}, "datasets is empty"),
        ({"fashion": "zalando"}, "fashion must be one of 'real', 'mnist'"),
        ({"pc_valid": -0.1}, "pc_valid"),
    ],
)
def test_five_datasets_rejects_bad_settings(five_root: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        five_datasets(five_root, seed=0, verify_md5=False, **kwargs)


def test_fashion_mnist_real_and_official_bug_variants(five_root: Path) -> None:
    real = five_datasets(five_root, seed=0, datasets=("mnist", "fashion_mnist"), verify_md5=False)
    assert real.tasks[1].test.labels.tolist() == FASHION_TEST.tolist()
    for path in (five_root / "fashion_mnist").iterdir():
        path.unlink()
    bug = five_datasets(five_root, seed=0, datasets=("mnist", "fashion_mnist"), fashion="mnist", verify_md5=False)
    mnist, slot = bug.tasks
    assert slot.name == "fashion_mnist (mnist digits)"
    assert bug.details["fashion_mnist_variant"] == "mnist (official loader bug)"
    assert slot.test.labels.tolist() == MNIST_TEST.tolist()
    assert torch.equal(slot.train.inputs, mnist.train.inputs) and torch.equal(slot.val.inputs, mnist.val.inputs)
    x = slot.test.inputs[:1]
    v = int(x[0, 0, 10, 10])
    assert float(slot.transform(x)[0, 2, 10, 10]) == pytest.approx((v / 255 - 0.2190) / 0.3318, rel=1e-5)
    assert float(mnist.transform(x)[0, 2, 10, 10]) == pytest.approx((v / 255 - 0.1) / 0.2752, rel=1e-5)


def test_five_datasets_train_per_task(five_root: Path) -> None:
    full = five_datasets(five_root, seed=0, verify_md5=False)
    small = five_datasets(five_root, seed=0, train_per_task=7, verify_md5=False)
    for task, whole in zip(small.tasks, full.tasks, strict=True):
        assert torch.equal(task.train.inputs, whole.train.inputs[:7]) and torch.equal(task.val.inputs, whole.val.inputs)
    with pytest.raises(ValueError, match="train_per_task=144 but task 'fashion_mnist' has 143"):
        five_datasets(five_root, seed=0, train_per_task=144, verify_md5=False)  # 150 - int(0.05 * 150) = 143


def test_fashion_mnist_torchvision_layout_uncompressed(tmp_path: Path) -> None:
    raw = write_mnist_format(tmp_path / "FashionMNIST" / "raw", FASHION_TRAIN, FASHION_TEST, seed=60)
    for path in raw.glob("*.gz"):
        path.with_suffix("").write_bytes(gzip.decompress(path.read_bytes()))
        path.unlink()
    bench = five_datasets(tmp_path, seed=0, datasets=("fashion_mnist",))  # md5 applies to .gz files only
    assert bench.tasks[0].test.labels.tolist() == FASHION_TEST.tolist()
    record = bench.details["files"]["fashion_mnist"]["train_images"]
    assert record == {"path": str(raw / "train-images-idx3-ubyte"), "md5_verified": False}


def test_md5_of_svhn_fashion_and_cifar10(five_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    chosen = {"datasets": ("cifar10", "svhn", "fashion_mnist")}
    for name, published in (("svhn", PUBLISHED_MD5["SVHN"]["train"]), ("fashion_mnist", "8d4fb7e6c68d")):
        with pytest.raises(DataError, match=f"expected {published}"):
            five_datasets(five_root, seed=0, datasets=(name,))
    monkeypatch.setattr(cifar_module, "CIFAR10_FILES", with_own_md5(cifar_module.CIFAR10_FILES, five_root))
    monkeypatch.setattr(five_module, "SVHN_FILES", with_own_md5(five_module.SVHN_FILES, five_root))
    monkeypatch.setattr(five_module, "FASHION_MNIST_FILES", with_own_md5(five_module.FASHION_MNIST_FILES, five_root))
    bench = five_datasets(five_root, seed=0, **chosen)
    assert all(r["md5_verified"] for records in bench.details["files"].values() for r in records.values())
    path = five_root / "svhn" / "test_32x32.mat"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1  # one flipped pixel bit: still a readable .mat
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"md5 is [0-9a-f]{32}, expected") as err:
        five_datasets(five_root, seed=0, **chosen)
    assert str(path) in str(err.value)


def test_five_datasets_missing_file_lists_the_expected_paths(five_root: Path) -> None:
    (five_root / "svhn" / "test_32x32.mat").unlink()
    with pytest.raises(DataError) as err:
        five_datasets(five_root, seed=0, verify_md5=False)
    message = str(err.value)
    assert f"test: expected at {five_root / 'svhn' / 'test_32x32.mat'} or {five_root / 'test_32x32.mat'}" in message
    assert "ufldl.stanford.edu/housenumbers" in message


@pytest.mark.parametrize(
    ("y", "message"),
    [
        (np.where(SVHN_TRAIN == 4, 11, SVHN_TRAIN)[:, None].astype(np.uint8), r"outside 1\.\.10 \(first: 11"),
        ((SVHN_TRAIN % 10)[:, None].astype(np.uint8), r"outside 1\.\.10 \(first: 0"),
        (SVHN_TRAIN[:-1, None].astype(np.uint8), "200 images but 199 labels"),
    ],
    ids=["label 11", "label 0", "count"],
)
def test_svhn_bad_labels(tmp_path: Path, y: np.ndarray, message: str) -> None:
    write_svhn(tmp_path / "svhn", train_y=y)
    with pytest.raises(DataError, match=message) as err:
        load_svhn(tmp_path, verify_md5=False)
    assert str(tmp_path / "svhn" / "train_32x32.mat") in str(err.value)


def test_svhn_bad_images_and_truncated_file(tmp_path: Path) -> None:
    folder = write_svhn(tmp_path / "svhn", train_x=np.zeros((3, 32, 32, 200), np.uint8))  # (N, C, H, W): not SVHN
    with pytest.raises(DataError, match=r"expected uint8 of shape \(32, 32, 3, N\)"):
        load_svhn(tmp_path, verify_md5=False)
    write_svhn(folder)
    path = folder / "train_32x32.mat"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError, match="cannot read it as a MATLAB file") as err:
        load_svhn(tmp_path, verify_md5=False)
    assert str(path) in str(err.value)


def test_notmnist_accepts_n_32_32_and_whole_number_pixels(tmp_path: Path) -> None:
    features = grey_images(len(NOTMNIST_TRAIN), 32, seed=40)
    write_notmnist(tmp_path / "notmnist", train_features=features.astype(np.float64))  # (N, 32, 32), float
    data = load_notmnist(tmp_path)
    assert data.train_images.dtype == np.uint8 and data.train_images.shape == (160, 1, 32, 32)
    np.testing.assert_array_equal(data.train_images[:, 0], features)
    assert data.train_labels.tolist() == NOTMNIST_TRAIN.tolist()
    record = data.files["train"]
    digest = hashlib.md5((tmp_path / "notmnist" / "notmnist_train.pkl").read_bytes()).hexdigest()
    assert record["md5"] == digest and record["md5_verified"] is False


@pytest.mark.parametrize(
    ("features", "labels", "message"),
    [
        (None, np.where(NOTMNIST_TRAIN == 3, 10, NOTMNIST_TRAIN), r"outside 0\.\.9 \(first: 10"),
        (None, NOTMNIST_TRAIN[:-2], r"160 images but 'labels' has shape \(158,\)"),
        (np.zeros((160, 3, 32, 32), np.uint8), None, r"expected \(N, 1, 32, 32\) or \(N, 32, 32\)"),
        (np.full((160, 32, 32), 0.5), None, "not whole numbers in 0..255"),
    ],
    ids=["label", "count", "shape", "values"],
)
def test_notmnist_bad_files(tmp_path: Path, features: object, labels: object, message: str) -> None:
    write_notmnist(tmp_path / "notmnist", train_features=features, train_labels=labels)
    with pytest.raises(DataError, match=message) as err:
        load_notmnist(tmp_path)
    assert str(tmp_path / "notmnist" / "notmnist_train.pkl") in str(err.value)


def test_notmnist_missing_keys(tmp_path: Path) -> None:
    write_notmnist(tmp_path)  # at the root: also a place it may lie
    with open(tmp_path / "notmnist_test.pkl", "wb") as f:
        pickle.dump({"images": [], "labels": []}, f, protocol=2)
    with pytest.raises(DataError, match="keys 'features' and 'labels', found \\['images', 'labels'\\]"):
        load_notmnist(tmp_path)


# ---------------------------------------------------------------- downloading through torchvision


def fake_torchvision(monkeypatch: pytest.MonkeyPatch, writers: dict[str, Callable[[Path], object]]) -> list:
    """Install a stand-in torchvision.datasets whose classes write synthetic files where torchvision puts them."""
    calls = []
    datasets = types.ModuleType("torchvision.datasets")
    for name, write in writers.items():

        def dataset(root: str, download: bool, _name: str = name, _write: Callable = write, **kwargs: object) -> None:
            assert download
            calls.append((_name, kwargs))
            _write(Path(root))

        setattr(datasets, name, dataset)
    torchvision = types.ModuleType("torchvision")
    torchvision.datasets = datasets
    monkeypatch.setitem(sys.modules, "torchvision", torchvision)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", datasets)
    monkeypatch.setattr(files, "torchvision_available", lambda: True)
    return calls


def test_download_fetches_missing_files_into_torchvision_layouts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = fake_torchvision(
        monkeypatch,
        {
            "CIFAR100": write_cifar100,
            "MNIST": lambda root: write_mnist_format(root / "MNIST" / "raw", MNIST_TRAIN, MNIST_TEST, seed=50),
            "SVHN": write_svhn,
            "FashionMNIST": lambda root: write_mnist_format(
                root / "FashionMNIST" / "raw", FASHION_TRAIN, FASHION_TEST, seed=60
            ),
        },
    )
    assert len(split_cifar100(tmp_path, seed=0, verify_md5=False, download=True)) == 10
    assert calls == [("CIFAR100", {"train": True}), ("CIFAR100", {"train": False})]
    calls.clear()
    bench = five_datasets(
        tmp_path, seed=0, datasets=("mnist", "svhn", "fashion_mnist"), verify_md5=False, download=True
    )
    assert [name for name, _ in calls] == ["MNIST", "MNIST", "SVHN", "SVHN", "FashionMNIST", "FashionMNIST"]
    assert ("SVHN", {"split": "test"}) in calls
    assert bench.tasks[2].test.labels.tolist() == FASHION_TEST.tolist()
    calls.clear()
    five_datasets(tmp_path, seed=0, datasets=("svhn",), verify_md5=False, download=True)
    assert calls == []  # nothing missing, nothing fetched
    with pytest.raises(DataError, match=r"notmnist_train\.pkl") as err:  # no download exists: say where to put it
        five_datasets(tmp_path, seed=0, datasets=("notmnist",), verify_md5=False, download=True)
    assert "nkundiushuti/notmnist_convert" in str(err.value)


def test_download_without_torchvision_says_how_to_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(files, "torchvision_available", lambda: False)
    with pytest.raises(DataError, match=r"downloading CIFAR-10 needs torchvision.*cifar-10-python\.tar\.gz"):
        five_datasets(tmp_path, seed=0, datasets=("cifar10",), download=True)


# ---------------------------------------------------------------- the real files


@pytest.fixture(scope="module")
def real_root() -> Path:
    root = os.environ.get("NESS_DATA_ROOT")
    if not root:
        pytest.skip("NESS_DATA_ROOT is not set; point it at the folder holding the datasets to test the real files")
    return Path(root)


def test_real_mnist_task_statistics_match_the_padded_constants(real_root: Path) -> None:
    if not (real_root / "mnist" / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"the official MNIST files are not in {real_root / 'mnist'}")
    task = five_datasets(real_root, seed=0, datasets=("mnist",)).tasks[0]
    assert (len(task.train), len(task.val), len(task.test)) == (57000, 3000, 10000)
    x = task.transform(task.train.inputs[:20000])
    assert abs(float(x.mean())) < 0.01 and abs(float(x.std()) - 1) < 0.01  # 0.1 / 0.2752 include the padding


def test_real_cifar100_sizes(real_root: Path) -> None:
    if not (real_root / "cifar-100-python" / "train").is_file():
        pytest.skip(f"CIFAR-100 is not in {real_root / 'cifar-100-python'}")
    bench = split_cifar100(real_root, seed=1)
    for task in bench.tasks:
        assert (len(task.train), len(task.val), len(task.test)) == (4750, 250, 1000)
        assert sorted(set(task.test.labels.tolist())) == list(range(10))
