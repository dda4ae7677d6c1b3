"""5-datasets (CIFAR-10, MNIST, SVHN, Fashion-MNIST, notMNIST; 10 classes each) as the GPM-family loaders build it.

Where the files may lie under the data root (first match wins):

- CIFAR-10: ``cifar-10-batches-py/`` (see ness.data.cifar)
- MNIST: ``mnist/``, ``MNIST/raw/`` or the root itself, gzip or uncompressed IDX (see ness.data.mnist)
- SVHN: ``svhn/train_32x32.mat`` and ``svhn/test_32x32.mat``, or both at the root (torchvision's layout)
- Fashion-MNIST: the four IDX files (MNIST's names, gzip or uncompressed) in ``fashion_mnist/`` or
  ``FashionMNIST/raw/`` (torchvision's layout); never the root, where MNIST's files of the same names may lie
- notMNIST: ``notmnist_train.pkl`` and ``notmnist_test.pkl`` in ``notmnist/``, ``notMNIST/`` or the root

Protocol (METHODS_SPEC §1.2): the task order is fixed; MNIST and Fashion-MNIST are zero-padded by 2 pixels to
32×32; grey images are normalised on their one channel, then repeated to 3 channels; the validation split is the
first int(pc_valid·n) entries of sklearn.utils.shuffle(arange(n), random_state=1) over each training set, because
the official scripts never pass their seed to the loader.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ness.data.cifar import (
    CIFAR_MEAN,
    CIFAR_STD,
    IMAGE_SHAPE,
    ImageDataset,
    check_every_class,
    grouped_splits,
    load_cifar10,
)
from ness.data.files import DatasetFiles, OfficialFile, load_pickled_dict, locate, md5sum
from ness.data.files import verify_md5 as check_md5
from ness.data.mnist import (
    IMAGES_MAGIC,
    LABELS_MAGIC,
    MNIST_FILES,
    SEARCH_DIRS,
    check_idx_arrays,
    find_mnist_files,
    load_mnist,
    read_idx,
    resolve_data_root,
)
from ness.data.tasks import Benchmark, DataError, ImageTransform, Split, Task, train_val_indices

FIVE_DATASETS = ("cifar10", "mnist", "svhn", "fashion_mnist", "notmnist")
"""The official task order."""
NORMALIZATION = {
    "cifar10": (CIFAR_MEAN, CIFAR_STD),
    "mnist": ((0.1,), (0.2752,)),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.198, 0.201, 0.197)),
    "fashion_mnist": ((0.2190,), (0.3318,)),
    "notmnist": ((0.4254,), (0.4501,)),
}
"""Per-task Normalize(mean, std) of the official loader; the grey statistics include MNIST's 2-pixel padding."""
FASHION_VARIANTS = {"real": "real", "mnist": "mnist (official loader bug)"}
"""fashion= value → what the Fashion-MNIST slot holds, as recorded in the details."""
OFFICIAL_SPLIT_SEED = 1
PAD = 2
"""Zero pixels added on each side of the 28×28 MNIST and Fashion-MNIST images (torchvision Pad(2))."""

SVHN_FILES = DatasetFiles(
    name="SVHN",
    files={
        part: OfficialFile((f"svhn/{part}_32x32.mat", f"{part}_32x32.mat"), md5)
        for part, md5 in (("train", "e26dedcc434d2e4c54c9b2d4a06d8373"), ("test", "eb5a983be6a315427106f1b164d9cef3"))
    },
    source=(
        "download train_32x32.mat and test_32x32.mat (format 2, cropped digits) from "
        "http://ufldl.stanford.edu/housenumbers/ into <data root>/svhn/"
    ),
    torchvision=(("SVHN", {"split": "train"}), ("SVHN", {"split": "test"})),
)

