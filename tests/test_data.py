"""Tests of the data layer against independent computations on files the tests write themselves."""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.utils import shuffle as sklearn_shuffle

from ness.data import (
    BENCHMARKS,
    DataError,
    Split,
    build_benchmark,
    iterate_batches,
    load_mnist,
    permuted_mnist,
    read_idx,
    resolve_data_root,
    split_digits,
    split_mnist,
    validation_split,
)
from ness.data.tasks import BatchRows, take_rows

OFFICIAL_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
# Published digit counts of the official MNIST training and test sets.
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    """The official IDX layout: big-endian magic, one big-endian uint32 per dimension, then uint8 payload."""
    if magic is None:
        magic = 0x0800 | array.ndim
    return struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes()


def write_idx(path: Path, array: np.ndarray, magic: int | None = None) -> Path:
    data = idx_bytes(array, magic)
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def write_mnist(folder: Path, train_labels: np.ndarray, test_labels: np.ndarray) -> None:
    """The four files with official names; pixels (0, 0) and (0, 1) of image i encode i, to trace it."""
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, labels in (("train", train_labels), ("t10k", test_labels)):
        n = len(labels)
        images = np.random.default_rng(n).integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        images[:, 0, 0] = np.arange(n) // 256
        images[:, 0, 1] = np.arange(n) % 256
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)


def image_ids(inputs: torch.Tensor) -> np.ndarray:
    return (inputs[:, 0, 0].long() * 256 + inputs[:, 0, 1].long()).numpy()


TRAIN_LABELS = np.random.default_rng(1).integers(0, 10, size=600).astype(np.uint8)
TEST_LABELS = np.random.default_rng(2).integers(0, 10, size=200).astype(np.uint8)


@pytest.fixture
def mnist_root(tmp_path: Path) -> Path:
    write_mnist(tmp_path / "mnist", TRAIN_LABELS, TEST_LABELS)
    return tmp_path


# ---------------------------------------------------------------- IDX files


@pytest.mark.parametrize("name", ["images.idx", "images.idx.gz"])
def test_read_idx_round_trip(tmp_path: Path, name: str) -> None:
    images = np.random.default_rng(0).integers(0, 256, size=(7, 28, 28), dtype=np.uint8)
    labels = np.arange(7, dtype=np.uint8)
    got_images = read_idx(write_idx(tmp_path / name, images), 2051)
    got_labels = read_idx(write_idx(tmp_path / f"labels-{name}", labels), 2049)
    assert got_images.dtype == np.uint8 and got_images.shape == (7, 28, 28)
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)


def test_read_idx_header_is_big_endian_official_layout(tmp_path: Path) -> None:
    path = tmp_path / "labels.idx"
    path.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 3, 5, 6, 7]))
    np.testing.assert_array_equal(read_idx(path, 2049), [5, 6, 7])


def test_read_idx_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.gz"
    with pytest.raises(DataError, match="not found") as err:
        read_idx(path, 2051)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("payload", ["truncated", "trailing"])
def test_read_idx_payload_length_must_match_header(tmp_path: Path, payload: str) -> None:
    path = tmp_path / "images.gz"
    data = idx_bytes(np.zeros((3, 28, 28), np.uint8))
    path.write_bytes(gzip.compress(data[:-1] if payload == "truncated" else data + b"\0"))
    with pytest.raises(DataError, match=r"needs 2352; the file is truncated") as err:
        read_idx(path, 2051)
    assert str(path) in str(err.value)


def test_read_idx_wrong_magic(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "labels.gz", np.zeros(5, np.uint8))
    with pytest.raises(DataError, match="magic number is 2049") as err:
        read_idx(path, 2051)
    assert str(path) in str(err.value)


def test_read_idx_non_uint8_type_is_rejected(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "labels", np.zeros(4, np.uint8), magic=0x0D01)  # 0x0D: float32 type code
    with pytest.raises(DataError, match="type 0x0d") as err:
        read_idx(path, 2049)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("truncate_gzip", [False, True])
