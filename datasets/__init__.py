"""Data pipeline: the dataset table, split files and their formats, transforms, batching, the synthetic set and
the verify tool."""
from .collate import Batch, Collate
from .refer import GroundingDataset, add_data_args, build_dataset
from .registry import DATASETS, DatasetSpec
from .transforms import Record, build_transforms, make_transforms

__all__ = ["Batch", "Collate", "DATASETS", "DatasetSpec", "GroundingDataset", "add_data_args", "build_dataset",
           "Record", "build_transforms", "make_transforms"]
