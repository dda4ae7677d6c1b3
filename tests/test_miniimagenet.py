"""Split miniImageNet against independent computations on small pickles in the official format.

The synthetic files are what the official ones are: a pickled dict {'images': list of 84x84x3 uint8 arrays,
'labels': list of Python ints}, written with pickle protocol 4. Pixels (0, 0, R) and (0, 0, G) of image i encode
its file index i, so every stored image can be traced back to its place in the file.
"""

from __future__ import annotations

import hashlib
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import random_split

from ness.data import DataError
from ness.data.miniimagenet import split_miniimagenet

TRAIN_PER_CLASS = 6
TEST_PER_CLASS = 2
# Labels in a shuffled order, so "file order" differs from "grouped by class".
TRAIN_LABELS = [int(c) for c in np.random.default_rng(1).permutation(np.repeat(np.arange(100), TRAIN_PER_CLASS))]
TEST_LABELS = [int(c) for c in np.random.default_rng(2).permutation(np.repeat(np.arange(100), TEST_PER_CLASS))]


def pattern(h: int, w: int, c: int) -> int:
    """Known value of pixel (h, w, c) of train image 0; zero at (0, 0, c), so image 0 still reads as id 0."""
    return (3 * h + 5 * w + 7 * c * h) % 256


def make_images(n: int, seed: int) -> list[np.ndarray]:
    images = list(np.random.default_rng(seed).integers(0, 256, size=(n, 84, 84, 3), dtype=np.uint8))
    for i, image in enumerate(images):
        image[0, 0, 0], image[0, 0, 1] = i // 256, i % 256
    return images


def write_pickle(path: Path, images: object, labels: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump({"images": images, "labels": labels}, f, protocol=4)
    return path


def write_dataset(folder: Path, train_images: object = None, train_labels: object = None) -> None:
    """Official-format train.pkl / test.pkl in `folder`; train image 0 carries `pattern`."""
    if train_images is None:
        train_images = make_images(len(TRAIN_LABELS), seed=3)
        for h in range(84):
            for w in range(84):
                for c in range(3):
                    train_images[0][h, w, c] = pattern(h, w, c)
    write_pickle(folder / "train.pkl", train_images, TRAIN_LABELS if train_labels is None else train_labels)
    write_pickle(folder / "test.pkl", make_images(len(TEST_LABELS), seed=4), TEST_LABELS)


def ids(inputs: torch.Tensor) -> list[int]:
    """File index of each stored image, read from its id pixels (now CHW: channel 0 and 1 at (0, 0))."""
    return (inputs[:, 0, 0, 0].long() * 256 + inputs[:, 1, 0, 0].long()).tolist()


def official_class_split(seed: int) -> list[list[int]]:
    """The official recipe, literally: seed numpy's global RNG, permute 100 classes, split into 20 tasks."""
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        perm = np.random.permutation(100)
        return [[int(c) for c in task] for task in np.split(perm, 20)]
    finally:
        np.random.set_state(state)


def file_order_pool(labels: list[int], classes: list[int]) -> list[int]:
    return [i for i, label in enumerate(labels) if label in classes]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data")
    write_dataset(path / "miniimagenet")
    return path


@pytest.fixture(scope="module")
def bench(root: Path):
    return split_miniimagenet(root, seed=37, pc_valid=0.2)


# ---------------------------------------------------------------- the protocol


def test_class_split_is_the_official_recipe(bench) -> None:
    expected = official_class_split(37)
    assert bench.details["class_split"] == expected
    for task, classes in zip(bench.tasks, expected, strict=True):
        stored = ids(task.train.inputs) + ids(task.val.inputs)
        assert sorted(stored) == file_order_pool(TRAIN_LABELS, classes)
        assert sorted(ids(task.test.inputs)) == file_order_pool(TEST_LABELS, classes)


def test_different_seeds_give_different_class_splits(root: Path) -> None:
    other = split_miniimagenet(root, seed=1, num_tasks=1)
    assert other.details["class_split"] == official_class_split(1)[:1]
    assert official_class_split(1) != official_class_split(37)


def test_local_label_is_position_in_task(bench) -> None:
    for task, classes in zip(bench.tasks, official_class_split(37), strict=True):
        assert task.num_classes == 5
        for split, file_labels in ((task.train, TRAIN_LABELS), (task.val, TRAIN_LABELS), (task.test, TEST_LABELS)):
            expected = []
            for i in ids(split.inputs):
                for position, c in enumerate(classes):
                    if file_labels[i] == c:
                        expected.append(position)
            assert split.labels.tolist() == expected


def test_validation_is_torch_random_split(bench) -> None:
    for task, classes in zip(bench.tasks, official_class_split(37), strict=True):
        pool = file_order_pool(TRAIN_LABELS, classes)
        n_val = math.floor(0.2 * len(pool))
        train, val = random_split(pool, [len(pool) - n_val, n_val], generator=torch.Generator().manual_seed(37))
        assert ids(task.train.inputs) == [train[k] for k in range(len(train))]
        assert ids(task.val.inputs) == [val[k] for k in range(len(val))]
    assert bench.details["task_sizes"] == [{"train": 24, "val": 6, "test": 10}] * 20


def test_test_split_is_every_test_image_in_file_order(bench) -> None:
    for task, classes in zip(bench.tasks, official_class_split(37), strict=True):
        assert ids(task.test.inputs) == file_order_pool(TEST_LABELS, classes)


def test_images_are_chw_uint8(bench) -> None:
    found = [split.inputs[k] for task in bench.tasks for split in (task.train, task.val) for k in range(len(split))]
    found = [image for image in found if image[0, 0, 0] == 0 and image[1, 0, 0] == 0]  # id 0
    assert len(found) == 1
    image = found[0]
    assert image.dtype == torch.uint8 and tuple(image.shape) == (3, 84, 84)
    for c in range(3):
        for h in range(84):
            for w in range(84):
                assert int(image[c, h, w]) == pattern(h, w, c), (c, h, w)
    assert bench.input_shape == (3, 84, 84)


def test_splits_share_one_array(bench) -> None:
    pointers = {split.inputs.untyped_storage().data_ptr() for t in bench.tasks for split in (t.train, t.val)}
    assert len(pointers) == 1


def test_normalisation_by_hand(bench) -> None:
    raw = bench.tasks[3].test.inputs[:2]
    out = bench.tasks[3].transform(raw)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    for c in range(3):
        value = int(raw[1, c, 40, 17])
        assert float(out[1, c, 40, 17]) == pytest.approx((value / 255 - mean[c]) / std[c], abs=1e-5)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 84, 84)