FASHION_MNIST_FILES = DatasetFiles(
    name="Fashion-MNIST",
    files={
        role: OfficialFile(
            tuple(
                f"{folder}/{name}"
                for folder in ("fashion_mnist", "FashionMNIST/raw")
                for name in (MNIST_FILES[role].name, MNIST_FILES[role].name.removesuffix(".gz"))
            ),
            md5,
        )
        for role, md5 in (
            ("train_images", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
            ("train_labels", "25c81989df183df01b3e8a0aad5dffbe"),
            ("test_images", "bef4ecab320f06d8554ea6380940ec79"),
            ("test_labels", "bb300cfdad3c16e7a12a480ee83cd310"),
        )
    },
    source=(
        "download the four .gz files of https://github.com/zalandoresearch/fashion-mnist (data/fashion/) into "
        "<data root>/fashion_mnist/; the md5 applies to the .gz files, uncompressed copies are read unchecked"
    ),
    torchvision=(("FashionMNIST", {"train": True}), ("FashionMNIST", {"train": False})),
)

NOTMNIST_FILES = DatasetFiles(
    name="notMNIST",
    files={
        part: OfficialFile(tuple(f"{folder}/notmnist_{part}.pkl" for folder in ("notmnist", "notMNIST", ".")))
        for part in ("train", "test")
    },
    source=(
        "unzip notmnist.zip from https://github.com/nkundiushuti/notmnist_convert (the notMNIST A-J pickles "
        "notmnist_train.pkl and notmnist_test.pkl used by HAT and GPM) into <data root>/notmnist/. No official md5 "
        "is published; the md5 of the files read is recorded in the benchmark details"
    ),
)

MNIST_DOWNLOAD = DatasetFiles(
    name="MNIST",
    files={
        role: OfficialFile(
            tuple(str(Path(folder) / name) for folder in SEARCH_DIRS for name in (f.name, f.name.removesuffix(".gz"))),
            f.md5,
        )
        for role, f in MNIST_FILES.items()
    },
    source="copy the four official MNIST .gz files into <data root>/mnist/",
    torchvision=(("MNIST", {"train": True}), ("MNIST", {"train": False})),
)
"""MNIST's files as ness.data.mnist looks for them, so a missing MNIST can be fetched through torchvision."""


def load_svhn(root: Path, verify_md5: bool = True, download: bool = False) -> ImageDataset:
    """SVHN cropped digits (73,257 train and 26,032 test images officially) as uint8 (N, 3, 32, 32); label 10
    (the digit 0 in the .mat files) becomes 0."""
    paths = locate(root, SVHN_FILES, download)
    train_images, train_labels = _read_svhn(paths["train"], SVHN_FILES.files["train"].md5 if verify_md5 else None)
    test_images, test_labels = _read_svhn(paths["test"], SVHN_FILES.files["test"].md5 if verify_md5 else None)
    check_every_class(train_labels, 10, str(paths["train"]))
    check_every_class(test_labels, 10, str(paths["test"]))
    files = {role: {"path": str(path), "md5_verified": verify_md5} for role, path in paths.items()}
    return ImageDataset("svhn", 10, train_images, train_labels, test_images, test_labels, files)


def load_fashion_mnist(root: Path, verify_md5: bool = True, download: bool = False) -> ImageDataset:
    """Fashion-MNIST (60,000 train and 10,000 test images) as uint8 (N, 1, 28, 28); the md5 is checked on .gz
    files only, as for MNIST."""
    paths = locate(root, FASHION_MNIST_FILES, download)
    checked = {role: verify_md5 and path.name.endswith(".gz") for role, path in paths.items()}
    arrays = {
        role: read_idx(
            path,
            IMAGES_MAGIC if role.endswith("images") else LABELS_MAGIC,
            FASHION_MNIST_FILES.files[role].md5 if checked[role] else None,
        )
        for role, path in paths.items()
    }
    train_images, train_labels, test_images, test_labels = check_idx_arrays(arrays, paths, "Fashion-MNIST")
    check_every_class(train_labels, 10, str(paths["train_labels"]))
    check_every_class(test_labels, 10, str(paths["test_labels"]))
    files = {role: {"path": str(path), "md5_verified": checked[role]} for role, path in paths.items()}
    return ImageDataset(
        "fashion_mnist",
        10,
        train_images[:, None],
        train_labels.astype(np.int64),
        test_images[:, None],
        test_labels.astype(np.int64),
        files,
    )


def load_notmnist(root: Path) -> ImageDataset:
    """notMNIST letters A-J from the HAT/GPM pickles as uint8 (N, 1, 32, 32); there is no official md5 to check,
    so the files' md5 is recorded instead."""
    paths = locate(root, NOTMNIST_FILES)
    train_images, train_labels = _read_notmnist(paths["train"])
    test_images, test_labels = _read_notmnist(paths["test"])
    check_every_class(train_labels, 10, str(paths["train"]))
    check_every_class(test_labels, 10, str(paths["test"]))
    files = {role: {"path": str(path), "md5": md5sum(path), "md5_verified": False} for role, path in paths.items()}
    return ImageDataset("notmnist", 10, train_images, train_labels, test_images, test_labels, files)


def pad_grey(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W) or (N, 1, H, W) → (N, 1, H+4, W+4) with a border of 2 zero pixels (28×28 → 32×32)."""
    images = images.reshape(len(images), -1, *images.shape[-2:])
    return np.pad(images, ((0, 0), (0, 0), (PAD, PAD), (PAD, PAD)))


def five_datasets(
    data_root: str | Path | None,
    seed: int,
    pc_valid: float = 0.05,
    train_per_task: int | None = None,
    datasets: Sequence[str] = FIVE_DATASETS,
    fashion: str = "real",
    split_seed: int = OFFICIAL_SPLIT_SEED,
    verify_md5: bool = True,
    download: bool = False,
) -> Benchmark:
    """5-datasets: one 10-class task per dataset of `datasets`, always in the official order (a subset keeps it).

    The validation split uses `split_seed` (1, the official loaders' fixed value) whatever the run `seed`, which
    is only recorded. fashion="mnist" reproduces the official loader's bug: MNIST digits, with Fashion-MNIST's
    normalisation, in the Fashion-MNIST slot (METHODS_SPEC §1.2 pitfall). Only the datasets used need their files.
    """
    order = _canonical_order(datasets)
    if fashion not in FASHION_VARIANTS:
        raise ValueError(f"fashion must be one of {', '.join(map(repr, FASHION_VARIANTS))}, got {fashion!r}")
    if not 0 <= pc_valid < 1:
        raise ValueError(f"pc_valid must be in [0, 1), got {pc_valid}")
    root = resolve_data_root(data_root)
    sources = {name: name for name in order}
    if fashion == "mnist" and "fashion_mnist" in sources:
        sources["fashion_mnist"] = "mnist"
    splits: dict[str, tuple[Split, Split, Split]] = {}  # by source, so the bug variant shares MNIST's tensors
    files: dict[str, dict] = {}
    tasks = []
    for name in order:
        source = sources[name]
        if source not in splits:
            data = _load(source, root, verify_md5, download)
            files[source] = data.files
            train_idx, val_idx = train_val_indices(
                np.arange(len(data.train_labels)), pc_valid, split_seed, train_per_task, name
            )
            train, val = grouped_splits(data.train_images, data.train_labels, [train_idx, val_idx])
            test = Split(torch.from_numpy(data.test_images), torch.from_numpy(data.test_labels))
            splits[source] = (train, val, test)
            del data  # frees the full training set before the next dataset loads
        mean, std = NORMALIZATION[name]
        transform = ImageTransform(mean=mean, std=std, repeat=IMAGE_SHAPE[0] // len(mean))
        task_name = name if source == name else f"{name} ({source} digits)"
        tasks.append(Task(task_name, 10, *splits[source], transform))
    details = {
        "data_root": str(root),
        "files": files,
        "datasets": list(order),
        "fashion_mnist_variant": FASHION_VARIANTS[fashion],
        "seed": seed,
        "split_seed": split_seed,
        "pc_valid": pc_valid,
        "train_per_task": train_per_task,
        "validation_rule": (
            "per task: the first int(pc_valid*n) entries of sklearn.utils.shuffle(arange(n), "
            "random_state=split_seed) are validation; the official loaders always use split_seed=1, whatever "
            "the run seed"
        ),
        "normalization": {
            name: {"mean": list(NORMALIZATION[name][0]), "std": list(NORMALIZATION[name][1])} for name in order
        },
        "transform": (
            "x/255, Normalize(mean, std) per dataset; MNIST and Fashion-MNIST zero-padded 28->32 first; grey "
            "images repeated to 3 channels after normalising"
        ),
        "task_sizes": [{"train": len(k.train), "val": len(k.val), "test": len(k.test)} for k in tasks],
    }
    return Benchmark("five_datasets", tuple(tasks), input_shape=IMAGE_SHAPE, shared_head=False, details=details)


def _canonical_order(datasets: Sequence[str]) -> tuple[str, ...]:
    """`datasets` in the official order, after rejecting a bare string, unknown names, duplicates and none."""
    valid = ", ".join(FIVE_DATASETS)
    if not datasets:
        raise ValueError(f"datasets is empty; name at least one of {valid}")
    if isinstance(datasets, str):
        raise ValueError(f"datasets must be a sequence of names such as ({datasets!r},), not the string {datasets!r}")
    unknown = [name for name in datasets if name not in FIVE_DATASETS]
    if unknown:
        raise ValueError(f"unknown dataset(s) {', '.join(map(repr, unknown))} for 5-datasets; valid names: {valid}")
    duplicates = sorted({name for name in datasets if list(datasets).count(name) > 1})
    if duplicates:
        raise ValueError(f"dataset(s) {', '.join(map(repr, duplicates))} given more than once; name each at most once")
    return tuple(name for name in FIVE_DATASETS if name in datasets)


def _load(source: str, root: Path, verify_md5: bool, download: bool) -> ImageDataset:
    """One source dataset in 5-datasets form: uint8 (N, C, 32, 32) images, int64 labels 0..9."""
    if source == "cifar10":
        return load_cifar10(root, verify_md5, download)
    if source == "svhn":
        return load_svhn(root, verify_md5, download)
    if source == "notmnist":
        return load_notmnist(root)
    if source == "fashion_mnist":
        data = load_fashion_mnist(root, verify_md5, download)
        return ImageDataset(
            data.name,
            10,
            pad_grey(data.train_images),
            data.train_labels,
            pad_grey(data.test_images),
            data.test_labels,
            data.files,
        )
    if download:
        locate(root, MNIST_DOWNLOAD, download=True)
    train_images, train_labels, test_images, test_labels = load_mnist(root, verify_md5)
    paths = find_mnist_files(root)
    check_every_class(train_labels, 10, str(paths["train_labels"]))
    check_every_class(test_labels, 10, str(paths["test_labels"]))
    files = {
        role: {"path": str(path), "md5_verified": verify_md5 and path.name.endswith(".gz")}
        for role, path in paths.items()
    }
    return ImageDataset(
        "mnist",
        10,
        pad_grey(train_images),
        train_labels.astype(np.int64),
        pad_grey(test_images),
        test_labels.astype(np.int64),
        files,
    )


def _read_svhn(path: Path, md5: str | None) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (N, 3, 32, 32) images and int64 labels 0..9 of one SVHN .mat file (X: 32×32×3×N, y: N×1 in 1..10)."""
    import scipy.io  # here, not at the top: only SVHN needs it, and it takes a tenth of a second to import

    check_md5(path, md5)
    try:
        mat = scipy.io.loadmat(path)
    except (scipy.io.matlab.MatReadError, OSError, ValueError, IndexError, NotImplementedError) as err:
        raise DataError(
            f"{path}: cannot read it as a MATLAB file ({type(err).__name__}: {err}); the file is truncated or not "
            "the SVHN format-2 .mat, download it again"
        ) from err
    images, labels = mat.get("X"), mat.get("y")
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.shape[:3] != (32, 32, 3):
        found = f"{images.dtype} {images.shape}" if isinstance(images, np.ndarray) else "missing"
        raise DataError(
            f"{path}: 'X' is {found}, expected uint8 of shape (32, 32, 3, N); this is not the SVHN format-2 "
            "(cropped digits) .mat file, download it again"
        )
    if not isinstance(labels, np.ndarray) or labels.size != images.shape[3]:
        found = f"{labels.size} labels" if isinstance(labels, np.ndarray) else "no 'y'"
        raise DataError(f"{path}: {images.shape[3]} images but {found}; the file is damaged, download it again")
    labels = labels.reshape(-1)
    bad = np.flatnonzero(~np.isin(labels, np.arange(1, 11)))
    if len(bad):
        raise DataError(
            f"{path}: {len(bad)} labels outside 1..10 (first: {labels[bad[0]]} at index {bad[0]}); SVHN's .mat "
            "files label the digit 0 as 10, so this is not an official SVHN file, download it again"
        )
    labels = np.where(labels == 10, 0, labels).astype(np.int64)  # 10 is the digit 0
    return np.ascontiguousarray(images.transpose(3, 2, 0, 1)), labels


def _read_notmnist(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (N, 1, 32, 32) images and int64 labels 0..9 of one notMNIST pickle ('features', 'labels')."""
    data = load_pickled_dict(
        path, ("features", "labels"), "this is not the notMNIST pickle of HAT/GPM, get notmnist.zip again"
    )
    images, labels = np.asarray(data["features"]), np.asarray(data["labels"])
    if images.ndim == 3:
        images = images[:, None]
    if images.shape[1:] != (1, 32, 32) or not np.issubdtype(images.dtype, np.number):
        raise DataError(
            f"{path}: 'features' is {images.dtype} of shape {images.shape}, expected (N, 1, 32, 32) or (N, 32, 32) "
            "pixel values; this is not the notMNIST pickle of HAT/GPM, get notmnist.zip again"
        )
    if images.dtype != np.uint8:
        if images.size and not (np.all(images == np.round(images)) and images.min() >= 0 and images.max() <= 255):
            raise DataError(
                f"{path}: 'features' ({images.dtype}) holds values that are not whole numbers in 0..255, so they "
                "are not 8-bit pixels; get notmnist.zip again"
            )
        images = images.astype(np.uint8)
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(
            f"{path}: {len(images)} images but 'labels' has shape {labels.shape}; expected one label per image, "
            "get notmnist.zip again"
        )
    bad = np.flatnonzero(~np.isin(labels, np.arange(10)))
    if len(bad):
        raise DataError(
            f"{path}: {len(bad)} labels outside 0..9 (first: {labels[bad[0]]} at index {bad[0]}); the file is "
            "damaged or not the notMNIST A-J pickle, get notmnist.zip again"
        )
    return images, labels.astype(np.int64)
