"""Datasets: one registry (``registry.DATASETS``) over the readers for IDX, CIFAR pickles and ImageFolders."""

from distill.data.registry import DATASETS, Dataset, Split, check_ipc, dataset_names, get_dataset, to_float

__all__ = ["DATASETS", "Dataset", "Split", "check_ipc", "dataset_names", "get_dataset", "to_float"]
