"""Training and evaluation of `pecm.model.PECM` (DESIGN §5).

Paper defaults: Adam, cosine schedule from lr 1e-4, batch 32, 30 epochs. Two modes:

- **cached** (default when both backbones are frozen): raw backbone features of every pair are extracted
  once (`extract_features`) and only the projection heads, θ and the logit scale train — fast on a CPU.
- **end-to-end** (a backbone unfrozen): images are decoded and both encoders run in every step.

AMP (bfloat16 autocast) on CUDA; DDP when `torch.distributed` is initialised (``torchrun``; a
`DistributedSampler` shards the pairs, rank 0 writes). Under DDP the InfoNCE runs over the global batch
(``TrainConfig.gather``, default on: `PECMLoss` all-gathers the prototypes of every rank; W ranks with batch
size B each see W·B − 1 negatives per item, as one process with batch W·B would); the losses in the history
and ``metrics.json`` are rank 0's own terms (its rows of the global InfoNCE, its local L_conf / L_div).
Each epoch rank 0 writes the checkpoint
(`PECM.save`: safetensors + config.json + Doc2Vec as JSON/arrays + tokenizer) plus ``train_state.pt`` (optimizer,
scheduler, epoch, history; torch.save, read back only with ``weights_only=True`` and validated:
`pecm.train_state`) so ``resume=True`` continues, ``metrics.json`` (one entry per epoch)
and ``loss_curve.png`` (when matplotlib is installed: the ``[plot]`` extra; training does not need it).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Dict, List

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import metrics as M
from . import ops
from .losses import DIV_CHOICES, PECMLoss
from .model import PECM
from .model.safety import check_state_dict, read_safetensors
from .train_state import load_train_state

log = logging.getLogger("pecm.train")
_PLOT_WARNED = False


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lam: float = 1.0
    mu: float = 1.0
    nu: float = 0.0  # weight of L_rank (InfoNCE over R = sim * C; an extension, 0 = the paper's loss)
    kappa: float = 0.0  # weight of L_cnce (InfoNCE over C: a confidence loss with negatives; extension, 0 = paper)
    rho: float = 0.0  # weight of L_img (SupCon over image-image R, positives share a CUI; extension, 0 = paper)
    # dropout rate on the raw backbone features of each training batch (feature-level augmentation; 0 = off)
    feature_dropout: float = 0.0
    theta_lr: float = 1.0  # learning-rate multiplier of the weight logits theta (1 = the same lr as the heads)
    # learning-rate multiplier of the unfrozen backbones (end-to-end mode; 1 = the heads' lr, no effect when frozen)
    backbone_lr: float = 1.0
    div: str = "decorrelate"
    seed: int = 0
    amp: bool = True  # on CUDA only
    num_workers: int = 0
    progress: bool = True
    save_every: int = 1
    resume: bool = False
    select_best: bool = False  # keep the weights of the epoch with the best validation RSUM (needs val pairs)
    feature_batch: int = 32
    # DDP: InfoNCE over the global batch (prototypes all-gathered across ranks, `PECMLoss(gather=True)`); False:
    # each rank's local batch only. No effect in one process.
    gather: bool = True

    def __post_init__(self):
        for n in ("epochs", "batch_size", "save_every", "feature_batch"):
            if int(getattr(self, n)) < 1:
                raise ValueError(f"{n}: expected an int >= 1, got {getattr(self, n)}")
        for n in ("theta_lr", "backbone_lr"):
            if not getattr(self, n) > 0:
                raise ValueError(f"{n}: expected a positive float, got {getattr(self, n)}")
        if not 0.0 <= self.feature_dropout < 1.0:
            raise ValueError(f"feature_dropout: expected a rate in [0, 1), got {self.feature_dropout}")
        if not self.lr > 0:
            raise ValueError(f"lr: expected a positive float, got {self.lr}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size: expected >= 2 (in-batch InfoNCE needs negatives), got {self.batch_size}")
        for n in ("weight_decay", "warmup_steps", "lam", "mu", "nu", "kappa", "rho", "num_workers"):
            if not getattr(self, n) >= 0:
                raise ValueError(f"{n}: expected a value >= 0, got {getattr(self, n)}")
        if self.div not in DIV_CHOICES:
            raise ValueError(f"div: expected one of {DIV_CHOICES}, got {self.div!r}")
        if not isinstance(self.gather, bool):
            raise ValueError(f"gather: expected a bool, got {self.gather!r}")


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


# ---------------------------------------------------------------------------------------------- features
def extract_features(
    model: PECM, pairs, batch: int = 32, progress: bool = True, parts=("image", "text")
) -> Dict[str, torch.Tensor]:
    """Raw features of every pair: ``img`` [N, K, C], ``txt`` [N, K, H], ``txt_mask`` [N, K] (CPU float32);
    ``parts`` selects the image side, the report side or both.

    On a CPU with >= 2 threads the image side and the report side run concurrently in two threads with half
    the intra-op threads each (the encoders are independent modules; about 1.3-1.8x less CPU time than two
    sequential multi-threaded passes on the shared 2-core machine, measured on 128 ROCO pairs)."""
    was = model.training
    model.eval()
    n = len(pairs)
    starts = list(range(0, n, batch))

    def images(pos: int) -> torch.Tensor:
        out = []
        with torch.no_grad():  # grad mode is thread-local
            for s in tqdm(starts, desc="image features", disable=not progress, leave=False, position=pos):
                x = model.load_image_paths([p.image for p in pairs.pairs[s : s + batch]])
                out.append(model.extract_image_features(x).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, model.config.K, model.image.dim)

    def texts(pos: int):
        fs, ms = [], []
        with torch.no_grad():
            for s in tqdm(starts, desc="report features", disable=not progress, leave=False, position=pos):
                f, m = model.extract_text_features([p.text for p in pairs.pairs[s : s + batch]])
                fs.append(f.float().cpu())
                ms.append(m.cpu())
        return torch.cat(fs), torch.cat(ms)

    bad = set(parts) - {"image", "text"}
    if bad or not parts:
        raise ValueError(f"parts: expected a non-empty subset of ('image', 'text'), got {parts!r}")
    threads = torch.get_num_threads()
    out: Dict[str, torch.Tensor] = {}
    try:
        if len(set(parts)) == 2 and model.device.type == "cpu" and threads >= 2 and n > batch:
            from concurrent.futures import ThreadPoolExecutor

            torch.set_num_threads(max(1, threads // 2))
            with ThreadPoolExecutor(2) as ex:
                fi, ft = ex.submit(images, 0), ex.submit(texts, 1)
                out["img"], (out["txt"], out["txt_mask"]) = fi.result(), ft.result()
        else:
            if "image" in parts:
                out["img"] = images(0)
            if "text" in parts:
                out["txt"], out["txt_mask"] = texts(0)
    finally:
        torch.set_num_threads(threads)
        model.train(was)
    return out


@torch.no_grad()
def prototypes_from_features(model: PECM, feats: Dict[str, torch.Tensor], batch: int = 1024):
    was = model.training
    model.eval()
    ip, im, tp, tm = [], [], [], []
    for s in range(0, feats["img"].shape[0], batch):
        a, b = model.encode_image_features(feats["img"][s : s + batch])
        c, d = model.encode_text_features(feats["txt"][s : s + batch], feats["txt_mask"][s : s + batch])
        ip.append(a.float().cpu())
        im.append(b.cpu())
        tp.append(c.float().cpu())
        tm.append(d.cpu())
    model.train(was)
    return torch.cat(ip), torch.cat(im), torch.cat(tp), torch.cat(tm), model.weights().detach().float().cpu()


# ---------------------------------------------------------------------------------------------- evaluation
def evaluate_prototypes(img, img_mask, txt, txt_mask, w, cuis=None, raw_global=None, by_list=("sim", "score", "conf")):
    """Metrics for every ranking key in ``by_list`` (`pecm.metrics.RANKING_KEYS`; ``"score_pos"`` is the
    evaluation-only R⁺ = sim · max(C, 0)): {by: {"image_to_report", "report_to_image", "mAP", "cui",
    "cbir_cui"}} (percent), plus "baseline" CBIR from the raw backbone global features when given and, with
    CUIs, "chance": the CUI precision of a random ranking (cross-modal and CBIR)."""
    out = {}
    with torch.no_grad():
        sim, conf, score = ops.pecm_scores(img, txt, w, q_mask=img_mask, c_mask=txt_mask, backend="auto")
        ii = ops.pecm_scores(img, img, w, q_mask=img_mask, c_mask=img_mask, backend="auto") if cuis else None
    bad = [by for by in by_list if by not in M.RANKING_KEYS]
    if bad:
        raise ValueError(f"by_list: expected keys from {M.RANKING_KEYS}, got {bad}")
    mats = {"sim": sim, "conf": conf, "score": score, "score_pos": M.score_pos(sim, conf)}
    for by in by_list:
        r = M.retrieval_metrics(mats[by], cuis)
        if cuis is not None:
            iim = {"sim": ii[0], "conf": ii[1], "score": ii[2], "score_pos": M.score_pos(ii[0], ii[1])}[by]
            r["cbir_cui"] = {f"@{k}": v for k, v in M.cbir_precision_at_k(iim, cuis, (5, 10, 50))["micro"].items()}
        out[by] = r
    if cuis is not None:
        out["chance"] = {"cui": M.cui_chance(cuis, cuis), "cbir_cui": M.cui_chance(cuis)}
    if cuis is not None and raw_global is not None:
        g = torch.nn.functional.normalize(raw_global.float(), dim=-1)
        out["baseline"] = {
            "cbir_cui": {f"@{k}": v for k, v in M.cbir_precision_at_k(g @ g.T, cuis, (5, 10, 50))["micro"].items()}
        }
    return out


def evaluate_features(model: PECM, feats, cuis=None, by_list=("sim", "score", "conf")):
    img, im, txt, tm, w = prototypes_from_features(model, feats)
    return evaluate_prototypes(img, im, txt, tm, w, cuis, raw_global=feats["img"][:, 0], by_list=by_list)


# ---------------------------------------------------------------------------------------------- training
class _Step(nn.Module):
    """One forward for DDP: features (cached) or images + reports (end-to-end) → loss dict."""

    def __init__(self, model: PECM, loss: PECMLoss, feature_dropout: float = 0.0):
        super().__init__()
        self.model, self.loss, self.feature_dropout = model, loss, float(feature_dropout)

    def forward(self, batch):
        m = self.model
        if "img" in batch:
            fi, ft, fm = batch["img"], batch["txt"], batch["txt_mask"]
        else:
            fi = m.extract_image_features(batch["images"])
            ft, fm = m.extract_text_features(batch["texts"])
        if self.feature_dropout > 0 and self.training:  # augmentation of the raw features (TrainConfig)
            fi, ft = F.dropout(fi, self.feature_dropout), F.dropout(ft, self.feature_dropout)
        iq, im = m.encode_image_features(fi)
        tq, tm = m.encode_text_features(ft, fm)
        labels = batch.get("img_labels")
        return self.loss(iq.float(), tq.float(), m.weights(), im, tm, logit_scale=m.logit_scale, img_labels=labels)


def label_matrix(cuis) -> torch.Tensor:
    """[N, L] float32 multi-hot of the pairs' CUI lists (L = the distinct CUIs), the positives of L_img. A
    ValueError when no pair has a CUI (``rho > 0`` needs them)."""
    vocab = {c: j for j, c in enumerate(sorted({c for cs in cuis for c in cs}))}
    if not vocab:
        raise ValueError("rho: L_img needs CUI labels (the pairs' 'cuis'), and no training pair has any")
    out = torch.zeros(len(cuis), len(vocab))
    for i, cs in enumerate(cuis):
        for c in cs:
            out[i, vocab[c]] = 1.0
    return out


def _plot(history: List[dict], path: str) -> None:
    """``loss_curve.png``; skipped (one warning per process) without matplotlib, which training does not need
    otherwise (the ``[plot]`` extra; ``metrics.json`` holds the same numbers)."""
    global _PLOT_WARNED
    try:
        import matplotlib
    except ImportError:
        if not _PLOT_WARNED:
            name = os.path.basename(path)
            log.warning("matplotlib is not installed: %s not written (pip install 'pecm[plot]')", name)
            _PLOT_WARNED = True
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in ("loss", "sim", "conf", "div"):
        ax.plot(ep, [h["train"][key] for h in history], label=key)
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def train(
    model: PECM,
    train_pairs,
    out_dir: str,
    cfg: TrainConfig = TrainConfig(),
    val_pairs=None,
    train_feats=None,
    val_feats=None,
) -> List[dict]:
    """Train ``model`` on ``train_pairs``; returns the per-epoch history (also written to metrics.json)."""
    torch.manual_seed(cfg.seed)
    rank, world = _rank(), _world()
    dev = model.device
    state_path = os.path.join(out_dir, "train_state.pt")
    if model.text.doc2vec is None:
        model.text.fit(train_pairs.texts)
    cached = model.config.freeze_image and model.config.freeze_text
    n = len(train_pairs)
    loss = PECMLoss(cfg.lam, cfg.mu, cfg.div, nu=cfg.nu, gather=cfg.gather, kappa=cfg.kappa, rho=cfg.rho)
    step_mod = _Step(model, loss, cfg.feature_dropout)
    labels = label_matrix(train_pairs.cuis) if cfg.rho > 0 else None
    if world > 1:
        ddp = nn.parallel.DistributedDataParallel(
            step_mod, device_ids=[dev.index] if dev.type == "cuda" else None, find_unused_parameters=True
        )
    else:
        ddp = step_mod
    opt = torch.optim.Adam(_param_groups(model, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay)
    per_rank = math.ceil(n / world)
    steps_per_epoch = max(1, per_rank // cfg.batch_size)
    total = cfg.epochs * steps_per_epoch

    def lr_lambda(step):
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        t = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    history: List[dict] = []
    start = 0
    best = {"epoch": None, "rsum": -math.inf}
    best_path = os.path.join(out_dir, "best.safetensors")
    if cfg.resume and os.path.isfile(state_path):  # before the feature pass: a bad state file fails fast
        history, start, best = load_train_state(state_path, opt, sched)  # weights_only, validated
        log.info("resuming from epoch %d", start)
    if cached and train_feats is None:
        train_feats = extract_features(model, train_pairs, cfg.feature_batch, cfg.progress and rank == 0)
    if cached and val_pairs is not None and val_feats is None:
        val_feats = extract_features(model, val_pairs, cfg.feature_batch, cfg.progress and rank == 0)
    # end to end, the validation features change with the backbones: extracted again after every epoch (rank 0)
    has_val = val_feats is not None or (not cached and val_pairs is not None)
    select = cfg.select_best and has_val
    if cfg.select_best and not has_val:
        log.warning("select_best: no validation pairs (val_pairs=None); keeping the last epoch")
    use_amp = cfg.amp and dev.type == "cuda"
    for epoch in range(start, cfg.epochs):
        t0 = time.time()
        if world > 1:
            sampler = torch.utils.data.DistributedSampler(
                range(n), num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed, drop_last=True
            )
            sampler.set_epoch(epoch)
            order = torch.tensor(list(sampler))
        else:
            # one generator per epoch: a resumed run sees exactly the batches of an uninterrupted one
            order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 100003 + epoch))
        sums: Dict[str, float] = {}
        bar = tqdm(
            range(steps_per_epoch),
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            disable=not (cfg.progress and rank == 0),
            leave=False,
        )
        model.train()
        for s in bar:
            idx = order[s * cfg.batch_size : (s + 1) * cfg.batch_size]
            if len(idx) < 2:
                continue
            if cached:
                batch = {k: v[idx].to(dev) for k, v in train_feats.items()}
            else:
                part = [train_pairs.pairs[i] for i in idx.tolist()]
                batch = {
                    "images": model.load_image_paths([p.image for p in part]).to(dev),
                    "texts": [p.text for p in part],
                }
            if labels is not None:
                batch["img_labels"] = labels[idx].to(dev)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
                out = ddp(batch)
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            opt.step()
            sched.step()
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            bar.set_postfix(loss=f"{float(out['loss'].detach()):.3f}")
        rec = {
            "epoch": epoch + 1,
            "lr": sched.get_last_lr()[0],
            "seconds": time.time() - t0,
            "train": {k: v / steps_per_epoch for k, v in sums.items()},
        }
        if rank == 0 and has_val:
            vf = val_feats if cached else extract_features(model, val_pairs, cfg.feature_batch, False)
            ev = evaluate_features(model, vf, val_pairs.cuis, by_list=("score",))["score"]
            rec["val"] = {"image_to_report": ev["image_to_report"], "report_to_image": ev["report_to_image"]}
            rec["val"]["rsum"] = sum(ev["image_to_report"].values()) + sum(ev["report_to_image"].values())
            if select and rec["val"]["rsum"] > best["rsum"]:
                best = {"epoch": epoch + 1, "rsum": rec["val"]["rsum"]}
                _save_trainable(model, best_path)
        history.append(rec)
        if rank == 0:
            msg = " ".join(f"{k}={v:.4f}" for k, v in rec["train"].items())
            if "val" in rec:
                v = rec["val"]
                msg += f" | val i2r R@1={v['image_to_report']['R@1']:.1f} t2i R@1={v['report_to_image']['R@1']:.1f}"
            log.info("epoch %d/%d %s", epoch + 1, cfg.epochs, msg)
            if (epoch + 1) % cfg.save_every == 0 or epoch + 1 == cfg.epochs:
                save_training(model, out_dir, opt, sched, epoch, history, cfg, best)
    if select and rank == 0 and best["epoch"] is not None and os.path.isfile(best_path):
        sd = read_safetensors(best_path, "the weights of the best epoch")
        check_state_dict(best_path, sd, model.state_dict(), partial=True)
        model.load_state_dict(sd, strict=False)
        for h in history:
            h["selected"] = h["epoch"] == best["epoch"]
        log.info("selected epoch %d (best validation RSUM %.1f)", best["epoch"], best["rsum"])
        save_training(model, out_dir, opt, sched, cfg.epochs - 1, history, cfg, best)
    return history


def _param_groups(model: PECM, cfg: TrainConfig) -> List[dict]:
    """Adam parameter groups: the heads (and everything else trainable) at ``lr``, θ at ``lr · theta_lr`` and the
    unfrozen backbones (``image.*``, ``text.*``) at ``lr · backbone_lr``. A group is split off only when its
    multiplier is not 1, so a run with the defaults has one group (as older train states do)."""
    theta = cfg.theta_lr != 1.0 and model.theta.requires_grad
    base, back = [], []
    split_back = cfg.backbone_lr != 1.0
    for name, p in model.named_parameters():
        if not p.requires_grad or (theta and p is model.theta):
            continue
        (back if split_back and name.startswith(("image.", "text.")) else base).append(p)
    groups = [{"params": base}]
    if theta:
        groups.append({"params": [model.theta], "lr": cfg.lr * cfg.theta_lr})
    if back:
        groups.append({"params": back, "lr": cfg.lr * cfg.backbone_lr})
    return groups


def _save_trainable(model: PECM, path: str) -> None:
    """The tensors that training changes (heads, θ, scale; backbones too when unfrozen), atomically."""
    from safetensors.torch import save_file

    c = model.config
    sd = {
        k: v.detach().cpu().contiguous()
        for k, v in model.state_dict().items()
        if not (c.freeze_image and k.startswith("image.")) and not (c.freeze_text and k.startswith("text."))
    }
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    save_file(sd, path + ".tmp")
    os.replace(path + ".tmp", path)


def save_training(
    model: PECM, out_dir: str, opt, sched, epoch: int, history: List[dict], cfg: TrainConfig, best=None
) -> None:
    os.makedirs(out_dir, exist_ok=True)
    model.save(out_dir)
    torch.save(
        {
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "epoch": epoch,
            "history": history,
            "train_config": asdict(cfg),
            "best": best or {"epoch": None, "rsum": -math.inf},
        },
        os.path.join(out_dir, "train_state.pt.tmp"),
    )
    os.replace(os.path.join(out_dir, "train_state.pt.tmp"), os.path.join(out_dir, "train_state.pt"))
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(history, f, indent=1, default=float)
    _plot(history, os.path.join(out_dir, "loss_curve.png"))


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
