"""`PECM`: image and report encoders producing K prototypes of dimension D, plus the learned weights.

Architecture (DESIGN §1): raw per-slot features (`ImageFeatures`: global + grid² regions; `TextFeatures`:
global + ≤ K−1 sentence groups, masked when missing) → a per-modality projection head (shared 2-layer MLP +
a learned per-slot embedding) → prototypes [B, K, D]. Weight logits θ give ``w = K · softmax(θ)``, shared by
both modalities. The loss lives in `pecm.losses`; scoring in `pecm.ops`.

``encode_*_features`` take *raw* features, so training with frozen backbones can cache them once
(`extract_image_features` / `extract_text_features`) and train only the heads, θ and the logit scale.

Checkpoint (a directory, self-contained, format 3): ``config.json`` (`PECMConfig`), ``model.safetensors`` (the full
state dict, backbone and text encoder weights included), ``doc2vec.json`` + ``doc2vec.safetensors`` (the fitted
Doc2Vec as JSON + plain arrays, `pecm.model.doc2vec_io`), ``tokenizer/``, ``text_encoder/config.json`` (the
transformers config of a non-tiny text encoder) and ``checkpoint.json`` (format version, pecm/timm/transformers
versions at save time). Nothing is a pickle and loading validates every file; an older checkpoint with a pickled
``doc2vec.model`` is refused (`pecm.model.legacy`). `PECM.load` rebuilds the architectures from these files (the
image backbone from its timm name, the text encoder from its saved config) and loads the weights from
``model.safetensors``: it needs neither the network nor the packages or folders the pretrained weights first came
from. See docs/model.md, "Checkpoints".
"""

from __future__ import annotations

import json
import math
import os
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .config import PECMConfig
from .image import ImageFeatures, load_images
from .safety import check_state_dict, one_line, read_json_object, read_safetensors
from .text import ENCODER_CONFIG_DIR, TextFeatures

# 1: no checkpoint.json / text_encoder/ (loading needed the text encoder's source); 2: doc2vec.model (a pickle)
# 3: doc2vec.json + doc2vec.safetensors (nothing in a checkpoint is a pickle)
CHECKPOINT_FORMAT = 3
MANIFEST = "checkpoint.json"


