"""MNIST from the official IDX files (checked), as Split MNIST and Permuted MNIST (GPM protocol)."""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ness.data.tasks import Benchmark, DataError, PixelTransform, Split, Task, subset, train_val_indices

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049
_NDIM = {IMAGES_MAGIC: 3, LABELS_MAGIC: 1}
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
SEARCH_DIRS = ("mnist", "MNIST/raw", ".")


@dataclass(frozen=True)
class MnistFile:
    """One official MNIST file: its gzip name, md5 and size in bytes, and the IDX magic number inside."""

    name: str
    md5: str
    size: int
    magic: int


MNIST_FILES = {
    "train_images": MnistFile("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873", 9912422, IMAGES_MAGIC),
    "train_labels": MnistFile("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432", 28881, LABELS_MAGIC),
    "test_images": MnistFile("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3", 1648877, IMAGES_MAGIC),
    "test_labels": MnistFile("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c", 4542, LABELS_MAGIC),
}


def read_idx(path: Path, expected_magic: int, md5: str | None = None) -> np.ndarray:
    """Read a uint8 IDX file (gzip if the name ends in .gz), checking md5, magic number and payload length."""
    if expected_magic not in _NDIM:
        raise ValueError(f"expected_magic must be {IMAGES_MAGIC} (images) or {LABELS_MAGIC} (labels)")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found; check the path or download the file again")
    data = path.read_bytes()
    if md5 is not None and (actual := hashlib.md5(data).hexdigest()) != md5:
        raise DataError(
            f"{path}: md5 is {actual}, expected {md5}; the file is corrupt or not the official one. "
            "Download it again (or pass verify_md5=False if it is a deliberate substitute)"
        )
    if path.name.endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as err:
            raise DataError(
                f"{path}: not a valid gzip file ({err}); download it again, "
                "or remove the .gz suffix if it is an uncompressed IDX file"
            ) from err
    ndim = _NDIM[expected_magic]
    header = 4 + 4 * ndim
    truncated = f"{path}: only {len(data)} bytes, shorter than the IDX header; the file is truncated"
    if len(data) < 4:
        raise DataError(truncated)
    magic = int.from_bytes(data[:4], "big")
    if magic != expected_magic:
        hint = "; it looks gzip-compressed, so name it *.gz" if data[:2] == b"\x1f\x8b" else ""
        raise DataError(
            f"{path}: IDX magic number is {magic} (type 0x{(magic >> 8) & 0xFF:02x}, {magic & 0xFF} dims), "
            f"expected {expected_magic} (unsigned bytes, {ndim} dims){hint}; check this is the right file"
        )
    if len(data) < header:
        raise DataError(truncated)
    shape = struct.unpack(f">{ndim}I", data[4:header])
    needed = math.prod(shape)
    if len(data) - header != needed:
        raise DataError(
            f"{path}: payload is {len(data) - header} bytes but the header's shape {shape} needs {needed}; "
            "the file is truncated or damaged, download it again"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape).copy()


def resolve_data_root(data_root: str | Path | None) -> Path:
    """The data root folder: the argument if given, else $NESS_DATA_ROOT; it must exist."""
    source = "data root"
    if not data_root:
        data_root = os.environ.get("NESS_DATA_ROOT")
        source = "NESS_DATA_ROOT"
        if not data_root:
            raise DataError(
                "no data root given: pass --data-root DIR (data_root=DIR in Python) or set the "
                "NESS_DATA_ROOT environment variable to the folder that holds the datasets "
                "(mnist/, cifar-100-python/, ...)"
            )
    root = Path(data_root).expanduser()
    if not root.is_dir():
        raise DataError(
            f"{source} {root} does not exist or is not a folder; pass an existing folder with --data-root "
            "or fix NESS_DATA_ROOT"
        )
    return root


def find_mnist_files(root: Path) -> dict[str, Path]:
    """Where each official MNIST file is under `root` (.gz first); one DataError lists all missing ones."""
    found, missing = {}, []
    for role, spec in MNIST_FILES.items():
        names = (spec.name, spec.name.removesuffix(".gz"))
        hit = next((root / d / n for d in SEARCH_DIRS for n in names if (root / d / n).is_file()), None)
        if hit is None:
            missing.append(spec.name)
        else:
            found[role] = hit
    if missing:
        places = "\n".join(f"  {root / d}" for d in SEARCH_DIRS)
        raise DataError(
            f"MNIST file(s) not found: {', '.join(missing)} (gzip, or uncompressed without .gz). Looked in:\n"
            f"{places}\nTo fix: copy the four official MNIST files into {root / 'mnist'}, or, with "
            "torchvision installed and internet access, run:\n"
            f"  python -c \"import torchvision; torchvision.datasets.MNIST('{root}', download=True)\""
        )
    return found


