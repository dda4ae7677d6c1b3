"""Split miniImageNet (20 tasks × 5 classes) from the train.pkl / test.pkl pickles of the TRGP/DFGP/NESS loaders.

Protocol (METHODS_SPEC §1.2): the run seed permutes the 100 classes into 20 tasks of 5; the local label is the
class's position in its task; per task, `floor(pc_valid·n)` training images become validation as
`torch.utils.data.random_split` picks them; test = every test image of the task's classes.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from ness.data.files import DatasetFiles, OfficialFile, load_pickled_dict, locate, md5sum
from ness.data.mnist import resolve_data_root
from ness.data.tasks import Benchmark, DataError, ImageTransform, Split, Task, keep_first_training

NUM_CLASSES = 100
NUM_TASKS = 20
CLASSES_PER_TASK = NUM_CLASSES // NUM_TASKS
IMAGE_HWC = (84, 84, 3)
"""One stored image: height, width, RGB channels."""
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SEARCH_DIRS = ("miniimagenet", "mini-imagenet", "MiniImageNet", ".")
"""Folders under the data root searched for the pickles: TRGP's `data/miniimagenet/`, a common variant, NESS's
`./data/MiniImageNet/`, and the root itself."""

MINIIMAGENET_FILES = DatasetFiles(
    name="miniImageNet",
    files={
        part: OfficialFile(tuple(str(Path(folder) / f"{part}.pkl") for folder in SEARCH_DIRS))
        for part in ("train", "test")
    },
    source=(
        "download train.pkl and test.pkl from the Google Drive link in the README of LYang-666/TRGP "
        "(https://github.com/LYang-666/TRGP) and put them in <data root>/miniimagenet/. They are built from the "
        "600-image-per-class miniImageNet (84x84 RGB): 500 train and 100 test images per class, 100 classes. "
        "No official md5 is published; the md5 of the files read is recorded in the benchmark details"
    ),
)


def split_miniimagenet(
    data_root: str | Path | None,
    seed: int,
    pc_valid: float = 0.02,
    train_per_task: int | None = None,
    num_tasks: int = NUM_TASKS,
    download: bool = False,
) -> Benchmark:
    """Split miniImageNet as the official loaders build it; `num_tasks` keeps the first tasks, `train_per_task`
    the first training examples of each (quick CPU presets).

    Only the kept images are stored, as one uint8 (N, 3, 84, 84) array per file in task order; every split is a
    slice of it. The official Resize((84, 84)) is the identity on 84×84 images (PIL returns a copy when the size
    already matches), so the transform is ToTensor + ImageNet Normalize only.
    """
    if download:
        raise DataError(f"miniImageNet cannot be downloaded automatically; {MINIIMAGENET_FILES.source}")
    if not 1 <= num_tasks <= NUM_TASKS:
        raise ValueError(f"num_tasks must be in 1..{NUM_TASKS}, got {num_tasks}")
    if not 0 <= pc_valid < 1:
        raise ValueError(f"pc_valid must be in [0, 1), got {pc_valid}")
    root = resolve_data_root(data_root)
    paths = locate(root, MINIIMAGENET_FILES)
    classes = task_classes(seed)
    local_label = np.empty(NUM_CLASSES, dtype=np.int64)
    local_label[classes] = np.arange(CLASSES_PER_TASK)
    used = classes[:num_tasks]

    train_images, train_labels = _read_pickle(paths["train"])
    train_groups = []  # train, val, train, val, ... file indices, one pair per task
    for t, task in enumerate(used):
        pool = np.flatnonzero(np.isin(train_labels, task))  # file order, as the official loader collects them
        train_pos, val_pos = random_split_indices(len(pool), pc_valid, seed)
        train_pos = keep_first_training(train_pos, train_per_task, f"miniimagenet {t}")
        train_groups += [pool[train_pos], pool[val_pos]]
    train_splits = _slices(_gather(train_images, train_groups, paths["train"]), local_label[train_labels], train_groups)
    del train_images  # frees the pickled train set before the test pickle loads

    test_images, test_labels = _read_pickle(paths["test"])
    test_groups = [np.flatnonzero(np.isin(test_labels, task)) for task in used]
    test_splits = _slices(_gather(test_images, test_groups, paths["test"]), local_label[test_labels], test_groups)

    transform = ImageTransform(mean=IMAGENET_MEAN, std=IMAGENET_STD)
    tasks = tuple(
        Task(
            f"miniimagenet {t} (classes {', '.join(str(c) for c in task)})",
            CLASSES_PER_TASK,
            train_splits[2 * t],
            train_splits[2 * t + 1],
            test_splits[t],
            transform,
        )
        for t, task in enumerate(used)
    )
    details = {
        "data_root": str(root),
        "files": {
            role: {"path": str(path), "md5": md5sum(path), "md5_verified": False} for role, path in paths.items()
        },
        "source": MINIIMAGENET_FILES.source,
        "seed": seed,
        "pc_valid": pc_valid,
        "train_per_task": train_per_task,
        "num_tasks": num_tasks,
        "class_split": [[int(c) for c in task] for task in used],
        "class_split_rule": "numpy.random.RandomState(seed).permutation(100) split into 20 groups of 5",
        "validation_rule": (
            "per task: torch.randperm(n, generator=torch.Generator().manual_seed(seed)); the last "
            "floor(pc_valid*n) entries are validation (torch.utils.data.random_split's order)"
        ),
        "transform": "x/255, Normalize(ImageNet mean, std); Resize((84, 84)) is the identity on 84x84 images",
        "task_sizes": [{"train": len(k.train), "val": len(k.val), "test": len(k.test)} for k in tasks],
    }
    return Benchmark("split_miniimagenet", tasks, input_shape=(3, 84, 84), shared_head=False, details=details)


def task_classes(seed: int) -> np.ndarray:
    """(20, 5) original class ids of each task: the official `np.random.seed(seed); np.split(np.random.permutation(
    100), 20)`, drawn from a private RandomState so numpy's global RNG is left alone."""
    return np.random.RandomState(seed).permutation(NUM_CLASSES).reshape(NUM_TASKS, CLASSES_PER_TASK)