class Head(nn.Module):
    def __init__(self, cin: int, hidden: int, d: int, k: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(cin)
        self.mlp = nn.Sequential(nn.Linear(cin, hidden), nn.GELU(), nn.Linear(hidden, d))
        self.slot = nn.Parameter(torch.zeros(k, d))
        nn.init.normal_(self.slot, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.norm(x)) + self.slot


class SlotAttention(nn.Module):
    """``image_slots="attend"``: slot k >= 1 = a softmax-weighted mean of the grid-region features, with one
    learned query per slot (logits = LayerNorm(region) · q_k / sqrt(C)); slot 0 (global) passes through."""

    def __init__(self, cin: int, k: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(cin)
        self.query = nn.Parameter(torch.randn(cin, k - 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        regions = x[:, 1:]  # [B, R, C]
        logits = self.norm(regions) @ self.query / math.sqrt(regions.shape[-1])  # [B, R, K-1]
        att = torch.softmax(logits, dim=1)
        return torch.cat([x[:, :1], att.transpose(1, 2) @ regions], dim=1)


class PECM(nn.Module):
    def __init__(
        self,
        config: PECMConfig,
        load_pretrained: bool = True,
        _from_checkpoint: bool = False,
        _text_encoder_config: Optional[str] = None,
    ) -> None:
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
        self.text = TextFeatures(config, warn=not _from_checkpoint, encoder_config=_text_encoder_config)
        torch.manual_seed(config.seed + 1)
        self.image_head = Head(self.image.dim, config.head_hidden, config.D, config.K)
        if config.image_slots == "attend":
            self.image_attend = SlotAttention(self.image.dim, config.K)
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

    def train(self, mode: bool = True) -> "PECM":
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
        feats = feats.to(self.device).float()
        if self.config.image_slots == "attend":
            feats = self.image_attend(feats)
        protos = self.image_head(feats)
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

    def encode_images(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.encode_image_features(self.extract_image_features(images))

    def encode_texts(self, reports: Sequence[str]) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.encode_text_features(*self.extract_text_features(reports))

    def forward(
        self, images: torch.Tensor, reports: Sequence[str]
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(img_protos, img_mask, txt_protos, txt_mask, w)."""
        iq, im = self.encode_images(images)
        tq, tm = self.encode_texts(reports)
        return iq, im, tq, tm, self.weights()

    def load_image_paths(self, paths: Sequence[str]) -> torch.Tensor:
        return load_images(paths, self.config.image_size)

    # ------------------------------------------------------------------ checkpoints
    def save(self, directory: Union[str, "os.PathLike[str]"]) -> None:
        """Write a self-contained checkpoint directory (module docstring; docs/model.md, "Checkpoints")."""
        import timm
        import transformers
        from safetensors.torch import save_file

        from .._version import __version__

        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "config.json"), "w") as f:
            f.write(self.config.to_json())
        sd = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        tmp = os.path.join(directory, "model.safetensors.tmp")
        save_file(sd, tmp, metadata={"format": "pt"})
        os.replace(tmp, os.path.join(directory, "model.safetensors"))
        self.text.save_aux(directory)
        manifest = {
            "format_version": CHECKPOINT_FORMAT,
            "pecm_version": __version__,
            "image_backbone": {"timm_name": self.config.image_backbone, "timm_version": timm.__version__},
            "text_encoder": {
                "kind": "tiny" if self.config.text_encoder == "tiny" else "transformers",
                "config": None if self.config.text_encoder == "tiny" else f"{ENCODER_CONFIG_DIR}/config.json",
                "class": type(self.text.encoder).__name__,
                "transformers_version": transformers.__version__,
            },
        }
        with open(os.path.join(directory, MANIFEST + ".tmp"), "w") as f:
            json.dump(manifest, f, indent=2)
        os.replace(os.path.join(directory, MANIFEST + ".tmp"), os.path.join(directory, MANIFEST))

    @classmethod
    def load(cls, directory: Union[str, "os.PathLike[str]"], map_location: Union[str, torch.device] = "cpu") -> "PECM":
        """Load a checkpoint directory offline; the weights come only from its ``model.safetensors``.

        Nothing is unpickled and no remote code runs: every file is JSON or safetensors and is validated against
        the config (fields, types, shapes, dtypes, finite values); a damaged or hostile file is a one-line
        ValueError / TypeError / FileNotFoundError naming it. An old checkpoint with a pickled ``doc2vec.model``
        is refused (`pecm.model.legacy.convert_legacy_checkpoint` converts it, explicitly)."""
        from .doc2vec_io import load_doc2vec

        directory = os.fspath(directory)
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"checkpoint: {directory} is not a directory (expected a PECM checkpoint)")
        cfg_path = os.path.join(directory, "config.json")
        if not os.path.isfile(cfg_path):
            raise FileNotFoundError(f"checkpoint: {cfg_path} not found (expected a PECM checkpoint directory)")
        try:
            config = PECMConfig.from_dict(read_json_object(cfg_path, "the model config"))
        except (TypeError, ValueError) as e:
            raise type(e)(f"checkpoint: {cfg_path}: {e}" if not str(e).startswith("checkpoint:") else str(e)) from e
        manifest = _read_manifest(directory)
        doc2vec = load_doc2vec(directory, config)  # before anything heavy: refuses a pickled doc2vec.model
        enc_dir = os.path.join(directory, ENCODER_CONFIG_DIR)
        enc_cfg = enc_dir if os.path.isfile(os.path.join(enc_dir, "config.json")) else None
        if enc_cfg is None and config.text_encoder != "tiny" and manifest:
            raise FileNotFoundError(f"checkpoint: {enc_dir}/config.json not found (the text encoder's architecture)")
        try:
            model = cls(config, load_pretrained=False, _from_checkpoint=True, _text_encoder_config=enc_cfg)
        except Exception as e:  # e.g. transformers' OSError for a damaged text_encoder/config.json
            legacy = enc_cfg is None and config.text_encoder != "tiny"
            if not (legacy and isinstance(e, (ImportError, ValueError, FileNotFoundError))):
                msg = f"checkpoint: {directory}: cannot build the model from its config ({one_line(e)})"
                raise ValueError(msg) from e
            # format 1 (older pecm): the encoder architecture was only available from its source
            raise ValueError(
                f"checkpoint: {directory} predates self-contained checkpoints (no {ENCODER_CONFIG_DIR}/config.json), so"
                f" its text encoder is rebuilt from text_encoder={config.text_encoder!r}, which failed: {e}. Load it"
                " once where that source is available and save it again (PECM.load(d).save(d)) to make it"
                " self-contained."
            ) from e
        path = os.path.join(directory, "model.safetensors")
        sd = read_safetensors(path, "the model weights")
        check_state_dict(path, sd, model.state_dict(), hint=_saved_with(manifest))
        model.load_state_dict(sd)
        model.text.load_aux(directory, doc2vec=doc2vec)
        return model.to(map_location)


def _read_manifest(directory: str) -> dict:
    """``checkpoint.json`` (validated), or {} for a format-1 checkpoint that has none."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.exists(path):
        return {}
    manifest = read_json_object(path, "the checkpoint manifest")
    fmt = manifest.get("format_version")
    if not isinstance(fmt, int) or isinstance(fmt, bool) or fmt < 1:
        raise ValueError(f"checkpoint: {path}: format_version: expected an int >= 1, got {fmt!r}")
    if fmt > CHECKPOINT_FORMAT:
        raise ValueError(
            f"checkpoint: {directory} has format_version {fmt!r}; this pecm reads up to {CHECKPOINT_FORMAT}"
            f" (written by pecm {manifest.get('pecm_version', '?')!s:.40}: upgrade pecm)"
        )
    return manifest


def _saved_with(manifest: dict) -> str:
    """`` (saved with timm X, transformers Y)`` for error messages; robust to a manifest of any shape."""

    def version(section: str, key: str) -> str:
        part = manifest.get(section)
        v = part.get(key, "?") if isinstance(part, dict) else "?"
        return str(v)[:40]

    if not manifest:
        return ""
    return (
        f" (saved with timm {version('image_backbone', 'timm_version')},"
        f" transformers {version('text_encoder', 'transformers_version')})"
    )