def load_mnist(root: Path, verify_md5: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train images, train labels, test images, test labels) as uint8 arrays, checked against each other.

    With verify_md5 each .gz file must have the official size and md5 (uncompressed files are not hashed).
    """
    paths = find_mnist_files(root)
    arrays = {}
    for role, path in paths.items():
        spec = MNIST_FILES[role]
        check = verify_md5 and path.name.endswith(".gz")
        if check and (size := path.stat().st_size) != spec.size:
            raise DataError(
                f"{path}: {size} bytes, the official file has {spec.size}; it is a partial or different "
                "download, download it again"
            )
        arrays[role] = read_idx(path, spec.magic, spec.md5 if check else None)
    return check_idx_arrays(arrays, paths, "MNIST")


def check_idx_arrays(
    arrays: dict[str, np.ndarray], paths: dict[str, Path], dataset: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train images, train labels, test images, test labels) of an MNIST-format dataset (MNIST, Fashion-MNIST),
    keyed by role as in MNIST_FILES, after checking 28x28 images, one label per image and labels 0..9."""
    for part in ("train", "test"):
        images, labels = arrays[f"{part}_images"], arrays[f"{part}_labels"]
        images_path, labels_path = paths[f"{part}_images"], paths[f"{part}_labels"]
        if images.shape[1:] != (28, 28):
            raise DataError(f"{images_path}: images are {images.shape[1:]}, {dataset} images are 28x28; wrong file")
        if len(images) != len(labels):
            raise DataError(
                f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels; "
                "the two files do not belong together, download both again"
            )
        bad = np.flatnonzero(labels > 9)
        if len(bad):
            raise DataError(
                f"{labels_path}: {len(bad)} labels out of range 0..9 (first: {labels[bad[0]]} at index "
                f"{bad[0]}); the file is corrupt or not {dataset} labels, download it again"
            )
    return arrays["train_images"], arrays["train_labels"], arrays["test_images"], arrays["test_labels"]


def split_mnist(
    data_root: str | Path | None,
    seed: int,
    pc_valid: float = 0.1,
    train_per_task: int | None = None,
    verify_md5: bool = True,
) -> Benchmark:
    """Five tasks of digits (2t, 2t+1), local labels 0/1; test: every official test image of those digits."""
    root = resolve_data_root(data_root)
    train_x, train_y, test_x, test_y = load_mnist(root, verify_md5)
    transform = PixelTransform(255.0, MNIST_MEAN, MNIST_STD)
    tasks = []
    for t in range(5):
        classes = (2 * t, 2 * t + 1)
        name = f"mnist {classes[0]}-{classes[1]}"
        pool = np.flatnonzero(np.isin(train_y, classes))
        test_idx = np.flatnonzero(np.isin(test_y, classes))
        if len(pool) == 0 or len(test_idx) == 0:
            part = "training" if len(pool) == 0 else "test"
            raise DataError(
                f"{root}: MNIST has no {part} images of digits {classes}; "
                "the label files are incomplete, download them again"
            )
        train_idx, val_idx = train_val_indices(pool, pc_valid, seed, train_per_task, name)
        train = subset(train_x, train_y, train_idx, label_offset=2 * t)
        val = subset(train_x, train_y, val_idx, label_offset=2 * t)
        test = subset(test_x, test_y, test_idx, label_offset=2 * t)
        tasks.append(Task(name, 2, train, val, test, transform))
    details = {
        **_source_details(root, verify_md5),
        "seed": seed,
        "pc_valid": pc_valid,
        "train_per_task": train_per_task,
        "task_sizes": [{"train": len(k.train), "val": len(k.val), "test": len(k.test)} for k in tasks],
    }
    return Benchmark("split_mnist", tuple(tasks), input_shape=(784,), shared_head=False, details=details)


def permuted_mnist(
    data_root: str | Path | None,
    seed: int,
    num_tasks: int = 10,
    pc_valid: float = 0.1,
    train_per_task: int | None = None,
    verify_md5: bool = True,
) -> Benchmark:
    """GPM Permuted MNIST: every task (task 0 too) permutes the 784 normalised pixels by its own fixed
    permutation (see task_permutation); 10 classes, one shared head; all tasks share the image tensors."""
    if num_tasks < 1:
        raise ValueError(f"num_tasks must be at least 1, got {num_tasks}")
    root = resolve_data_root(data_root)
    train_x, train_y, test_x, test_y = load_mnist(root, verify_md5)
    train_idx, val_idx = train_val_indices(np.arange(len(train_y)), pc_valid, seed, train_per_task, "mnist")
    train = subset(train_x, train_y, train_idx)
    val = subset(train_x, train_y, val_idx)
    test = Split(torch.from_numpy(test_x), torch.from_numpy(test_y.astype(np.int64)))
    tasks = tuple(
        Task(
            f"mnist perm {t}",
            10,
            train,
            val,
            test,
            PixelTransform(255.0, MNIST_MEAN, MNIST_STD, task_permutation(seed, t)),
        )
        for t in range(num_tasks)
    )
    details = {
        **_source_details(root, verify_md5),
        "seed": seed,
        "pc_valid": pc_valid,
        "train_per_task": train_per_task,
        "num_tasks": num_tasks,
        "permutation": "numpy.random.default_rng([seed, task]).permutation(784), task 0 included",
        "permutation_seeds": [[seed, t] for t in range(num_tasks)],
        "task_sizes": {"train": len(train), "val": len(val), "test": len(test)},
    }
    return Benchmark("permuted_mnist", tasks, input_shape=(784,), shared_head=True, details=details)


def task_permutation(seed: int, task: int) -> torch.Tensor:
    """The fixed pixel permutation of Permuted MNIST task `task`: numpy default_rng([seed, task])."""
    return torch.from_numpy(np.random.default_rng([seed, task]).permutation(784))


def _source_details(root: Path, verify_md5: bool) -> dict:
    """JSON-able record of which MNIST files were read and whether their md5 was checked."""
    return {
        "data_root": str(root),
        "files": {
            role: {"path": str(path), "md5_verified": verify_md5 and path.name.endswith(".gz")}
            for role, path in find_mnist_files(root).items()
        },
    }
