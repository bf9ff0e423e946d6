"""`PECMLoss`: L = L_sim + λ L_conf + μ L_div (DESIGN §1, Eq. 5), in the style of open_clip's ``ClipLoss``.

- ``L_sim``: symmetric InfoNCE over the in-batch cosine matrix ``sim`` [B, B] (image i ↔ report i positive):
  ``(CE(s·sim, arange) + CE(s·simᵀ, arange)) / 2``. The scale ``s`` is the model's logit scale: learnable
  CLIP-style by default (``exp(logit_scale)``, clamped to ≤ 100); the paper uses no temperature, which is
  ``PECMConfig(temperature=1.0)`` (a fixed s = 1).
- ``L_conf = mean_i (1 − C(v_i, t_i))²`` over the matched pairs (the diagonal of the confidence matrix).
- ``L_rank`` (an extension, not in the paper; weight ``nu``, default 0 = the paper's loss): the same symmetric
  InfoNCE over the score matrix ``R = sim · C``. L_conf only pulls matched confidences towards 1, so nothing
  teaches C to rank; L_rank trains the product that retrieval sorts by (Eq. 8).
- ``L_cnce`` (an extension, not in the paper; weight ``kappa``, default 0): the same symmetric InfoNCE over the
  confidence matrix ``C`` itself — a confidence loss that sees the in-batch negatives (L_conf only pulls the
  matched C towards 1), so C is trained as a ranking signal of its own, beside sim.
- ``L_img`` (an extension, not in the paper; weight ``rho``, default 0): a supervised contrastive loss (SupCon,
  Khosla et al. 2020, the "L_out" form) over the in-batch **image–image** score matrix, the one image→image
  search (CBIR) sorts by: anchor i's positives P(i) are the other batch images that share a label with it
  (``img_labels`` [B, L] multi-hot, e.g. the pairs' CUIs), ``L_img = mean_{i: P(i) ≠ ∅} −1/|P(i)| Σ_{p ∈ P(i)}
  log softmax_{a ≠ i}(s·R_img)[i, p]``. The cross-modal terms never compare two images, so without it
  nothing pulls images with shared findings together. Under DDP it stays local (a rank's own images).
- ``L_div`` on each item's unit prototypes z^k (masked prototypes excluded), averaged over both modalities:
  ``"decorrelate"`` (default, the stated intent): mean over valid pairs k ≠ l of cos(z^k, z^l)²;
  ``"paper"``: the literal Σ_{k≠l} (1 − cos(z^k, z^l))² (summed over pairs, averaged over items), which
  *pulls prototypes together* — the opposite of diversity; kept for reproduction only; ``"none"``: 0.

``sim``/``conf`` come from `pecm.ops.pecm_scores` (B×B), so the backend's fused backward trains the model:
``backend=None`` picks "torch" on CPU and "triton" on CUDA.

**Global-batch InfoNCE under DDP** (``gather=True``, the default; open_clip's ``ClipLoss`` with
``local_loss=True, gather_with_grad=True``): when a ``torch.distributed`` process group with world size W > 1
is initialised, every rank all-gathers the image and report prototypes (and masks) of all ranks, in rank order,
and scores its B local items against all W·B: the image→report logits are ``pecm_scores(img_local, txt_all)``
and the report→image logits ``pecm_scores(img_all, txt_local)ᵀ``, both [B, W·B], with the positives at
columns ``rank·B + i``. So ``L_sim`` (and ``L_rank``) of a rank is the mean over its own rows of the global
InfoNCE, and the mean of the W per-rank losses is the InfoNCE of the concatenated global batch (each row's
negatives are all W·B − 1 other items; computing only B×(W·B), not the full (W·B)², is the "local loss" choice).
The gather keeps gradients (`all_gather_with_grad`: its backward sums the gradient of every rank's loss w.r.t.
the gathered tensor with one all-reduce and returns the local slice), so after DDP *averages* the parameter
gradients over the W ranks they are exactly the gradients of that global mean loss (tested against a single
process on the concatenated batch). ``L_conf`` and ``L_div`` stay local (a rank's own matched pairs and
items); their DDP average is the global mean for ``L_conf`` and ``div="paper"``, while for the default
``div="decorrelate"`` with masks it is the mean of the W per-rank means (each normalised by its own number of
valid prototype pairs). The loss values a rank returns are its own (local) terms.
Requirements, checked every call with one small all-gather of the shapes (a ``ValueError`` on every rank,
never a hang): the same batch size B on every rank (`pecm.train` drops the last uneven batch; its
`DistributedSampler` gives every rank the same number of items), the same K and D, and masks given on all
ranks or on none. Every rank of the group must call the loss each step (it is a collective). ``gather=False``
(``TrainConfig(gather=False)``, ``pecm train --local-negatives``) uses each rank's local B×B batch only.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from . import ops

DIV_CHOICES = ("decorrelate", "paper", "none")


def diversity(z: torch.Tensor, mask: Optional[torch.Tensor], kind: str) -> torch.Tensor:
    """L_div of prototypes z [B, K, D] with mask [B, K] (see module doc)."""
    if kind == "none":
        return z.new_zeros(())
    zn = F.normalize(z if z.dtype == torch.float64 else z.float(), dim=-1)  # float32, float64 stays float64
    g = zn @ zn.transpose(1, 2)  # [B, K, K]
    k = z.shape[1]
    valid = ~torch.eye(k, dtype=torch.bool, device=z.device)
    valid = valid.expand(z.shape[0], k, k)
    if mask is not None:
        m = mask.bool()
        valid = valid & m[:, :, None] & m[:, None, :]
    vf = valid.float()
    if kind == "decorrelate":
        return (g.pow(2) * vf).sum() / vf.sum().clamp_min(1.0)
    return ((1.0 - g).pow(2) * vf).sum((1, 2)).mean()


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _AllGatherWithGrad(torch.autograd.Function):
    """``torch.cat`` of every rank's ``x`` (rank order) along dim 0; backward: the all-reduced (summed) gradient,
    sliced to this rank's rows. One all-reduce instead of a reduce-scatter, so it works on every backend (gloo has
    no reduce-scatter); torch.distributed.nn.functional.all_gather is deprecated."""

    @staticmethod
    def forward(ctx, x):
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        ctx.rank, ctx.b = dist.get_rank(), x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        g = grad.contiguous().clone()
        dist.all_reduce(g, op=dist.ReduceOp.SUM)
        return g[ctx.rank * ctx.b : (ctx.rank + 1) * ctx.b]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """[B, ...] on each of W ranks -> [W·B, ...] (rank r's rows at r·B); gradients flow back to every rank's x."""
    return _AllGatherWithGrad.apply(x)


def _all_gather(x: torch.Tensor) -> torch.Tensor:
    """No-gradient all-gather (masks); bool travels as uint8."""
    y = x.to(torch.uint8) if x.dtype == torch.bool else x.contiguous()
    parts = [torch.empty_like(y) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, y)
    out = torch.cat(parts)
    return out.bool() if x.dtype == torch.bool else out


def _check_ranks(img, img_mask, txt_mask) -> None:
    """Every rank must give the same B, K, D and the same mask presence; raises the same ValueError on every rank."""
    b, k, d = img.shape
    me = torch.tensor([b, k, d, img_mask is not None, txt_mask is not None], dtype=torch.int64, device=img.device)
    parts = [torch.empty_like(me) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, me)
    allv = torch.stack(parts).cpu()
    if not bool((allv == allv[0]).all()):
        per = {r: allv[r].tolist() for r in range(allv.shape[0])}
        if not bool((allv[:, 0] == allv[0, 0]).all()):
            what = f"img: expected the same batch size on every rank (gather=True), got {allv[:, 0].tolist()} by rank"
        elif not bool((allv[:, 1:3] == allv[0, 1:3]).all()):
            what = f"img: expected the same K, D on every rank, got {[v[1:3] for v in per.values()]} by rank"
        else:
            what = (
                "img_mask/txt_mask: expected masks given on every rank or on none (gather=True), got "
                f"{[v[3:] for v in per.values()]} (img_mask, txt_mask present) by rank"
            )
        raise ValueError(what + "; pass gather=False for a rank-local InfoNCE")


def supcon(img, img_mask, w, labels, scale, backend) -> torch.Tensor:
    """L_img (module doc): SupCon over the image–image score matrix R = sim · C of ``img`` [B, K, D]; positives
    share a label of ``labels`` [B, L]; anchors without a positive are left out (0 when no anchor has one)."""
    _, _, r = ops.pecm_scores(img, img, w, q_mask=img_mask, c_mask=img_mask, backend=backend)
    b = r.shape[0]
    eye = torch.eye(b, dtype=torch.bool, device=r.device)
    lab = labels.to(device=r.device, dtype=r.dtype)
    pos = ((lab @ lab.t()) > 0) & ~eye
    logits = (scale * r).masked_fill(eye, float("-inf"))
    logp = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    npos = pos.sum(1)
    has = npos > 0
    if not bool(has.any()):
        return r.sum() * 0.0
    per = -(logp.masked_fill(~pos, 0.0).sum(1)[has] / npos[has].to(r.dtype))
    return per.mean()


class PECMLoss(nn.Module):
    def __init__(
        self,
        lam: float = 1.0,
        mu: float = 1.0,
        div: str = "decorrelate",
        backend: Optional[str] = None,
        max_logit_scale: float = 100.0,
        nu: float = 0.0,
        gather: bool = True,
        kappa: float = 0.0,
        rho: float = 0.0,
    ):
        super().__init__()
        if not isinstance(gather, bool):
            raise ValueError(f"gather: expected a bool, got {gather!r}")
        if div not in DIV_CHOICES:
            raise ValueError(f"div: expected one of {DIV_CHOICES}, got {div!r}")
        for name, v in (("lam", lam), ("mu", mu), ("nu", nu), ("kappa", kappa), ("rho", rho)):
            if not float(v) >= 0:
                raise ValueError(f"{name}: expected a weight >= 0, got {v}")
        self.lam, self.mu, self.div, self.backend, self.max_scale = float(lam), float(mu), div, backend, max_logit_scale
        self.nu, self.kappa, self.rho = float(nu), float(kappa), float(rho)
        self.gather = gather

    def forward(
        self, img, txt, w, img_mask=None, txt_mask=None, logit_scale=None, img_labels=None
    ) -> Dict[str, torch.Tensor]:
        """img, txt: prototypes [B, K, D]; w: [K]; masks bool [B, K]; logit_scale: log of the InfoNCE scale;
        img_labels: [B, L] multi-hot labels of the images (needed when rho > 0; two images are positives of
        L_img when they share a label)."""
        if img.shape != txt.shape:
            raise ValueError(f"txt: expected the shape of img {list(img.shape)}, got {list(txt.shape)}")
        if self.rho > 0:
            if img_labels is None:
                raise ValueError("img_labels: required when rho > 0 (L_img needs the images' labels, e.g. CUIs)")
            if img_labels.dim() != 2 or img_labels.shape[0] != img.shape[0]:
                got = list(img_labels.shape)
                raise ValueError(f"img_labels: expected a [B, L] multi-hot tensor with B = {img.shape[0]}, got {got}")
        backend = self.backend or ("triton" if img.is_cuda else "torch")
        if self.gather and _world() > 1:
            _check_ranks(img, img_mask, txt_mask)
            b, off = img.shape[0], dist.get_rank() * img.shape[0]
            img_all, txt_all = all_gather_with_grad(img), all_gather_with_grad(txt)
            im_all = None if img_mask is None else _all_gather(img_mask)
            tm_all = None if txt_mask is None else _all_gather(txt_mask)
            # image -> report rows [B, W*B] and report -> image rows [B, W*B] (sim and C are symmetric in q, c)
            sim, conf, score = ops.pecm_scores(img, txt_all, w, q_mask=img_mask, c_mask=tm_all, backend=backend)
            sim_t, conf_t, score_t = ops.pecm_scores(img_all, txt, w, q_mask=im_all, c_mask=txt_mask, backend=backend)
            sim_t, conf_t, score_t = sim_t.t(), conf_t.t(), score_t.t()
            labels = torch.arange(off, off + b, device=sim.device)
            conf_pos = conf[torch.arange(b, device=conf.device), labels]
        else:
            sim, conf, score = ops.pecm_scores(img, txt, w, q_mask=img_mask, c_mask=txt_mask, backend=backend)
            sim_t, conf_t, score_t = sim.t(), conf.t(), score.t()
            labels = torch.arange(sim.shape[0], device=sim.device)
            conf_pos = conf.diagonal()
        if logit_scale is None:
            scale = sim.new_ones(())
        else:  # float32 (or float64 for float64 inputs: exact gradient checks), also under bfloat16 autocast
            ls = logit_scale if logit_scale.dtype == torch.float64 else logit_scale.float()
            scale = ls.exp().clamp(max=self.max_scale)

        def infonce(rows, rows_t):  # symmetric InfoNCE: image -> report rows and report -> image rows
            return (F.cross_entropy(scale * rows, labels) + F.cross_entropy(scale * rows_t, labels)) / 2

        l_sim = infonce(sim, sim_t)
        l_conf = (1.0 - conf_pos).pow(2).mean()
        l_div = (diversity(img, img_mask, self.div) + diversity(txt, txt_mask, self.div)) / 2
        loss = l_sim + self.lam * l_conf + self.mu * l_div
        out = {}
        if self.nu > 0:
            l_rank = infonce(score, score_t)
            loss = loss + self.nu * l_rank
            out["rank"] = l_rank.detach()
        if self.kappa > 0:
            l_cnce = infonce(conf, conf_t)
            loss = loss + self.kappa * l_cnce
            out["cnce"] = l_cnce.detach()
        if self.rho > 0:
            l_img = supcon(img, img_mask, w, img_labels, scale, backend)
            loss = loss + self.rho * l_img
            out["img"] = l_img.detach()
        return {
            **out,
            "loss": loss,
            "sim": l_sim.detach(),
            "conf": l_conf.detach(),
            "div": l_div.detach(),
            "scale": scale.detach(),
        }