def test_read_idx_not_gzip(tmp_path: Path, truncate_gzip: bool) -> None:
    path = tmp_path / "images.gz"
    data = idx_bytes(np.zeros((2, 28, 28), np.uint8))
    path.write_bytes(gzip.compress(data)[:-12] if truncate_gzip else data)
    with pytest.raises(DataError, match="not a valid gzip") as err:
        read_idx(path, 2051)
    assert str(path) in str(err.value)


def test_read_idx_gzip_without_suffix_and_tiny_file(tmp_path: Path) -> None:
    path = tmp_path / "images"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros((2, 28, 28), np.uint8))))
    with pytest.raises(DataError, match="looks gzip-compressed"):
        read_idx(path, 2051)
    path.write_bytes(bytes([0, 0, 8]))
    with pytest.raises(DataError, match="truncated"):
        read_idx(path, 2051)


def test_read_idx_md5_mismatch(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "labels.gz", np.arange(4, dtype=np.uint8))
    real = hashlib.md5(path.read_bytes()).hexdigest()
    np.testing.assert_array_equal(read_idx(path, 2049, md5=real), np.arange(4))
    with pytest.raises(DataError, match="md5") as err:
        read_idx(path, 2049, md5="0" * 32)
    assert str(path) in str(err.value)


# ---------------------------------------------------------------- locating and loading MNIST


def test_resolve_data_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NESS_DATA_ROOT", raising=False)
    with pytest.raises(DataError, match=r"--data-root.*NESS_DATA_ROOT"):
        resolve_data_root(None)
    assert resolve_data_root(tmp_path) == tmp_path
    monkeypatch.setenv("NESS_DATA_ROOT", str(tmp_path))
    assert resolve_data_root(None) == tmp_path
    with pytest.raises(DataError, match="does not exist") as err:
        resolve_data_root(tmp_path / "absent")
    assert str(tmp_path / "absent") in str(err.value)


def test_load_mnist_missing_file_lists_every_place(mnist_root: Path) -> None:
    (mnist_root / "mnist" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError) as err:
        load_mnist(mnist_root, verify_md5=False)
    message = str(err.value)
    assert "t10k-labels-idx1-ubyte.gz" in message and "train-labels" not in message
    for place in (mnist_root / "mnist", mnist_root / "MNIST" / "raw", mnist_root):
        assert f"  {place}\n" in message
    assert "torchvision.datasets.MNIST" in message


