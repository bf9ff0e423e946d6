"""`pecm train --data DIR --out CKPT [flags]`: train a PECM model (paper defaults; see pecm.train)."""

from __future__ import annotations

import json
import logging
import os

from ._common import add_progress_flags, show_progress


def _config(a):
    from ..model import PECMConfig

    if a.config:
        with open(a.config) as f:
            cfg = PECMConfig.from_dict(json.load(f))
    elif a.preset == "paper":
        cfg = PECMConfig()
    elif a.preset == "tiny":
        cfg = PECMConfig.tiny()
    else:
        cfg = PECMConfig.demo_cpu()
    over = {}
    if a.backbone:
        over["image_backbone"] = a.backbone
    if a.image_weights:
        over["image_weights"] = None if a.image_weights == "none" else a.image_weights
    if a.text_encoder:
        over["text_encoder"] = a.text_encoder
    if a.temperature is not None:
        over["temperature"] = a.temperature
    if a.image_slots:
        over["image_slots"] = a.image_slots
    if a.text_units:
        over["text_units"] = a.text_units
    if a.unfreeze:
        over["freeze_image"] = over["freeze_text"] = False
    return PECMConfig.from_dict({**cfg.to_dict(), **over})


def _check_flags(a) -> None:
    """Reject bad flag values before any data or model is loaded (one-line errors, exit 2)."""
    if a.epochs < 1:
        raise ValueError(f"--epochs: expected an int >= 1, got {a.epochs}")
    if a.batch_size < 2:
        raise ValueError(f"--batch-size: expected an int >= 2 (in-batch negatives), got {a.batch_size}")
    if not a.lr > 0:
        raise ValueError(f"--lr: expected a float > 0, got {a.lr}")
    for flag in ("weight_decay", "lam", "mu", "nu", "kappa", "rho"):
        if not getattr(a, flag) >= 0:
            raise ValueError(f"--{flag.replace('_', '-')}: expected a value >= 0, got {getattr(a, flag)}")
    for flag in ("theta_lr", "backbone_lr"):
        if not getattr(a, flag) > 0:
            raise ValueError(f"--{flag.replace('_', '-')}: expected a float > 0, got {getattr(a, flag)}")
    if not 0.0 <= a.feature_dropout < 1.0:
        raise ValueError(f"--feature-dropout: expected a rate in [0, 1), got {a.feature_dropout}")
    if not 0.0 <= a.val_fraction < 1.0:
        raise ValueError(f"--val-fraction: expected a float in [0, 1), got {a.val_fraction}")
    if a.select_best and not a.val_fraction > 0:
        raise ValueError("--select-best: needs --val-fraction > 0 (a validation split to select on)")
    if a.limit is not None and a.limit < 2:
        raise ValueError(f"--limit: expected an int >= 2, got {a.limit}")
    if a.temperature is not None and not a.temperature > 0:
        raise ValueError(f"--temperature: expected a float > 0, got {a.temperature}")
    if not os.path.isdir(a.data):
        raise FileNotFoundError(f"--data: {a.data} is not a folder")
    if a.config and not os.path.isfile(a.config):
        raise FileNotFoundError(f"--config: {a.config} not found")


def _run(a) -> int:
    _check_flags(a)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("gensim").setLevel(logging.WARNING)
    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
    if distributed:
        from ..distributed import init_from_env, shutdown

        init_from_env()
        try:
            return _train(a, distributed)
        finally:
            shutdown()
    return _train(a, distributed)