def test_details(bench, root: Path) -> None:
    assert bench.name == "split_miniimagenet" and len(bench) == 20 and not bench.shared_head
    files = bench.details["files"]
    for part in ("train", "test"):
        path = root / "miniimagenet" / f"{part}.pkl"
        assert files[part]["path"] == str(path)
        assert files[part]["md5"] == hashlib.md5(path.read_bytes()).hexdigest()
    assert "LYang-666/TRGP" in bench.details["source"]
    assert bench.details["seed"] == 37 and bench.details["pc_valid"] == 0.2


def test_train_per_task_keeps_the_first_training_examples(root: Path, bench) -> None:
    small = split_miniimagenet(root, seed=37, pc_valid=0.2, train_per_task=3)
    for full_task, task in zip(bench.tasks, small.tasks, strict=True):
        assert ids(task.train.inputs) == ids(full_task.train.inputs)[:3]
        assert task.train.labels.tolist() == full_task.train.labels.tolist()[:3]
        assert ids(task.val.inputs) == ids(full_task.val.inputs)
        assert ids(task.test.inputs) == ids(full_task.test.inputs)
    with pytest.raises(ValueError, match=r"train_per_task=25 .* 24 training images"):
        split_miniimagenet(root, seed=37, pc_valid=0.2, train_per_task=25)


def test_num_tasks_keeps_the_first_tasks(root: Path, bench) -> None:
    first = split_miniimagenet(root, seed=37, pc_valid=0.2, num_tasks=3)
    assert len(first) == 3 and first.details["class_split"] == official_class_split(37)[:3]
    for full_task, task in zip(bench.tasks[:3], first.tasks, strict=True):
        for part in ("train", "val", "test"):
            assert ids(getattr(task, part).inputs) == ids(getattr(full_task, part).inputs)
    for bad in (0, 21):
        with pytest.raises(ValueError, match="num_tasks"):
            split_miniimagenet(root, seed=37, num_tasks=bad)


