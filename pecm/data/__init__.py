"""`pecm.data`: image–report pair datasets (pairs.jsonl folders, ROCO and MIMIC-CXR layouts)."""

from .layouts import default_data_dir, load_dataset, load_mimic, load_roco
from .pairs import Pair, PairSet, load_pairs, split_pairs

__all__ = [
    "Pair",
    "PairSet",
    "load_pairs",
    "split_pairs",
    "load_roco",
    "load_mimic",
    "load_dataset",
    "default_data_dir",
]
