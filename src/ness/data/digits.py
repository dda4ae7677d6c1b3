"""Split Digits: scikit-learn's bundled 8x8 handwritten digits as five 2-class tasks, no download needed."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ness.data.tasks import Benchmark, PixelTransform, Task, subset, validation_split

TEST_FRACTION = 0.25
TEST_SEED = 0


def split_digits(data_root: str | Path | None = None, *, seed: int, pc_valid: float = 0.1) -> Benchmark:
    """Five tasks of digits (2t, 2t+1) with local labels 0/1, tested on the same images for every seed. The images
    ship with scikit-learn, so `data_root` (the signature every benchmark builder shares) is not read.

    The test split is ceil(25 %) of each class (random_state 0); `seed` only chooses the validation split.
    """
    # imported here: scikit-learn takes most of a second to import, which every other command would pay
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels = digits.images
    if pixels.min() < 0 or pixels.max() > 16 or not np.array_equal(pixels, pixels.round()):
        raise ValueError("sklearn's load_digits() gave pixels outside the integers 0..16; reinstall scikit-learn")
    images = pixels.astype(np.uint8)
    targets = digits.target
    transform = PixelTransform(scale=16.0)
    tasks = []
    for t in range(5):
        classes = (2 * t, 2 * t + 1)
        per_class = [
            train_test_split(np.flatnonzero(targets == c), test_size=TEST_FRACTION, random_state=TEST_SEED)
            for c in classes
        ]
        pool = np.sort(np.concatenate([rest for rest, _ in per_class]))
        test_idx = np.sort(np.concatenate([held_out for _, held_out in per_class]))
        train_pos, val_pos = validation_split(len(pool), pc_valid, seed)
        train = subset(images, targets, pool[train_pos], label_offset=2 * t)
        val = subset(images, targets, pool[val_pos], label_offset=2 * t)
        test = subset(images, targets, test_idx, label_offset=2 * t)
        tasks.append(Task(f"digits {classes[0]}-{classes[1]}", 2, train, val, test, transform))
    details = {
        "source": "sklearn.datasets.load_digits",
        "num_images": len(targets),
        "test_fraction_per_class": TEST_FRACTION,
        "test_split_seed": TEST_SEED,
        "seed": seed,
        "pc_valid": pc_valid,
        "task_sizes": [{"train": len(k.train), "val": len(k.val), "test": len(k.test)} for k in tasks],
    }
    return Benchmark("split_digits", tuple(tasks), input_shape=(64,), shared_head=False, details=details)
