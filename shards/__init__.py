"""The on-disk contract of a medswav dataset (see FORMAT.md): writing, reading and verifying shards."""
from .dataset import CODEC, FORMAT_VERSION, Dataset, ShardFiles, summarize, write_dataset_json, write_errors
from .keys import salted_hash, sample_key
from .sample import KIND_SLICES, KIND_VOLUMES, KINDS, MODALITIES, SPLITS, UNITS, UNITS_HU, UNITS_RAW, SampleMeta
from .writer import ShardWriter
from . import reader

__all__ = [
    "CODEC", "FORMAT_VERSION", "KIND_SLICES", "KIND_VOLUMES", "KINDS", "MODALITIES", "SPLITS", "UNITS", "UNITS_HU", "UNITS_RAW", "Dataset", "SampleMeta", "ShardFiles", "ShardWriter",
    "salted_hash", "sample_key", "summarize", "write_dataset_json", "write_errors",
]