def test_load_mnist_torchvision_layout_uncompressed(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    write_mnist(raw, TRAIN_LABELS, TEST_LABELS)
    for path in raw.glob("*.gz"):
        path.with_suffix("").write_bytes(gzip.decompress(path.read_bytes()))
        path.unlink()
    train_x, train_y, test_x, test_y = load_mnist(tmp_path)  # md5 only applies to .gz files
    assert train_x.shape == (600, 28, 28) and test_x.shape == (200, 28, 28)
    np.testing.assert_array_equal(train_y, TRAIN_LABELS)
    np.testing.assert_array_equal(test_y, TEST_LABELS)


def test_load_mnist_checks_official_md5(mnist_root: Path) -> None:
    with pytest.raises(DataError, match="official") as err:
        load_mnist(mnist_root)
    assert str(mnist_root / "mnist") in str(err.value)


def test_load_mnist_labels_out_of_range(mnist_root: Path) -> None:
    bad = TRAIN_LABELS.copy()
    bad[17] = 10
    path = write_idx(mnist_root / "mnist" / "train-labels-idx1-ubyte.gz", bad)
    with pytest.raises(DataError, match=r"out of range 0\.\.9") as err:
        load_mnist(mnist_root, verify_md5=False)
    assert str(path) in str(err.value) and "index 17" in str(err.value)


def test_load_mnist_rejects_images_that_are_not_28x28(mnist_root: Path) -> None:
    path = write_idx(mnist_root / "mnist" / "train-images-idx3-ubyte.gz", np.zeros((600, 8, 8), np.uint8))
    with pytest.raises(DataError, match="28x28") as err:
        load_mnist(mnist_root, verify_md5=False)
    assert str(path) in str(err.value)


def test_load_mnist_count_mismatch(mnist_root: Path) -> None:
    path = write_idx(mnist_root / "mnist" / "t10k-labels-idx1-ubyte.gz", TEST_LABELS[:-1])
    with pytest.raises(DataError, match=r"200 images but .* 199 labels") as err:
        load_mnist(mnist_root, verify_md5=False)
    assert str(path) in str(err.value)


# ---------------------------------------------------------------- Split MNIST and Permuted MNIST


def test_split_mnist_tasks_match_an_explicit_loop(mnist_root: Path) -> None:
    bench = split_mnist(mnist_root, seed=3, verify_md5=False)
    assert bench.name == "split_mnist" and len(bench) == 5
    assert bench.input_dim == 784 and not bench.shared_head
    for t, task in enumerate(bench.tasks):
        assert task.num_classes == 2
        pool = np.array([i for i, y in enumerate(TRAIN_LABELS) if y in (2 * t, 2 * t + 1)])
        test = [i for i, y in enumerate(TEST_LABELS) if y in (2 * t, 2 * t + 1)]
        perm = sklearn_shuffle(np.arange(len(pool)), random_state=3)
        n_val = int(0.1 * len(pool))
        np.testing.assert_array_equal(image_ids(task.val.inputs), pool[perm[:n_val]])
        np.testing.assert_array_equal(image_ids(task.train.inputs), pool[perm[n_val:]])
        np.testing.assert_array_equal(image_ids(task.test.inputs), test)
        for split, labels in ((task.train, TRAIN_LABELS), (task.val, TRAIN_LABELS), (task.test, TEST_LABELS)):
            expected = [int(labels[i]) - 2 * t for i in image_ids(split.inputs)]
            assert split.labels.dtype == torch.int64 and split.labels.tolist() == expected
            assert set(expected) <= {0, 1}


def test_split_mnist_train_per_task(mnist_root: Path) -> None:
    bench = split_mnist(mnist_root, seed=0, train_per_task=20, verify_md5=False)
    full = split_mnist(mnist_root, seed=0, verify_md5=False)
    for task, whole in zip(bench.tasks, full.tasks, strict=True):
        assert len(task.train) == 20
        assert torch.equal(task.train.inputs, whole.train.inputs[:20])
        assert torch.equal(task.val.inputs, whole.val.inputs)
    with pytest.raises(ValueError, match="train_per_task=100000"):
        split_mnist(mnist_root, seed=0, train_per_task=100_000, verify_md5=False)


def test_split_mnist_transform_is_normalised_flat_pixels(mnist_root: Path) -> None:
    task = split_mnist(mnist_root, seed=0, verify_md5=False).tasks[2]
    image = task.train.inputs[:1].numpy().astype(np.float64)
    expected = ((image / 255 - 0.1307) / 0.3081).reshape(1, 784)
    got = task.transform(task.train.inputs[:1])
    assert got.dtype == torch.float32 and got.shape == (1, 784)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_permuted_mnist_protocol(mnist_root: Path) -> None:
    bench = permuted_mnist(mnist_root, seed=5, num_tasks=3, verify_md5=False)
    assert bench.name == "permuted_mnist" and len(bench) == 3
    assert bench.input_dim == 784 and bench.shared_head
    perm = sklearn_shuffle(np.arange(600), random_state=5)
    for task in bench.tasks:
        assert task.num_classes == 10
        np.testing.assert_array_equal(image_ids(task.val.inputs), perm[:60])
        np.testing.assert_array_equal(image_ids(task.train.inputs), perm[60:])
        assert task.train.labels.tolist() == TRAIN_LABELS[perm[60:]].tolist()
        assert task.test.labels.tolist() == TEST_LABELS.tolist()
    perms = [task.transform.permutation for task in bench.tasks]
    for p in perms:
        assert sorted(p.tolist()) == list(range(784))
        assert not torch.equal(p, torch.arange(784))  # task 0 is permuted too
    assert not torch.equal(perms[0], perms[1]) and not torch.equal(perms[1], perms[2])
    for t, p in enumerate(perms):
        assert p.tolist() == np.random.default_rng([5, t]).permutation(784).tolist()
    assert bench.details["permutation_seeds"] == [[5, 0], [5, 1], [5, 2]]


def test_permuted_mnist_permutations_are_reproducible(mnist_root: Path) -> None:
    first = permuted_mnist(mnist_root, seed=5, num_tasks=3, verify_md5=False)
    again = permuted_mnist(mnist_root, seed=5, num_tasks=3, verify_md5=False)
    other = permuted_mnist(mnist_root, seed=6, num_tasks=3, verify_md5=False)
    for a, b, c in zip(first.tasks, again.tasks, other.tasks, strict=True):
        assert torch.equal(a.transform.permutation, b.transform.permutation)
        assert not torch.equal(a.transform.permutation, c.transform.permutation)


def test_permuted_mnist_transform_is_explicit_computation(mnist_root: Path) -> None:
    task = permuted_mnist(mnist_root, seed=0, num_tasks=2, verify_md5=False).tasks[1]
    raw = task.test.inputs[7]
    perm = np.random.default_rng([0, 1]).permutation(784)
    flat = ((raw.numpy().astype(np.float64) / 255 - 0.1307) / 0.3081).reshape(784)
    expected = np.array([flat[perm[j]] for j in range(784)])
    got = task.transform(raw[None])
    assert got.dtype == torch.float32 and got.shape == (1, 784)
    np.testing.assert_allclose(got[0].numpy(), expected, rtol=1e-5, atol=1e-6)


def test_permuted_mnist_train_per_task_and_shared_storage(mnist_root: Path) -> None:
    bench = permuted_mnist(mnist_root, seed=2, num_tasks=3, train_per_task=50, verify_md5=False)
    perm = sklearn_shuffle(np.arange(600), random_state=2)
    for task in bench.tasks:
        np.testing.assert_array_equal(image_ids(task.train.inputs), perm[60:110])
        assert task.train.inputs.data_ptr() == bench.tasks[0].train.inputs.data_ptr()


# ---------------------------------------------------------------- Split Digits


def test_split_digits_uses_every_image_once_with_local_labels() -> None:
    digits = load_digits()
    bench = split_digits(seed=0)
    assert bench.name == "split_digits" and len(bench) == 5
    assert bench.input_dim == 64 and not bench.shared_head
    expected = Counter(
        (img.astype(np.uint8).tobytes(), int(y)) for img, y in zip(digits.images, digits.target, strict=True)
    )
    seen: Counter = Counter()
    for t, task in enumerate(bench.tasks):
        assert task.num_classes == 2
        for split in (task.train, task.val, task.test):
            assert split.inputs.dtype == torch.uint8
            assert set(split.labels.tolist()) == {0, 1}
            seen.update((x.numpy().tobytes(), int(y) + 2 * t) for x, y in zip(split.inputs, split.labels, strict=True))
        class_counts = np.bincount(digits.target)
        for c in (0, 1):
            n_test = int((task.test.labels == c).sum())
            assert n_test == math.ceil(0.25 * class_counts[2 * t + c])
    assert seen == expected


def test_split_digits_test_split_is_fixed_and_validation_follows_seed() -> None:
    a, b = split_digits(seed=0), split_digits(seed=1)
    for ta, tb in zip(a.tasks, b.tasks, strict=True):
        assert torch.equal(ta.test.inputs, tb.test.inputs) and torch.equal(ta.test.labels, tb.test.labels)
        assert not torch.equal(ta.val.inputs, tb.val.inputs)
        n_pool = len(ta.train) + len(ta.val)
        assert len(ta.val) == int(0.1 * n_pool)


def test_split_digits_transform() -> None:
    task = split_digits(seed=0).tasks[0]
    raw = task.train.inputs[:3]
    expected = raw.numpy().astype(np.float64).reshape(3, 64) / 16
    got = task.transform(raw)
    assert got.dtype == torch.float32 and got.shape == (3, 64)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6)


