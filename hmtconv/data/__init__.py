"""Datasets (items are ``(float image [C, H, W], int label)``) and loaders."""
from . import mnist, torchvision_sets  # noqa: F401  (fill the registry)
from .loaders import calibration_subset, default_workers, evaluation_subset, make_loader
from .registry import DATASETS, DataInfo, Splits, get_datasets, list_datasets, register_dataset

__all__ = [
    "DATASETS",
    "DataInfo",
    "Splits",
    "calibration_subset",
    "default_workers",
    "evaluation_subset",
    "get_datasets",
    "list_datasets",
    "make_loader",
    "register_dataset",
]
