"""CIFAR-10 and CIFAR-100 from the official "python version" pickles (md5-checked), and Split CIFAR-100 (GPM protocol).

Where the files may lie under the data root (the unpacked official archives, which is also torchvision's layout):

- CIFAR-10:  ``cifar-10-batches-py/data_batch_1`` … ``data_batch_5`` and ``cifar-10-batches-py/test_batch``
- CIFAR-100: ``cifar-100-python/train``, ``cifar-100-python/test`` and ``cifar-100-python/meta``

Each batch is a Python 2 pickle of a dict: ``data`` is a uint8 (N, 3072) array whose rows hold one image as the
1024 red, then 1024 green, then 1024 blue pixels, each plane row-major (so it reshapes to (N, 3, 32, 32));
CIFAR-10 has ``labels``, CIFAR-100 ``fine_labels`` and ``coarse_labels`` (lists of int). The md5 of every file is
the one torchvision checks.

Split CIFAR-100 (METHODS_SPEC §1.2): task t holds fine classes 10t … 10t+9 with local label = class mod 10; the
first int(pc_valid·n) entries of sklearn.utils.shuffle(arange(n), random_state=seed) over the task's n training
images (dataset order) are validation; the test split is every test image of those classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ness.data.files import DatasetFiles, OfficialFile, load_pickle, locate
from ness.data.files import verify_md5 as check_md5
from ness.data.mnist import resolve_data_root
from ness.data.tasks import Benchmark, DataError, ImageTransform, Split, Task, train_val_indices

IMAGE_SHAPE = (3, 32, 32)
CIFAR_MEAN = (125.3 / 255, 123.0 / 255, 113.9 / 255)
CIFAR_STD = (63.0 / 255, 62.1 / 255, 66.7 / 255)
"""Normalisation of the GPM-family CIFAR loaders (CIFAR-100, and CIFAR-10 in 5-datasets)."""
CIFAR100_TASKS = 10
CLASSES_PER_TASK = 10

CIFAR10_DIR = "cifar-10-batches-py"
CIFAR100_DIR = "cifar-100-python"
CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))

CIFAR10_FILES = DatasetFiles(
    name="CIFAR-10",
    files={
        role: OfficialFile((f"{CIFAR10_DIR}/{role}",), md5)
        for role, md5 in (
            ("data_batch_1", "c99cafc152244af753f735de768cd75f"),
            ("data_batch_2", "d4bba439e000b95fd0a9bffe97cbabec"),
            ("data_batch_3", "54ebc095f3ab1f0389bbae665268c751"),
            ("data_batch_4", "634d18415352ddfa80567beed471001a"),
            ("data_batch_5", "482c414d41f54cd18b22e5b47cb7c3cb"),
            ("test_batch", "40351d587109b95175f43aff81a1287e"),
        )
    },
    source=(
        "download https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz (the 'CIFAR-10 python version') and "
        f"unpack it in the data root, which creates {CIFAR10_DIR}/"
    ),
    torchvision=(("CIFAR10", {"train": True}), ("CIFAR10", {"train": False})),
)

CIFAR100_FILES = DatasetFiles(
    name="CIFAR-100",
    files={
        role: OfficialFile((f"{CIFAR100_DIR}/{role}",), md5)
        for role, md5 in (
            ("train", "16019d7e3df5f24257cddd939b257f8d"),
            ("test", "f0ef6b0ae62326f3e7ffdfab6717acfc"),
            ("meta", "7973b15100ade9c7d40fb424638fde48"),
        )
    },
    source=(
        "download https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz (the 'CIFAR-100 python version') and "
        f"unpack it in the data root, which creates {CIFAR100_DIR}/"
    ),
    torchvision=(("CIFAR100", {"train": True}), ("CIFAR100", {"train": False})),
)


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """One dataset as read from its files: uint8 (N, C, H, W) images, int64 labels 0..num_classes-1, and a
    JSON-able record of the files read (path, and whether its md5 was checked) for the benchmark details."""

    name: str
    num_classes: int
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    files: dict[str, dict]
    class_names: tuple[str, ...] | None = None


def load_cifar10(root: Path, verify_md5: bool = True, download: bool = False) -> ImageDataset:
    """CIFAR-10: the five training batches concatenated in order (50,000 images officially) and the test batch."""
    spec = CIFAR10_FILES
    paths = locate(root, spec, download)
    md5 = {role: official.md5 if verify_md5 else None for role, official in spec.files.items()}
    train = [_read_batch(paths[role], md5[role], "labels", 10) for role in CIFAR10_TRAIN_BATCHES]
    train_images = np.concatenate([images for images, _ in train])
    train_labels = np.concatenate([labels for _, labels in train])
    test_images, test_labels = _read_batch(paths["test_batch"], md5["test_batch"], "labels", 10)
    check_every_class(train_labels, 10, f"the training batches in {root / CIFAR10_DIR}")
    check_every_class(test_labels, 10, str(paths["test_batch"]))
    return ImageDataset(
        "cifar10", 10, train_images, train_labels, test_images, test_labels, _file_record(paths, verify_md5)
    )


def load_cifar100(root: Path, verify_md5: bool = True, download: bool = False) -> ImageDataset:
    """CIFAR-100 with its 100 fine labels (50,000 train and 10,000 test images officially) and fine class names."""
    spec = CIFAR100_FILES
    paths = locate(root, spec, download)
    md5 = {role: official.md5 if verify_md5 else None for role, official in spec.files.items()}
    train_images, train_labels = _read_batch(paths["train"], md5["train"], "fine_labels", 100)
    test_images, test_labels = _read_batch(paths["test"], md5["test"], "fine_labels", 100)
    check_every_class(train_labels, 100, str(paths["train"]))
    check_every_class(test_labels, 100, str(paths["test"]))
    return ImageDataset(
        "cifar100",
        100,
        train_images,
        train_labels,
        test_images,
        test_labels,
        _file_record(paths, verify_md5),
        _read_class_names(paths["meta"], md5["meta"]),
    )


def split_cifar100(
    data_root: str | Path | None,
    seed: int,
    pc_valid: float = 0.05,
    train_per_task: int | None = None,
    num_tasks: int = CIFAR100_TASKS,
    verify_md5: bool = True,
    download: bool = False,
) -> Benchmark:
    """Split CIFAR-100 as the GPM-family loaders build it; `num_tasks` keeps the first tasks, `train_per_task`
    the first training examples of each (quick CPU presets). Images stay uint8, gathered once per file."""
    if not 1 <= num_tasks <= CIFAR100_TASKS:
        raise ValueError(f"num_tasks must be in 1..{CIFAR100_TASKS}, got {num_tasks}")
    if not 0 <= pc_valid < 1:
        raise ValueError(f"pc_valid must be in [0, 1), got {pc_valid}")
    root = resolve_data_root(data_root)
    data = load_cifar100(root, verify_md5, download)
    classes = [list(range(CLASSES_PER_TASK * t, CLASSES_PER_TASK * (t + 1))) for t in range(num_tasks)]
    names = [f"cifar100 {task[0]}-{task[-1]}" for task in classes]
    train_groups, test_groups = [], []  # train_groups: train, val, train, val, ... one pair per task
    for name, task in zip(names, classes, strict=True):
        pool = np.flatnonzero(np.isin(data.train_labels, task))  # dataset order, as the official loader collects
        train_groups += train_val_indices(pool, pc_valid, seed, train_per_task, name)
        test_groups.append(np.flatnonzero(np.isin(data.test_labels, task)))
    train_splits = grouped_splits(data.train_images, data.train_labels % CLASSES_PER_TASK, train_groups)
    test_splits = grouped_splits(data.test_images, data.test_labels % CLASSES_PER_TASK, test_groups)
    transform = ImageTransform(mean=CIFAR_MEAN, std=CIFAR_STD)
    tasks = tuple(
        Task(name, CLASSES_PER_TASK, train_splits[2 * t], train_splits[2 * t + 1], test_splits[t], transform)
        for t, name in enumerate(names)
    )
    details = {
        "data_root": str(root),
        "files": data.files,
        "source": CIFAR100_FILES.source,
        "seed": seed,
        "pc_valid": pc_valid,
        "train_per_task": train_per_task,
        "num_tasks": num_tasks,
        "class_split": classes,
        "class_names": [[data.class_names[c] for c in task] for task in classes],
        "class_split_rule": "task t = fine classes 10t..10t+9 (fixed order); local label = fine label mod 10",
        "validation_rule": (
            "per task: the first int(pc_valid*n) entries of sklearn.utils.shuffle(arange(n), random_state=seed) "
            "over the task's n training images in dataset order are validation"
        ),
        "transform": "x/255, Normalize(mean=(125.3, 123.0, 113.9)/255, std=(63.0, 62.1, 66.7)/255)",
        "task_sizes": [{"train": len(k.train), "val": len(k.val), "test": len(k.test)} for k in tasks],
    }
    return Benchmark("split_cifar100", tasks, input_shape=IMAGE_SHAPE, shared_head=False, details=details)


def grouped_splits(images: np.ndarray, labels: np.ndarray, groups: Sequence[np.ndarray]) -> list[Split]:
    """One Split per index group: the images of all groups are copied once, in group order, into one tensor
    that the Splits slice (so they share storage); `labels` are the final (task-local) labels of every image."""
    stacked = torch.from_numpy(images[np.concatenate(groups)])
    bounds = np.cumsum([0, *(len(idx) for idx in groups)])
    return [
        Split(stacked[start:stop], torch.from_numpy(labels[idx].astype(np.int64)))
        for idx, start, stop in zip(groups, bounds[:-1], bounds[1:], strict=True)
    ]


def _read_batch(path: Path, md5: str | None, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (N, 3, 32, 32) images and int64 labels of one CIFAR pickle, after its md5 (when given) and format."""
    check_md5(path, md5)
    batch = load_pickle(path)
    if not isinstance(batch, dict) or not {"data", label_key} <= batch.keys():
        found = sorted(map(str, batch)) if isinstance(batch, dict) else type(batch).__name__
        raise DataError(
            f"{path}: expected a pickled dict with keys 'data' and {label_key!r}, found {found}; "
            "this is not the official CIFAR python-version file, download it again"
        )
    data, labels = batch["data"], np.asarray(batch[label_key])
    row = int(np.prod(IMAGE_SHAPE))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != row:
        found = f"a {data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(
            f"{path}: 'data' is {found}, expected a uint8 array of shape (N, {row}) (one 3x32x32 image per row); "
            "the file is damaged or not the CIFAR python version, download it again"
        )
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"{path}: {label_key!r} must be a flat list of integers, got dtype {labels.dtype} and shape "
            f"{labels.shape}; the file is damaged, download it again"
        )
    if len(labels) != len(data):
        raise DataError(
            f"{path}: {len(data)} images but {len(labels)} labels in {label_key!r}; the file is damaged, "
            "download it again"
        )
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if len(bad):
        raise DataError(
            f"{path}: {len(bad)} labels in {label_key!r} outside 0..{num_classes - 1} (first: {labels[bad[0]]} at "
            f"index {bad[0]}); the file is damaged or belongs to another dataset, download it again"
        )
    return data.reshape(-1, *IMAGE_SHAPE), labels.astype(np.int64)


def _read_class_names(path: Path, md5: str | None) -> tuple[str, ...]:
    """The 100 fine class names of CIFAR-100's meta file."""
    check_md5(path, md5)
    meta = load_pickle(path)
    names = meta.get("fine_label_names") if isinstance(meta, dict) else None
    if not isinstance(names, list | tuple) or len(names) != 100 or not all(isinstance(n, str) for n in names):
        raise DataError(
            f"{path}: expected a pickled dict whose 'fine_label_names' lists the 100 class names; "
            "the file is damaged or not CIFAR-100's meta, download the archive again"
        )
    return tuple(names)


def check_every_class(labels: np.ndarray, num_classes: int, where: str) -> None:
    """Raise a DataError if a class has no image: a partial file would give tasks with missing classes."""
    missing = np.setdiff1d(np.arange(num_classes), labels)
    if len(missing):
        raise DataError(
            f"{where}: no images of {len(missing)} of the {num_classes} classes (first missing: {missing[0]}); "
            "the data is incomplete, download it again"
        )


def _file_record(paths: dict[str, Path], verified: bool) -> dict[str, dict]:
    """JSON-able record of the files read and whether their md5 was checked."""
    return {role: {"path": str(path), "md5_verified": verified} for role, path in paths.items()}
