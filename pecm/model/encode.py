"""Inference encoder used by the CLI (`pecm index add --checkpoint`, `pecm search --checkpoint`).

Interface (fixed; other modules call exactly this)::

    enc = load_encoder(ckpt_path)
    protos, masks = enc.encode_images(list_of_paths)   # float32 [B, K, D], bool [B, K]
    protos, masks = enc.encode_texts(list_of_str)      # float32 [B, K, D], bool [B, K]
    enc.weights                                        # float32 [K]
"""

from __future__ import annotations

import os
from typing import Sequence, Tuple, Union

import numpy as np
import torch

from .pecm import PECM


class Encoder:
    def __init__(self, model: PECM, batch_size: int = 32) -> None:
        self.model = model.eval()
        self.batch_size = batch_size
        with torch.no_grad():
            self.weights = model.weights().float().cpu().numpy().astype(np.float32)
        self.K, self.D = model.config.K, model.config.D

    def _empty(self) -> Tuple[np.ndarray, np.ndarray]:
        return np.zeros((0, self.K, self.D), np.float32), np.zeros((0, self.K), bool)

    @torch.no_grad()
    def encode_images(self, paths: Sequence[str]) -> Tuple[np.ndarray, np.ndarray]:
        if isinstance(paths, str):
            raise TypeError("paths: expected a list of image paths, got one str")
        if len(paths) == 0:
            return self._empty()
        ps, ms = [], []
        for s in range(0, len(paths), self.batch_size):
            x = self.model.load_image_paths(paths[s : s + self.batch_size])
            p, m = self.model.encode_images(x)
            ps.append(p.float().cpu().numpy())
            ms.append(m.cpu().numpy())
        return np.concatenate(ps).astype(np.float32), np.concatenate(ms).astype(bool)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> Tuple[np.ndarray, np.ndarray]:
        if isinstance(texts, str):
            raise TypeError("texts: expected a list of strings, got one str")
        if len(texts) == 0:
            return self._empty()
        ps, ms = [], []
        for s in range(0, len(texts), self.batch_size):
            p, m = self.model.encode_texts(list(texts[s : s + self.batch_size]))
            ps.append(p.float().cpu().numpy())
            ms.append(m.cpu().numpy())
        return np.concatenate(ps).astype(np.float32), np.concatenate(ms).astype(bool)


def load_encoder(ckpt_path: Union[str, "os.PathLike[str]"]) -> Encoder:
    return Encoder(PECM.load(ckpt_path))
