"""Per-class capped sampling: the one way a run or a training routine sees at most N images per class."""

from __future__ import annotations

import numpy as np

from distill.data.registry import Dataset, Split, SubsetSplit

# Offset of the sampling seed of a run's training split from the run's seed, so the cap's draw is independent
# of the draws a method makes from ``seed`` itself (e.g. the `random` baseline).
RUN_SPLIT_SEED_OFFSET = 7919


def sample_per_class(labels: np.ndarray, num_classes: int, cap: int, rng: np.random.Generator, *,
                     draw_small_classes: bool = False) -> np.ndarray:
    """Indices of at most ``cap`` images of each class, drawn without replacement: class 0's (sorted), then 1's ...

    A class with at most ``cap`` images is kept whole. ``draw_small_classes`` still draws (permutes) such a
    class from ``rng``, which advances ``rng`` differently: the evaluation's full-split trainer has always
    done so and keeps its results (and cached teachers) that way.
    """
    keep = []
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        if len(idx) > cap or draw_small_classes:
            idx = np.sort(rng.choice(idx, size=min(cap, len(idx)), replace=False))
        keep.append(idx)
    return np.concatenate(keep) if keep else np.zeros(0, dtype=np.int64)


def run_train_split(dataset: Dataset, max_per_class: int | None, seed: int) -> Split:
    """The training split a run with this seed sees: whole, or a view of ``max_per_class`` per class (nothing is
    decoded or copied here: a sample of an on-disk split is read when used, through the streaming loader)."""
    split = dataset.train
    if max_per_class is None:
        return split
    return SubsetSplit(split, run_sample(dataset, max_per_class, seed))


def run_sample(dataset: Dataset, max_per_class: int, seed: int) -> np.ndarray:
    """Rows of the training split that a run with this seed and cap sees (:func:`run_train_split`)."""
    rng = np.random.default_rng(seed + RUN_SPLIT_SEED_OFFSET)
    return sample_per_class(dataset.train.labels, dataset.num_classes, max_per_class, rng)


def random_per_class(split: Split, num_classes: int, ipc: int, seed: int) -> np.ndarray:
    """Indices of ``ipc`` images of each class drawn uniformly without replacement from ``seed``: class 0's
    (sorted), then class 1's ... What the ``random`` baseline selects and the evaluation's control scores."""
    rng = np.random.default_rng(seed)
    chosen = [np.sort(rng.choice(split.class_indices(label), size=ipc, replace=False)) for label in range(num_classes)]
    return np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)