# ---------------------------------------------------------------- helpers


def test_validation_split_matches_sklearn_shuffle() -> None:
    # drawn without scikit-learn (whose import costs most of a second): the same permutation as its shuffle
    for n, pc_valid, seed in ((1000, 0.15, 7), (60000, 0.1, 1), (54321, 0.1, 37), (7, 0.5, 0), (1, 0.0, 4)):
        train, val = validation_split(n, pc_valid, seed=seed)
        perm = sklearn_shuffle(np.arange(n), random_state=seed)
        n_val = int(pc_valid * n)
        np.testing.assert_array_equal(val, perm[:n_val])
        np.testing.assert_array_equal(train, perm[n_val:])
    train, val = validation_split(10, 0.0, seed=0)
    assert len(val) == 0 and sorted(train) == list(range(10))
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match="pc_valid"):
            validation_split(10, bad, seed=0)


def test_iterate_batches_covers_every_index_once() -> None:
    split = Split(torch.arange(23, dtype=torch.uint8)[:, None], torch.arange(23))

    def transform(x: torch.Tensor) -> torch.Tensor:
        return x.float()

    batches = list(iterate_batches(split, transform, 5, shuffle=True, generator=torch.Generator().manual_seed(0)))
    assert [len(y) for _, y in batches] == [5, 5, 5, 5, 3]
    order = torch.cat([y for _, y in batches])
    assert sorted(order.tolist()) == list(range(23)) and order.tolist() != list(range(23))
    for x, y in batches:
        assert x.dtype == torch.float32 and x.device.type == "cpu"
        assert x[:, 0].long().tolist() == y.tolist()  # inputs and labels stay paired
    again = list(iterate_batches(split, transform, 5, shuffle=True, generator=torch.Generator().manual_seed(0)))
    assert torch.equal(order, torch.cat([y for _, y in again]))
    plain = torch.cat([y for _, y in iterate_batches(split, transform, 5)])
    assert plain.tolist() == list(range(23))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_iterate_batches_on_cuda(mnist_root: Path) -> None:
    task = permuted_mnist(mnist_root, seed=0, num_tasks=2, verify_md5=False).tasks[1]
    x, y = next(iterate_batches(task.test, task.transform, 64, device="cuda"))
    assert x.device.type == "cuda" and y.device.type == "cuda" and x.dtype == torch.float32
    torch.testing.assert_close(x.cpu(), task.transform(task.test.inputs[:64]))