def random_split_indices(n: int, pc_valid: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) positions of range(n) as `random_split(range(n), [n - k, k], generator)` returns them, with
    k = floor(pc_valid·n) and the generator seeded by `seed`: a randperm whose last k entries are validation.

    The official loaders draw from torch's global RNG, whose state by then depends on model initialisation, so
    their exact split cannot be reproduced; a fresh generator per task keeps the split a function of the seed.
    """
    if not 0 <= pc_valid < 1:
        raise ValueError(f"pc_valid must be in [0, 1), got {pc_valid}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
    n_train = n - math.floor(pc_valid * n)
    return perm[:n_train], perm[n_train:]


def _read_pickle(path: Path) -> tuple[list | tuple | np.ndarray, np.ndarray]:
    """The images (as stored) and int64 labels of one pickle; checks the keys, the counts and the labels."""
    data = load_pickled_dict(
        path, ("images", "labels"), "this is not the miniImageNet pickle from the TRGP README, download it again"
    )
    images = data["images"]
    if not isinstance(images, list | tuple | np.ndarray):
        raise DataError(f"{path}: 'images' is a {type(images).__name__}, expected a list or array of images")
    labels = np.asarray(data["labels"])
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"{path}: 'labels' must be a flat list of integers, got dtype {labels.dtype} and shape {labels.shape}"
        )
    if len(images) != len(labels):
        raise DataError(
            f"{path}: {len(images)} images but {len(labels)} labels; the file is damaged, download it again"
        )
    bad = np.flatnonzero((labels < 0) | (labels >= NUM_CLASSES))
    if len(bad):
        raise DataError(
            f"{path}: {len(bad)} labels outside 0..{NUM_CLASSES - 1} (first: {labels[bad[0]]} at index {bad[0]}); "
            "the file is damaged or not the 100-class miniImageNet pickle, download it again"
        )
    missing = np.setdiff1d(np.arange(NUM_CLASSES), labels)
    if len(missing):
        raise DataError(
            f"{path}: no images of {len(missing)} of the {NUM_CLASSES} classes (first missing: {missing[0]}); "
            "a few-shot miniImageNet split (64/16/20 classes) is not this benchmark's file, get the pickles "
            "linked from the TRGP README"
        )
    return images, labels.astype(np.int64)


def _gather(images: list | tuple | np.ndarray, groups: list[np.ndarray], path: Path) -> torch.Tensor:
    """uint8 (N, 3, 84, 84): the images at the concatenated `groups` file indices, in that order, HWC → CHW.

    Every image is checked; images outside `groups` are not copied.
    """
    order = np.concatenate(groups)
    destination = np.full(len(images), -1, dtype=np.int64)
    destination[order] = np.arange(len(order))
    out = np.empty((len(order), IMAGE_HWC[2], *IMAGE_HWC[:2]), dtype=np.uint8)
    for i in range(len(images)):
        image = images[i]
        if not isinstance(image, np.ndarray) or image.shape != IMAGE_HWC or image.dtype != np.uint8:
            is_array = isinstance(image, np.ndarray)
            found = f"a {image.dtype} array of shape {image.shape}" if is_array else f"a {type(image).__name__}"
            raise DataError(
                f"{path}: image {i} is {found}, expected an 84x84x3 uint8 array (height, width, RGB); the file is "
                "damaged or not the miniImageNet pickle from the TRGP README, download it again"
            )
        if destination[i] >= 0:
            out[destination[i]] = image.transpose(2, 0, 1)
    return torch.from_numpy(out)


def _slices(inputs: torch.Tensor, local_labels: np.ndarray, groups: list[np.ndarray]) -> list[Split]:
    """One Split per group: consecutive slices of `inputs` (stored in group order) with the groups' local labels."""
    splits, start = [], 0
    for idx in groups:
        splits.append(Split(inputs[start : start + len(idx)], torch.from_numpy(local_labels[idx])))
        start += len(idx)
    return splits