def _train(a, distributed: bool) -> int:
    import torch

    from ..data import load_dataset, split_pairs
    from ..model import PECM
    from ..train import TrainConfig, train

    dev = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and distributed:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    pairs = load_dataset(a.data, layout=a.layout, limit=a.limit)
    val = None
    if a.val_fraction > 0:
        pairs, val = split_pairs(pairs, a.val_fraction, a.seed)
    model = PECM(_config(a)).to(dev)
    tc = TrainConfig(
        epochs=a.epochs,
        batch_size=a.batch_size,
        lr=a.lr,
        weight_decay=a.weight_decay,
        lam=a.lam,
        mu=a.mu,
        nu=a.nu,
        kappa=a.kappa,
        rho=a.rho,
        feature_dropout=a.feature_dropout,
        theta_lr=a.theta_lr,
        backbone_lr=a.backbone_lr,
        div=a.div,
        seed=a.seed,
        amp=not a.no_amp,
        progress=show_progress(a),
        resume=a.resume,
        select_best=a.select_best,
        gather=not a.local_negatives,
    )
    if a.resume and os.path.isfile(os.path.join(a.out, "model.safetensors")):
        model = PECM.load(a.out, map_location=dev)
    hist = train(model, pairs, a.out, tc, val_pairs=val)
    if not distributed or int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps({"checkpoint": a.out, "epochs": len(hist), "last": hist[-1] if hist else None}, default=float))
    return 0


def register(sub) -> None:
    p = sub.add_parser("train", help="train a PECM model on image-report pairs")
    p.add_argument("--data", required=True, help="folder with pairs.jsonl (ROCO layout) or the MIMIC-CXR layout")
    p.add_argument("--out", required=True, help="checkpoint directory")
    p.add_argument("--layout", default="auto", choices=("auto", "pairs", "roco", "mimic"))
    p.add_argument(
        "--preset",
        default="demo",
        choices=("demo", "paper", "tiny"),
        help="demo: efficientnet_lite0 + MiniLM (packaged weights); paper: vit_base_patch16_224 + tiny BERT",
    )
    p.add_argument("--config", help="PECMConfig JSON file (overrides --preset)")
    p.add_argument("--backbone", help="timm image backbone name")
    p.add_argument("--image-weights", help="local weights file, 'package' or 'none'")
    p.add_argument("--text-encoder", help="'tiny', 'package:minilm' or a local HF model folder")
    p.add_argument("--temperature", type=float, help="fixed InfoNCE temperature (paper: 1.0); default learnable")
    p.add_argument("--unfreeze", action="store_true", help="train the backbones end to end (no feature cache)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--lam", type=float, default=1.0, help="weight of L_conf")
    p.add_argument("--mu", type=float, default=1.0, help="weight of L_div")
    p.add_argument(
        "--nu", type=float, default=0.0, help="weight of L_rank, InfoNCE over R = sim*C (extension; 0 = paper loss)"
    )
    p.add_argument(
        "--kappa", type=float, default=0.0, help="weight of L_cnce, InfoNCE over C (extension; 0 = paper loss)"
    )
    p.add_argument(
        "--rho",
        type=float,
        default=0.0,
        help="weight of L_img, SupCon over image-image R with images sharing a CUI as positives (extension; 0 = paper)",
    )
    p.add_argument(
        "--feature-dropout", type=float, default=0.0, help="dropout on the raw features of each batch (augmentation)"
    )
    p.add_argument("--theta-lr", type=float, default=1.0, help="learning-rate multiplier of the weight logits theta")
    p.add_argument(
        "--backbone-lr", type=float, default=1.0, help="learning-rate multiplier of the backbones (with --unfreeze)"
    )
    p.add_argument(
        "--image-slots",
        choices=("regions", "attend"),
        help="image slots 1..K-1: grid regions (paper; presets' default) or learned attention pools over the regions",
    )
    p.add_argument(
        "--text-units",
        choices=("sentences", "clauses"),
        help="report pieces grouped into slots: sentences (paper; presets' default) or clauses",
    )
    p.add_argument("--div", default="decorrelate", choices=("decorrelate", "paper", "none"))
    p.add_argument("--val-fraction", type=float, default=0.0, help="hold out this fraction for per-epoch validation")
    p.add_argument("--limit", type=int, help="use at most this many pairs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--no-amp", action="store_true")
    add_progress_flags(p)
    p.add_argument(
        "--select-best",
        action="store_true",
        help="keep the epoch with the best validation RSUM (needs --val-fraction > 0)",
    )
    p.add_argument("--resume", action="store_true", help="continue from OUT/train_state.pt")
    p.add_argument(
        "--local-negatives",
        action="store_true",
        help="torchrun/DDP: InfoNCE over each rank's local batch (default: the global batch, gathered across ranks)",
    )
    p.set_defaults(func=_run)
