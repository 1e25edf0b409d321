"""Data pipeline: split files, transforms, batching, the synthetic set and the verify tool."""
from .collate import Batch, Collate
from .refer import DATASETS, GroundingDataset, add_data_args, build_dataset
from .transforms import Record, build_transforms, make_transforms

__all__ = ["Batch", "Collate", "DATASETS", "GroundingDataset", "add_data_args", "build_dataset",
           "Record", "build_transforms", "make_transforms"]
