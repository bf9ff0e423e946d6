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


def _plain_terms(q, c, w, mq, mc, log_scale, div, nu=0.0, kappa=0.0):
    """(L_sim [+ nu L_rank + kappa L_cnce], L_conf, L_div) of one batch, written directly from DESIGN §1."""
    sim, conf = _plain_scores(q, c, w, mq, mc)
    b = q.shape[0]
    lab = torch.arange(b)
    logits = log_scale.exp() * sim
    l_sim = (F.cross_entropy(logits, lab) + F.cross_entropy(logits.t(), lab)) / 2
    if nu:
        rl = log_scale.exp() * sim * conf  # L_rank: the same InfoNCE over R = sim * C
        l_sim = l_sim + nu * (F.cross_entropy(rl, lab) + F.cross_entropy(rl.t(), lab)) / 2
    if kappa:
        cl = log_scale.exp() * conf  # L_cnce: the same InfoNCE over C
        l_sim = l_sim + kappa * (F.cross_entropy(cl, lab) + F.cross_entropy(cl.t(), lab)) / 2
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
    return l_sim, l_conf, (terms[0] + terms[1]) / 2


def _plain_loss(q, c, w, mq, mc, log_scale, div, nu=0.0, kappa=0.0):
    return sum(_plain_terms(q, c, w, mq, mc, log_scale, div, nu, kappa))


@pytest.mark.parametrize(
    "div,nu,kappa",
    [("decorrelate", 0.0, 0.0), ("paper", 0.0, 0.0), ("decorrelate", 0.7, 0.0), ("decorrelate", 0.3, 1.4)],
)
def test_loss_and_gradients_match_plain_torch(div, nu, kappa):
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
    out = PECMLoss(div=div, backend="torch", nu=nu, kappa=kappa)(args[0], args[1], w, mq, mc, logit_scale=args[3])
    assert ("rank" in out) == (nu > 0) and ("cnce" in out) == (kappa > 0)
    grads = torch.autograd.grad(out["loss"], args)
    ref_args = [t.clone().requires_grad_(True) for t in (q, c, theta, ls)]
    ref = _plain_loss(ref_args[0], ref_args[1], k * torch.softmax(ref_args[2], 0), mq, mc, ref_args[3], div, nu, kappa)
    ref_grads = torch.autograd.grad(ref, ref_args)
    torch.testing.assert_close(out["loss"].double(), ref.detach(), rtol=1e-5, atol=1e-6)
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a.double(), r, rtol=1e-4, atol=1e-6)


def _plain_supcon(q, w, mq, labels, log_scale):
    """L_img written per anchor: -1/|P(i)| sum_p log(exp(s R_ip) / sum_{a != i} exp(s R_ia)), R = sim * C."""
    sim, conf = _plain_scores(q, q, w, mq, mq)
    r = log_scale.exp() * sim * conf
    terms = []
    for i in range(q.shape[0]):
        others = [a for a in range(q.shape[0]) if a != i]
        pos = [p for p in others if bool((labels[i] * labels[p]).sum() > 0)]
        if not pos:
            continue
        den = torch.logsumexp(r[i, others], 0)
        terms.append(-sum(r[i, p] - den for p in pos) / len(pos))
    return sum(terms) / len(terms) if terms else r.sum() * 0


@pytest.mark.parametrize("rho", [0.5, 2.0])
def test_image_supcon_term_matches_plain_torch(rho):
    """L_img (rho > 0): values and gradients against the per-anchor formula; anchors without a positive (item 4,
    whose only label nobody else has, and item 5, with no label) are left out of the mean."""
    g = torch.Generator().manual_seed(3)
    b, k, d = 6, 3, 5
    q = torch.randn(b, k, d, generator=g, dtype=torch.float64)
    c = torch.randn(b, k, d, generator=g, dtype=torch.float64)
    mq = torch.rand(b, k, generator=g) > 0.3
    mq[:, 0] = True
    w = torch.tensor([1.2, 0.9, 0.9], dtype=torch.float64)
    labels = torch.tensor(
        [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0]], dtype=torch.float64
    )
    ls = torch.tensor(0.7, dtype=torch.float64)
    qa, qb = q.clone().requires_grad_(True), q.clone().requires_grad_(True)
    base = PECMLoss(backend="torch")(qa, c, w, mq, None, logit_scale=ls)
    out = PECMLoss(backend="torch", rho=rho)(qa, c, w, mq, None, logit_scale=ls, img_labels=labels)
    ref = _plain_supcon(qb, w, mq, labels, ls)
    assert "img" in out and "img" not in base
    torch.testing.assert_close(out["img"].double(), ref.detach(), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close((out["loss"] - base["loss"]).double(), rho * ref.detach(), rtol=1e-6, atol=1e-8)
    ga = torch.autograd.grad(out["loss"] - base["loss"], qa)[0]
    gb = torch.autograd.grad(rho * ref, qb)[0]
    torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-8)
    # no anchor with a positive: the term is 0 (and has a zero gradient), not NaN
    none = PECMLoss(backend="torch", rho=rho)(q, c, w, mq, None, logit_scale=ls, img_labels=torch.eye(b))
    assert float(none["img"]) == 0.0 and torch.isfinite(none["loss"])


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
    with pytest.raises(ValueError, match="kappa"):
        PECMLoss(kappa=-0.5)
    with pytest.raises(ValueError, match="gather"):
        PECMLoss(gather="yes")
    with pytest.raises(ValueError, match="rho"):
        PECMLoss(rho=-1.0)
    with pytest.raises(ValueError, match="img_labels"):
        PECMLoss(rho=1.0)(torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.ones(3))
    with pytest.raises(ValueError, match="img_labels"):
        PECMLoss(rho=1.0)(torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.ones(3), img_labels=torch.ones(3, 2))
    with pytest.raises(ValueError, match="txt"):
        PECMLoss()(torch.randn(2, 3, 4), torch.randn(3, 3, 4), torch.ones(3))


