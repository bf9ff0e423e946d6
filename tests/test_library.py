"""`pecm.library`: the torch custom ops (opcheck), torch.compile(fullgraph=True) of code calling the
ops (no graph break, same results as eager), and the differentiable "auto" choice, compiled or not."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import assert_topk_matches, make_inputs, ref_scores
from torch.library import opcheck

from pecm import library, ops, reference
from pecm.backends import available_backends

CPU_BACKENDS = [b for b in ("torch", "cpp") if b in available_backends()]


def _prepared(b=3, n=40, k=4, d=16, dtype=torch.float32, masks=True, seed=0):
    q, c, w, qm, cm = make_inputs(b, n, k, d, dtype=dtype, masks=masks, seed=seed)
    return ops.prepare_queries(q, w, q_mask=qm), ops.prepare_candidates(c, w, c_mask=cm), (q, c, w, qm, cm)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("raw", [False, True])
def test_opcheck_forward_ops(backend, raw):
    qs, cs, (q, c, w, qm, cm) = _prepared(dtype=torch.float16)
    if raw:
        cs = ops.Candidates(c, w, cm)  # a raw view: the kernels normalise on the fly
    args = library.operand_args(qs, cs)
    cand = torch.randint(-1, cs.n, (qs.b, 25))
    opcheck(torch.ops.pecm.topk.default, (*args, 7, 0, 0, backend))
    opcheck(torch.ops.pecm.rerank.default, (*args, cand, 7, 1, backend))
    opcheck(torch.ops.pecm.scores.default, (*args, backend))


def test_opcheck_scores_autograd_and_backward_op():
    q, c, w, qm, cm = make_inputs(3, 5, 4, 8, dtype=torch.float64, masks=True, seed=1)
    q.requires_grad_(True)
    c.requires_grad_(True)
    qs = ops.prepare_queries(q, w.double(), q_mask=qm)
    cs = ops.prepare_candidates(c, w.double(), c_mask=cm)
    opcheck(torch.ops.pecm.scores.default, (*library.operand_args(qs, cs), "torch"))
    sim, conf, _ = (t.detach() for t in library.scores(*library.operand_args(qs, cs), "torch"))
    g = [torch.randn_like(sim) for _ in range(3)]
    bargs = (*g, *(t.detach() for t in (qs.qw, qs.qden, qs.qp, cs.prototypes)), cs.mask, cs.pooled.detach(), sim, conf)
    opcheck(torch.ops.pecm.scores_backward.default, (*bargs, "torch"))


def test_scores_backward_matches_autograd_of_plain_torch():
    """The closed-form backward of pecm::scores (torch backend) == autograd through the same math."""
    q, c, w, qm, cm = make_inputs(4, 7, 5, 8, dtype=torch.float64, masks=True, seed=2)
    w = w.double().requires_grad_(True)
    q.requires_grad_(True)
    c.requires_grad_(True)
    qp = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    sim, conf, score = ops.pecm_scores(q, c, w, q_mask=qm, c_mask=cm, q_pooled=qp)
    gs = [torch.randn_like(sim) for _ in range(3)]
    got = torch.autograd.grad((sim * gs[0] + conf * gs[1] + score * gs[2]).sum(), (q, c, w, qp))
    from pecm.operands import fold_queries, normalize_block

    qw, qden, qpp = fold_queries(q, w, qm, qp, torch.float64)
    chat, cp = normalize_block(c, w, cm, None, False, False, torch.float64)
    num = qw @ chat.reshape(7, -1).T
    den = qden @ cm.double().T
    s2 = qpp @ cp.T
    c2 = torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(num))
    want = torch.autograd.grad((s2 * gs[0] + c2 * gs[1] + s2 * c2 * gs[2]).sum(), (q, c, w, qp))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)
    assert torch.autograd.gradcheck(
        lambda q, c, w: ops.pecm_scores(q, c, w, q_mask=qm, c_mask=cm)[2], (q, c, w), eps=1e-6, atol=1e-6
    )


def test_compile_fullgraph_topk_and_rerank_match_eager():
    """(a) a function that calls pecm_topk / pecm_rerank compiles without a graph break (CPU: the
    pybind11 kernels behind the custom ops) and matches eager."""
    torch._dynamo.reset()
    q, c, w, qm, cm = make_inputs(4, 300, 6, 32, dtype=torch.float16, masks=True, seed=3)
    cand = torch.randint(-1, 300, (4, 50))
    cs = ops.prepare_candidates(c, w, c_mask=cm)

    def search(q, c, w, cand):
        v, i = ops.pecm_topk(q, c, w, 10, q_mask=qm, c_mask=cm)  # raw c: normalised on the fly
        v2, i2 = ops.pecm_rerank(q, cs, cand, None, 5, q_mask=qm, by="sim")  # prepared Candidates
        return v * 2, i, v2, i2

    compiled = torch.compile(search, fullgraph=True)
    got = compiled(q, c, w, cand)
    want = search(q, c, w, cand)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(got[2], want[2], atol=1e-5, rtol=0)
    sim, conf, score = ref_scores(q, c, w, qm, cm)
    assert_topk_matches(got[0] / 2, got[1], score, 10, 2e-2)
    exp_v, _ = reference.rerank(sim, cand.numpy(), 5)
    np.testing.assert_allclose(got[2].double().numpy(), exp_v, atol=2e-2, rtol=0)


def test_compile_fullgraph_training_loss_with_backward_matches_eager():
    """(b) a training loss calling pecm_scores compiles without a graph break, with backward; "auto"
    picks a differentiable backend because the inputs require gradients."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(4)
    img = torch.randn(8, 6, 32, generator=g, requires_grad=True)
    txt = torch.randn(8, 6, 32, generator=g, requires_grad=True)
    theta = torch.zeros(6, requires_grad=True)
    mask = torch.rand(8, 6, generator=g) > 0.2

    def loss_fn(img, txt, theta):
        w = 6 * torch.softmax(theta, 0)
        sim, conf, score = ops.pecm_scores(img, txt, w, q_mask=mask, c_mask=mask)
        labels = torch.arange(8)
        return torch.nn.functional.cross_entropy(10 * sim, labels) + (1 - conf.diagonal()).pow(2).mean() + score.mean()

    compiled = torch.compile(loss_fn, fullgraph=True)
    l1 = compiled(img, txt, theta)
    g1 = torch.autograd.grad(l1, (img, txt, theta))
    l0 = loss_fn(img, txt, theta)
    g0 = torch.autograd.grad(l0, (img, txt, theta))
    torch.testing.assert_close(l1, l0, atol=1e-5, rtol=0)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert all(float(x.abs().sum()) > 0 for x in g1)


def test_auto_picks_a_differentiable_backend_when_gradients_are_needed():
    q, c, w, qm, cm = make_inputs(3, 10, 4, 8, seed=5)
    q.requires_grad_(True)
    sim, conf, score = ops.pecm_scores(q, c, w)  # eager: would be "cpp" without gradients
    score.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
    with torch.no_grad():
        ops.pecm_scores(q, c, w)  # no gradients needed: any backend
    if "cpp" in available_backends():
        with pytest.raises(ValueError, match="'cpp' is not differentiable"):
            ops.pecm_scores(q, c, w, backend="cpp")