def test_build_benchmark(mnist_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert set(BENCHMARKS) == {
        "split_digits",
        "split_mnist",
        "permuted_mnist",
        "split_cifar100",
        "five_datasets",
        "split_miniimagenet",
    }
    with pytest.raises(ValueError, match="split_digits, split_mnist, permuted_mnist, split_cifar100"):
        build_benchmark("cifar", seed=0)
    assert build_benchmark("split_digits", seed=0, data_root="/nonexistent").name == "split_digits"
    monkeypatch.setenv("NESS_DATA_ROOT", str(mnist_root))
    bench = build_benchmark("permuted_mnist", seed=0, num_tasks=2, verify_md5=False)
    assert len(bench) == 2
    assert build_benchmark("split_mnist", seed=0, data_root=mnist_root, verify_md5=False).name == "split_mnist"


# ---------------------------------------------------------------- the real MNIST files


@pytest.fixture(scope="module")
def real_root() -> Path:
    root = os.environ.get("NESS_DATA_ROOT")
    if not root:
        pytest.skip("NESS_DATA_ROOT is not set; point it at the folder holding mnist/ to test the real files")
    folder = Path(root) / "mnist"
    if not all((folder / name).is_file() for name in OFFICIAL_MD5):
        pytest.skip(f"the official MNIST .gz files are not all in {folder}")
    return Path(root)


def test_real_mnist_files(real_root: Path) -> None:
    for name, md5 in OFFICIAL_MD5.items():
        assert hashlib.md5((real_root / "mnist" / name).read_bytes()).hexdigest() == md5
    train_x, train_y, test_x, test_y = load_mnist(real_root)
    assert train_x.shape == (60000, 28, 28) and test_x.shape == (10000, 28, 28)
    assert train_x.dtype == np.uint8 and train_y.shape == (60000,) and test_y.shape == (10000,)
    assert np.bincount(train_y).tolist() == MNIST_TRAIN_COUNTS and sum(MNIST_TRAIN_COUNTS) == 60000
    assert np.bincount(test_y).tolist() == MNIST_TEST_COUNTS and sum(MNIST_TEST_COUNTS) == 10000


def test_real_split_and_permuted_mnist_sizes(real_root: Path) -> None:
    bench = split_mnist(real_root, seed=0)
    for t, task in enumerate(bench.tasks):
        pool = MNIST_TRAIN_COUNTS[2 * t] + MNIST_TRAIN_COUNTS[2 * t + 1]
        assert len(task.train) + len(task.val) == pool and len(task.val) == int(0.1 * pool)
        assert len(task.test) == MNIST_TEST_COUNTS[2 * t] + MNIST_TEST_COUNTS[2 * t + 1]
    permuted = permuted_mnist(real_root, seed=0, num_tasks=2)
    for task in permuted.tasks:
        assert (len(task.train), len(task.val), len(task.test)) == (54000, 6000, 10000)
    x, _ = next(iterate_batches(permuted.tasks[0].train, permuted.tasks[0].transform, 4096))
    assert abs(float(x.mean())) < 0.05 and abs(float(x.std()) - 1) < 0.05  # normalised with MNIST statistics


def test_only_a_benchmark_read_from_files_needs_a_data_root(monkeypatch):
    from ness.data import BENCHMARKS, WITHOUT_FILES, DataError, build_benchmark
    from ness.experiment import check_data_root

    monkeypatch.delenv("NESS_DATA_ROOT", raising=False)
    assert {"split_digits"} == WITHOUT_FILES
    check_data_root("split_digits", None)  # scikit-learn ships the digits
    assert len(build_benchmark("split_digits", seed=0).tasks) == 5
    for name in set(BENCHMARKS) - WITHOUT_FILES:
        with pytest.raises(DataError, match="no data root given"):
            check_data_root(name, None)


def test_take_rows_is_the_rows_at_each_index_in_order():
    """take_rows against a Python loop over the index (repeats, int32, an empty index, a strided source, uint8
    images), and against tensor[index] where it falls back to indexing (a boolean mask, a 2-D index)."""
    g = torch.Generator().manual_seed(0)
    floats, images = torch.randn(50, 7, generator=g), torch.randint(0, 255, (50, 3, 4, 4), dtype=torch.uint8)
    for source in (floats, floats[:, ::2], images):
        for index in ([3, 1, 49, 3], [], [0]):
            for dtype in (torch.int64, torch.int32):
                expected = torch.stack([source[i] for i in index]) if index else source[:0]
                assert torch.equal(take_rows(source, torch.tensor(index, dtype=dtype)), expected)
        mask, grid = torch.arange(50) % 3 == 0, torch.tensor([[1, 2], [3, 4]])
        assert torch.equal(take_rows(source, mask), torch.stack([source[i] for i in range(0, 50, 3)]))
        assert torch.equal(take_rows(source, grid), source[grid])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_take_rows_and_batch_rows_take_a_cpu_index_of_a_gpu_tensor():
    """A user's loop draws `torch.randperm` on the CPU for a split on the GPU: rows as tensor[index] gives them."""
    source = torch.randn(20, 5, device="cuda")
    index = torch.tensor([4, 0, 19, 4])
    expected = torch.stack([source[i] for i in index.tolist()])
    assert torch.equal(take_rows(source, index), expected)
    assert torch.equal(BatchRows(source, index).batch, expected)