# ---------------------------------------------------------------------------------------------- 2 gloo ranks
WORLD, B_LOCAL, K_, D_, D_IN = 2, 3, 4, 6, 5
CASES = (("decorrelate", 0.0), ("paper", 0.0), ("decorrelate", 0.7))


def _global_batch():
    """float64 inputs of the concatenated global batch [WORLD * B_LOCAL, ...] (rank r holds rows r*B .. r*B+B-1)."""
    g = torch.Generator().manual_seed(3)
    n = WORLD * B_LOCAL
    mq = torch.rand(n, K_, generator=g) > 0.2
    mc = torch.rand(n, K_, generator=g) > 0.4
    mq[:, 0] = mc[:, 0] = True
    return {
        "q": torch.randn(n, K_, D_, generator=g, dtype=torch.float64),
        "c": torch.randn(n, K_, D_, generator=g, dtype=torch.float64),
        "theta": torch.randn(K_, generator=g, dtype=torch.float64),
        "ls": torch.tensor(0.9, dtype=torch.float64),
        "mq": mq,
        "mc": mc,
        "xi": torch.randn(n, K_, D_IN, generator=g, dtype=torch.float64),
        "xt": torch.randn(n, K_, D_IN, generator=g, dtype=torch.float64),
    }


class _Toy(torch.nn.Module):
    """Two linear heads + θ + logit scale in float64: a stand-in for PECM's trainable part under DDP."""

    def __init__(self, gather=True):
        super().__init__()
        torch.manual_seed(5)
        self.pi = torch.nn.Linear(D_IN, D_, dtype=torch.float64)
        self.pt = torch.nn.Linear(D_IN, D_, dtype=torch.float64)
        self.theta = torch.nn.Parameter(torch.linspace(-0.5, 0.5, K_, dtype=torch.float64))
        self.ls = torch.nn.Parameter(torch.tensor(1.1, dtype=torch.float64))
        self.loss = PECMLoss(nu=0.5, backend="torch", gather=gather)

    def forward(self, xi, xt, mq, mc):
        w = K_ * torch.softmax(self.theta, 0)
        return self.loss(self.pi(xi), self.pt(xt), w, mq, mc, logit_scale=self.ls)


