"""`pecm.model`: the PECM model (config, image/report encoders, checkpoints, inference encoder)."""

from .config import PECMConfig
from .legacy import convert_legacy_checkpoint
from .pecm import PECM
from .text import group_sentences, split_sentences

__all__ = ["PECMConfig", "PECM", "split_sentences", "group_sentences", "convert_legacy_checkpoint"]
