"""`PECM`: image and report encoders producing K prototypes of dimension D, plus the learned weights.

Architecture (DESIGN §1): raw per-slot features (`ImageFeatures`: global + grid² regions; `TextFeatures`:
global + ≤ K−1 sentence groups, masked when missing) → a per-modality projection head (shared 2-layer MLP +
a learned per-slot embedding) → prototypes [B, K, D]. Weight logits θ give ``w = K · softmax(θ)``, shared by
both modalities. The loss lives in `pecm.losses`; scoring in `pecm.ops`.

``encode_*_features`` take *raw* features, so training with frozen backbones can cache them once
(`extract_image_features` / `extract_text_features`) and train only the heads, θ and the logit scale.

Checkpoint (a directory): ``config.json``, ``model.safetensors`` (full state dict), ``doc2vec.model``,
``tokenizer/``; `PECM.load` restores it without touching the network.
"""

from __future__ import annotations

import json
import math
import os
from typing import Sequence, Tuple

import torch
import torch.nn as nn

from .config import PECMConfig
from .image import ImageFeatures, load_images
from .text import TextFeatures


class Head(nn.Module):
    def __init__(self, cin: int, hidden: int, d: int, k: int):
        super().__init__()
        self.norm = nn.LayerNorm(cin)
        self.mlp = nn.Sequential(nn.Linear(cin, hidden), nn.GELU(), nn.Linear(hidden, d))
        self.slot = nn.Parameter(torch.zeros(k, d))
        nn.init.normal_(self.slot, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.norm(x)) + self.slot


class PECM(nn.Module):
    def __init__(self, config: PECMConfig, load_pretrained: bool = True, _from_checkpoint: bool = False):
        super().__init__()
        if not isinstance(config, PECMConfig):
            raise TypeError(f"config: expected PECMConfig, got {type(config).__name__}")
        self.config = config
        torch.manual_seed(config.seed)
        self.image = ImageFeatures(
            config.image_backbone,
            config.grid,
            config.image_size,
            config.image_weights if load_pretrained else None,
            warn=not _from_checkpoint,  # the checkpoint supplies the weights: no "random init" warning
        )
        self.text = TextFeatures(config, warn=not _from_checkpoint)
        torch.manual_seed(config.seed + 1)
        self.image_head = Head(self.image.dim, config.head_hidden, config.D, config.K)
        self.text_head = Head(self.text.dim, config.head_hidden, config.D, config.K)
        self.theta = nn.Parameter(torch.zeros(config.K))
        if config.temperature is None:
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        else:
            self.register_buffer("logit_scale", torch.tensor(math.log(1.0 / float(config.temperature))))
        self.set_frozen(config.freeze_image, config.freeze_text)
        self.train()

    def set_frozen(self, image: bool, text: bool) -> None:
        for p in self.image.parameters():
            p.requires_grad_(not image)
        for p in self.text.parameters():
            p.requires_grad_(not text)

    def train(self, mode: bool = True):
        """Frozen backbones stay in eval mode (BatchNorm statistics and dropout fixed)."""
        super().train(mode)
        if self.config.freeze_image:
            self.image.eval()
        if self.config.freeze_text:
            self.text.eval()
        return self

    @property
    def device(self) -> torch.device:
        return self.theta.device

    def weights(self) -> torch.Tensor:
        """w = K · softmax(θ) (mean 1)."""
        return self.config.K * torch.softmax(self.theta, 0)

    # ------------------------------------------------------------------ raw features
    def extract_image_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.image(images.to(self.device))

    def extract_text_features(self, reports: Sequence[str]) -> Tuple[torch.Tensor, torch.Tensor]:
        if isinstance(reports, str):
            raise TypeError("reports: expected a list of strings, got one str")
        return self.text(list(reports))

    # ------------------------------------------------------------------ prototypes
    def encode_image_features(self, feats: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        protos = self.image_head(feats.to(self.device).float())
        return protos, torch.ones(protos.shape[:2], dtype=torch.bool, device=protos.device)

    def encode_text_features(self, feats: torch.Tensor, mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Only the present slots go through the head; missing groups stay exactly zero and masked."""
        mask = mask.to(self.device).bool()
        feats = feats.to(self.device).float()
        idx = mask.nonzero(as_tuple=True)
        h = self.text_head
        rows = h.mlp(h.norm(feats[idx])) + h.slot[idx[1]]
        protos = feats.new_zeros(feats.shape[0], feats.shape[1], self.config.D).index_put(idx, rows)
        return protos, mask

    def encode_images(self, images: torch.Tensor):
        return self.encode_image_features(self.extract_image_features(images))

    def encode_texts(self, reports: Sequence[str]):
        return self.encode_text_features(*self.extract_text_features(reports))

    def forward(self, images: torch.Tensor, reports: Sequence[str]):
        """(img_protos, img_mask, txt_protos, txt_mask, w)."""
        iq, im = self.encode_images(images)
        tq, tm = self.encode_texts(reports)
        return iq, im, tq, tm, self.weights()

    def load_image_paths(self, paths: Sequence[str]) -> torch.Tensor:
        return load_images(paths, self.config.image_size)

    # ------------------------------------------------------------------ checkpoints
    def save(self, directory: str) -> None:
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "config.json"), "w") as f:
            f.write(self.config.to_json())
        sd = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        tmp = os.path.join(directory, "model.safetensors.tmp")
        save_file(sd, tmp)
        os.replace(tmp, os.path.join(directory, "model.safetensors"))
        self.text.save_aux(directory)

    @classmethod
    def load(cls, directory: str, map_location="cpu") -> "PECM":
        from safetensors.torch import load_file

        cfg_path = os.path.join(os.fspath(directory), "config.json")
        if not os.path.isfile(cfg_path):
            raise FileNotFoundError(f"checkpoint: {cfg_path} not found (expected a PECM checkpoint directory)")
        with open(cfg_path) as f:
            config = PECMConfig.from_dict(json.load(f))
        model = cls(config, load_pretrained=False, _from_checkpoint=True)
        sd = load_file(os.path.join(directory, "model.safetensors"), device=str(map_location))
        model.load_state_dict(sd)
        model.text.load_aux(directory)
        return model.to(map_location)