def _loss_rank(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        x = _global_batch()
        sl = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
        res = {"cases": {}}
        for div, nu in CASES:
            args = [t.clone().requires_grad_(True) for t in (x["q"][sl], x["c"][sl], x["theta"], x["ls"])]
            w = K_ * torch.softmax(args[2], 0)
            o = PECMLoss(div=div, nu=nu, backend="torch")(
                args[0], args[1], w, x["mq"][sl], x["mc"][sl], logit_scale=args[3]
            )
            res["cases"][(div, nu)] = {"loss": o["loss"].detach(), "grads": torch.autograd.grad(o["loss"], args)}
        local = PECMLoss(backend="torch", gather=False)(
            x["q"][sl], x["c"][sl], torch.ones(K_, dtype=torch.float64), x["mq"][sl], x["mc"][sl]
        )
        res["local_loss"] = local["loss"]
        ddp = torch.nn.parallel.DistributedDataParallel(_Toy())
        ddp(x["xi"][sl], x["xt"][sl], x["mq"][sl], x["mc"][sl])["loss"].backward()
        res["ddp_grads"] = {n: p.grad.clone() for n, p in ddp.module.named_parameters()}
        errors = []
        b = 3 if rank == 0 else 2  # unequal batch sizes
        try:
            PECMLoss(backend="torch")(x["q"][:b], x["c"][:b], torch.ones(K_, dtype=torch.float64))
        except ValueError as e:
            errors.append(str(e))
        try:  # masks on one rank only
            PECMLoss(backend="torch")(
                x["q"][sl], x["c"][sl], torch.ones(K_, dtype=torch.float64), None, x["mc"][sl] if rank else None
            )
        except ValueError as e:
            errors.append(str(e))
        res["errors"] = errors
        torch.save(res, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_equal_one_process_on_the_global_batch(tmp_path):
    """The 2-rank loss (mean over ranks) and its gradients equal the float64 single-process loss of the
    concatenated batch: global InfoNCE (and L_rank, L_conf); L_div is each rank's own, averaged."""
    import socket

    import torch.multiprocessing as tmp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "res")
    tmp.spawn(_loss_rank, args=(WORLD, port, out), nprocs=WORLD, join=True)
    res = [torch.load(f"{out}.{r}", weights_only=False) for r in range(WORLD)]
    x = _global_batch()
    chunks = [slice(r * B_LOCAL, (r + 1) * B_LOCAL) for r in range(WORLD)]
    for div, nu in CASES:
        ref_args = [t.clone().requires_grad_(True) for t in (x["q"], x["c"], x["theta"], x["ls"])]
        w = K_ * torch.softmax(ref_args[2], 0)
        l_sim, l_conf, _ = _plain_terms(ref_args[0], ref_args[1], w, x["mq"], x["mc"], ref_args[3], div, nu)
        q_, c_, ls_ = ref_args[0], ref_args[1], ref_args[3]
        l_div = sum(_plain_terms(q_[s], c_[s], w, x["mq"][s], x["mc"][s], ls_, div)[2] for s in chunks) / WORLD
        ref = l_sim + l_conf + l_div
        ref_g = torch.autograd.grad(ref, ref_args)
        got = [res[r]["cases"][(div, nu)] for r in range(WORLD)]
        # the DDP objective: the mean of the per-rank losses
        torch.testing.assert_close(sum(g["loss"] for g in got) / WORLD, ref.detach(), rtol=1e-10, atol=1e-12)
        for r, s in enumerate(chunks):
            # a rank's input gradient holds every rank's loss (the gather's backward all-reduces): DDP's 1/W
            # average of the parameter gradients makes it the gradient of the mean loss
            for gi in (0, 1):
                torch.testing.assert_close(got[r]["grads"][gi] / WORLD, ref_g[gi][s], rtol=1e-9, atol=1e-12)
        for gi in (2, 3):  # θ and the scale are replicated, not gathered: DDP averages the per-rank gradients
            torch.testing.assert_close(sum(g["grads"][gi] for g in got) / WORLD, ref_g[gi], rtol=1e-9, atol=1e-12)
    # the negatives matter: the mean of rank-local InfoNCE losses (gather=False) is not the global loss
    ones = torch.ones(K_, dtype=torch.float64)
    zero = torch.zeros((), dtype=torch.float64)
    for r, s in enumerate(chunks):
        torch.testing.assert_close(
            res[r]["local_loss"], _plain_loss(x["q"][s], x["c"][s], ones, x["mq"][s], x["mc"][s], zero, "decorrelate")
        )

    def sim_conf(s):
        return sum(_plain_terms(x["q"][s], x["c"][s], ones, x["mq"][s], x["mc"][s], zero, "decorrelate")[:2])

    assert abs(float(sim_conf(slice(None)) - sum(sim_conf(s) for s in chunks) / WORLD)) > 0.05
    # a real DDP module: its averaged parameter gradients are those of one process on the global batch
    # (global InfoNCE, L_rank and L_conf from gather=False on the concatenated batch; L_div per rank, averaged)
    toy = _Toy(gather=False)
    toy.loss.mu = 0.0
    zi, zt = toy.pi(x["xi"]), toy.pt(x["xt"])
    div_mean = sum(
        (diversity(zi[s], x["mq"][s], "decorrelate") + diversity(zt[s], x["mc"][s], "decorrelate")) / 2 for s in chunks
    )
    (toy(x["xi"], x["xt"], x["mq"], x["mc"])["loss"] + div_mean / WORLD).backward()
    for n, p in toy.named_parameters():
        for r in range(WORLD):
            torch.testing.assert_close(res[r]["ddp_grads"][n], p.grad, rtol=1e-9, atol=1e-12, msg=n)
    for r in range(WORLD):
        assert len(res[r]["errors"]) == 2
        assert (
            "img: expected the same batch size on every rank" in res[r]["errors"][0] and "[3, 2]" in res[r]["errors"][0]
        )
        assert "img_mask/txt_mask" in res[r]["errors"][1]