def test_default_pc_valid_and_image_array_format(tmp_path: Path) -> None:
    write_dataset(tmp_path, train_images=np.stack(make_images(len(TRAIN_LABELS), seed=3)))
    small = split_miniimagenet(tmp_path, seed=5, num_tasks=2)  # files in the root; 'images' one (N,84,84,3) array
    assert [len(t.val) for t in small.tasks] == [0, 0]  # floor(0.02 * 30) = 0
    assert sorted(ids(small.tasks[0].train.inputs)) == file_order_pool(TRAIN_LABELS, official_class_split(5)[0])


@pytest.mark.parametrize("folder", ["mini-imagenet", "MiniImageNet"])
def test_other_folders_are_searched(tmp_path: Path, folder: str) -> None:
    write_dataset(tmp_path / folder)
    found = split_miniimagenet(tmp_path, seed=1, num_tasks=1)
    assert found.details["files"]["test"]["path"] == str(tmp_path / folder / "test.pkl")


# ---------------------------------------------------------------- bad input


def test_missing_file_names_expected_paths(tmp_path: Path) -> None:
    write_dataset(tmp_path / "miniimagenet")
    (tmp_path / "miniimagenet" / "test.pkl").unlink()
    with pytest.raises(DataError) as err:
        split_miniimagenet(tmp_path, seed=1)
    message = str(err.value)
    for place in ("miniimagenet", "mini-imagenet", "."):
        assert str(tmp_path / place / "test.pkl") in message
    assert "train.pkl" not in message.split("To fix")[0] and "LYang-666/TRGP" in message


def test_truncated_pickle(tmp_path: Path) -> None:
    write_dataset(tmp_path)
    path = tmp_path / "train.pkl"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError, match="truncated") as err:
        split_miniimagenet(tmp_path, seed=1)
    assert str(path) in str(err.value)


def test_missing_key(tmp_path: Path) -> None:
    write_dataset(tmp_path)
    with open(tmp_path / "test.pkl", "wb") as f:
        pickle.dump({"data": [], "labels": TEST_LABELS}, f, protocol=4)
    with pytest.raises(DataError, match=r"keys 'images' and 'labels', found \['data', 'labels'\]") as err:
        split_miniimagenet(tmp_path, seed=1)
    assert str(tmp_path / "test.pkl") in str(err.value)


@pytest.mark.parametrize(
    ("bad", "found"),
    [(np.zeros((32, 32, 3), np.uint8), r"a uint8 array of shape \(32, 32, 3\)"), ("x", "a str")],
)
def test_bad_image(tmp_path: Path, bad: object, found: str) -> None:
    images = make_images(len(TRAIN_LABELS), seed=3)
    images[7] = bad
    write_dataset(tmp_path, train_images=images)
    with pytest.raises(DataError, match=f"image 7 is {found}, expected an 84x84x3 uint8") as err:
        split_miniimagenet(tmp_path, seed=1)
    assert str(tmp_path / "train.pkl") in str(err.value)


def test_float_images_are_rejected(tmp_path: Path) -> None:
    write_dataset(tmp_path, train_images=[image.astype(np.float32) for image in make_images(len(TRAIN_LABELS), 3)])
    with pytest.raises(DataError, match=r"image 0 is a float32 array of shape \(84, 84, 3\)"):
        split_miniimagenet(tmp_path, seed=1)


def test_label_out_of_range(tmp_path: Path) -> None:
    labels = list(TRAIN_LABELS)
    labels[11] = 100
    write_dataset(tmp_path, train_labels=labels)
    with pytest.raises(DataError, match=r"1 labels outside 0..99 \(first: 100 at index 11\)") as err:
        split_miniimagenet(tmp_path, seed=1)
    assert str(tmp_path / "train.pkl") in str(err.value)


def test_count_mismatch(tmp_path: Path) -> None:
    write_dataset(tmp_path, train_labels=[*TRAIN_LABELS, 0])
    with pytest.raises(DataError, match="600 images but 601 labels") as err:
        split_miniimagenet(tmp_path, seed=1)
    assert str(tmp_path / "train.pkl") in str(err.value)


def test_missing_classes_point_at_few_shot_files(tmp_path: Path) -> None:
    write_dataset(tmp_path, train_labels=[label % 64 for label in TRAIN_LABELS])
    with pytest.raises(DataError, match=r"no images of 36 of the 100 classes \(first missing: 64\).*few-shot"):
        split_miniimagenet(tmp_path, seed=1)


def test_download_is_refused_with_instructions(root: Path) -> None:
    with pytest.raises(DataError, match=r"cannot be downloaded automatically.*LYang-666/TRGP"):
        split_miniimagenet(root, seed=1, download=True)
