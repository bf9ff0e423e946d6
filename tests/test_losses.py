"""PECMLoss vs the same loss written directly from DESIGN §1 in plain float64 torch (values and gradients)."""

import pytest
import torch
import torch.nn.functional as F

from pecm.losses import PECMLoss, diversity


def _plain_scores(q, c, w, mq, mc):
    """Eq. 1-4 written out per pair: no ops, no backend."""
    qn, cn = F.normalize(q, dim=-1), F.normalize(c, dim=-1)
    s = torch.einsum("ikd,jkd->ijk", qn, cn)
    m = mq[:, None, :].to(q.dtype) * mc[None, :, :].to(q.dtype)
    den = (w * m).sum(-1)
    conf = torch.where(den > 0, (w * m * s).sum(-1) / den.clamp_min(1e-30), torch.zeros_like(den))
    hq = F.normalize((w * mq.to(q.dtype))[..., None].mul(qn).sum(1), dim=-1)
    hc = F.normalize((w * mc.to(q.dtype))[..., None].mul(cn).sum(1), dim=-1)
    return hq @ hc.t(), conf


def _plain_loss(q, c, w, mq, mc, log_scale, div, nu=0.0):
    sim, conf = _plain_scores(q, c, w, mq, mc)
    b = q.shape[0]
    lab = torch.arange(b)
    logits = log_scale.exp() * sim
    l_sim = (F.cross_entropy(logits, lab) + F.cross_entropy(logits.t(), lab)) / 2
    if nu:
        rl = log_scale.exp() * sim * conf  # L_rank: the same InfoNCE over R = sim * C
        l_sim = l_sim + nu * (F.cross_entropy(rl, lab) + F.cross_entropy(rl.t(), lab)) / 2
    l_conf = ((1 - conf.diagonal()) ** 2).mean()
    terms = []
    for z, m in ((q, mq), (c, mc)):
        vals, tot = [], []
        for i in range(b):
            zi = F.normalize(z[i], dim=-1)
            acc = z.new_zeros(())
            n = 0
            for k in range(z.shape[1]):
                for j in range(z.shape[1]):
                    if k != j and m[i, k] and m[i, j]:
                        cs = zi[k] @ zi[j]
                        acc = acc + (cs**2 if div == "decorrelate" else (1 - cs) ** 2)
                        n += 1
            vals.append(acc)
            tot.append(n)
        terms.append(sum(vals) / max(sum(tot), 1) if div == "decorrelate" else sum(vals) / b)
    return l_sim + l_conf + (terms[0] + terms[1]) / 2


@pytest.mark.parametrize("div,nu", [("decorrelate", 0.0), ("paper", 0.0), ("decorrelate", 0.7)])
def test_loss_and_gradients_match_plain_torch(div, nu):
    g = torch.Generator().manual_seed(0)
    b, k, d = 5, 4, 6
    q = torch.randn(b, k, d, generator=g, dtype=torch.float64)
    c = torch.randn(b, k, d, generator=g, dtype=torch.float64)
    theta = torch.randn(k, generator=g, dtype=torch.float64)
    mq = torch.ones(b, k, dtype=torch.bool)
    mc = torch.rand(b, k, generator=g) > 0.4
    mc[:, 0] = True
    mc[2] = False  # a report with no valid prototype at all: conf 0, no NaN
    mc[2, 0] = True
    ls = torch.tensor(1.3, dtype=torch.float64)
    args = [t.clone().requires_grad_(True) for t in (q, c, theta, ls)]
    w = k * torch.softmax(args[2], 0)
    out = PECMLoss(div=div, backend="torch", nu=nu)(args[0], args[1], w, mq, mc, logit_scale=args[3])
    assert ("rank" in out) == (nu > 0)
    grads = torch.autograd.grad(out["loss"], args)
    ref_args = [t.clone().requires_grad_(True) for t in (q, c, theta, ls)]
    ref = _plain_loss(ref_args[0], ref_args[1], k * torch.softmax(ref_args[2], 0), mq, mc, ref_args[3], div, nu)
    ref_grads = torch.autograd.grad(ref, ref_args)
    torch.testing.assert_close(out["loss"].double(), ref.detach(), rtol=1e-5, atol=1e-6)
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a.double(), r, rtol=1e-4, atol=1e-6)


def test_float32_path_matches_float64_reference():
    g = torch.Generator().manual_seed(1)
    q, c = torch.randn(8, 3, 5, generator=g), torch.randn(8, 3, 5, generator=g)
    w = torch.tensor([0.5, 1.0, 1.5])
    out = PECMLoss(backend="torch")(q, c, w)["loss"]
    m = torch.ones(8, 3, dtype=torch.bool)
    ref = _plain_loss(q.double(), c.double(), w.double(), m, m, torch.zeros((), dtype=torch.float64), "decorrelate")
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)


def test_diversity_directions():
    """Orthogonal prototypes: decorrelate = 0 (diverse is good); the literal paper term is maximal there."""
    z = torch.eye(4).unsqueeze(0)
    assert diversity(z, None, "decorrelate").item() == pytest.approx(0.0)
    assert diversity(z, None, "paper").item() == pytest.approx(12.0)  # 12 ordered pairs, (1 - 0)^2 each
    same = torch.ones(1, 4, 4)
    assert diversity(same, None, "decorrelate").item() == pytest.approx(1.0)
    assert diversity(same, None, "paper").item() == pytest.approx(0.0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="div"):
        PECMLoss(div="other")
    with pytest.raises(ValueError, match="nu"):
        PECMLoss(nu=-1.0)
    with pytest.raises(ValueError, match="txt"):
        PECMLoss()(torch.randn(2, 3, 4), torch.randn(3, 3, 4), torch.ones(3))
