"""`PECMLoss`: L = L_sim + λ L_conf + μ L_div (DESIGN §1, Eq. 5), in the style of open_clip's ``ClipLoss``.

- ``L_sim``: symmetric InfoNCE over the in-batch cosine matrix ``sim`` [B, B] (image i ↔ report i positive):
  ``(CE(s·sim, arange) + CE(s·simᵀ, arange)) / 2``. The scale ``s`` is the model's logit scale: learnable
  CLIP-style by default (``exp(logit_scale)``, clamped to ≤ 100); the paper uses no temperature, which is
  ``PECMConfig(temperature=1.0)`` (a fixed s = 1).
- ``L_conf = mean_i (1 − C(v_i, t_i))²`` over the matched pairs (the diagonal of the confidence matrix).
- ``L_rank`` (an extension, not in the paper; weight ``nu``, default 0 = the paper's loss): the same symmetric
  InfoNCE over the score matrix ``R = sim · C``. L_conf only pulls matched confidences towards 1, so nothing
  teaches C to rank; L_rank trains the product that retrieval sorts by (Eq. 8).
- ``L_div`` on each item's unit prototypes z^k (masked prototypes excluded), averaged over both modalities:
  ``"decorrelate"`` (default, the stated intent): mean over valid pairs k ≠ l of cos(z^k, z^l)²;
  ``"paper"``: the literal Σ_{k≠l} (1 − cos(z^k, z^l))² (summed over pairs, averaged over items), which
  *pulls prototypes together* — the opposite of diversity; kept for reproduction only; ``"none"``: 0.

``sim``/``conf`` come from `pecm.ops.pecm_scores` (B×B), so the backend's fused backward trains the model:
``backend=None`` picks "torch" on CPU and "triton" on CUDA.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops

DIV_CHOICES = ("decorrelate", "paper", "none")


def diversity(z: torch.Tensor, mask: Optional[torch.Tensor], kind: str) -> torch.Tensor:
    """L_div of prototypes z [B, K, D] with mask [B, K] (see module doc)."""
    if kind == "none":
        return z.new_zeros(())
    zn = F.normalize(z.float(), dim=-1)
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


class PECMLoss(nn.Module):
    def __init__(
        self,
        lam: float = 1.0,
        mu: float = 1.0,
        div: str = "decorrelate",
        backend: Optional[str] = None,
        max_logit_scale: float = 100.0,
        nu: float = 0.0,
    ):
        super().__init__()
        if div not in DIV_CHOICES:
            raise ValueError(f"div: expected one of {DIV_CHOICES}, got {div!r}")
        for name, v in (("lam", lam), ("mu", mu), ("nu", nu)):
            if not float(v) >= 0:
                raise ValueError(f"{name}: expected a weight >= 0, got {v}")
        self.lam, self.mu, self.div, self.backend, self.max_scale = float(lam), float(mu), div, backend, max_logit_scale
        self.nu = float(nu)

    def forward(self, img, txt, w, img_mask=None, txt_mask=None, logit_scale=None) -> Dict[str, torch.Tensor]:
        """img, txt: prototypes [B, K, D]; w: [K]; masks bool [B, K]; logit_scale: log of the InfoNCE scale."""
        if img.shape != txt.shape:
            raise ValueError(f"txt: expected the shape of img {list(img.shape)}, got {list(txt.shape)}")
        backend = self.backend or ("triton" if img.is_cuda else "torch")
        sim, conf, score = ops.pecm_scores(img, txt, w, q_mask=img_mask, c_mask=txt_mask, backend=backend)
        b = sim.shape[0]
        labels = torch.arange(b, device=sim.device)
        scale = sim.new_ones(()) if logit_scale is None else logit_scale.float().exp().clamp(max=self.max_scale)
        logits = scale * sim
        l_sim = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
        l_conf = (1.0 - conf.diagonal()).pow(2).mean()
        l_div = (diversity(img, img_mask, self.div) + diversity(txt, txt_mask, self.div)) / 2
        loss = l_sim + self.lam * l_conf + self.mu * l_div
        out = {}
        if self.nu > 0:
            rl = scale * score
            l_rank = (F.cross_entropy(rl, labels) + F.cross_entropy(rl.t(), labels)) / 2
            loss = loss + self.nu * l_rank
            out["rank"] = l_rank.detach()
        return {
            **out,
            "loss": loss,
            "sim": l_sim.detach(),
            "conf": l_conf.detach(),
            "div": l_div.detach(),
            "scale": scale.detach(),
        }
