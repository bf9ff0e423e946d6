"""Gradients of the Triton `pecm_scores` (Triton backward kernels) vs. the torch backend's autograd.

CPU under TRITON_INTERPRET=1 (marked ``interpret``) without CUDA, the GPU with it (marked ``gpu``).
"""

from __future__ import annotations

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # shared helpers, any import mode
from test_triton_kernels import DEVICES, fresh_triton_backend, make_case  # noqa: E402

from pecm import ops  # noqa: E402

GRAD_TOL = {torch.float32: (1e-5, 1e-4), torch.float16: (2e-2, 2e-2), torch.bfloat16: (2e-2, 3e-2)}


@pytest.fixture(scope="module", autouse=True)
def _triton_ready():
    fresh_triton_backend()


def _grads(backend, q, c, w, qm, cm, qp, cp, g, use):
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, c, w)]
    extra = [None if t is None else t.detach().clone().requires_grad_(True) for t in (qp, cp)]
    outs = ops.pecm_scores(*leaves, q_mask=qm, c_mask=cm, q_pooled=extra[0], c_pooled=extra[1], backend=backend)
    loss = sum((o.float() * gi).sum() for o, gi, u in zip(outs, g, use) if u)
    wrt = leaves + [t for t in extra if t is not None]
    return outs, torch.autograd.grad(loss, wrt)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "dtype,masks,pooled,use",
    [
        (torch.float32, True, False, (True, True, True)),
        (torch.float32, False, False, (True, True, True)),
        (torch.float32, True, True, (False, False, True)),  # only score used: other grads are None
        (torch.float32, True, False, (False, True, False)),  # only conf
        (torch.float16, True, False, (True, True, True)),
        (torch.bfloat16, True, True, (True, False, True)),
    ],
)
def test_grad_matches_torch_backend(device, dtype, masks, pooled, use):
    q, c, w, qm, cm = make_case(device, dtype, b=4, n=33, masks=masks)
    gen = torch.Generator().manual_seed(7)
    qp = cp = None
    if pooled:
        qp = torch.randn(4, q.shape[-1], generator=gen).to(device=device, dtype=dtype)
        cp = torch.randn(33, q.shape[-1], generator=gen).to(device=device, dtype=dtype)
    g = [torch.randn(4, 33, generator=gen).to(device) for _ in range(3)]
    outs_t, grads_t = _grads("triton", q, c, w, qm, cm, qp, cp, g, use)
    outs_r, grads_r = _grads("torch", q, c, w, qm, cm, qp, cp, g, use)
    atol, rtol = GRAD_TOL[dtype]
    for a, b in zip(outs_t, outs_r):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)
    names = ["q", "c", "w", "q_pooled", "c_pooled"][: len(grads_t)]
    for name, a, b in zip(names, grads_t, grads_r):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.isfinite(a).all(), name
        scale = max(1.0, float(b.float().abs().max()))
        msg = lambda m, n=name: f"grad of {n}: {m}"
        torch.testing.assert_close(a.float(), b.float(), atol=atol * scale, rtol=rtol, msg=msg)
    assert any(float(x.abs().max()) > 0 for x in grads_t), "all gradients are zero: the test would be vacuous"


@pytest.mark.parametrize("device", DEVICES)
def test_grad_square_training_case_infonce_like(device):
    """B x B (matched pairs on the diagonal), loss of the training shape: InfoNCE on sim + (1 - C)^2."""
    q, c, w, qm, cm = make_case(device, torch.float32, b=6, n=6, masks=True, ties=False)

    def loss_of(backend):
        leaves = [t.detach().clone().requires_grad_(True) for t in (q, c, w)]
        sim, conf, _ = ops.pecm_scores(*leaves, q_mask=qm, c_mask=cm, backend=backend)
        tgt = torch.arange(6, device=device)
        l_sim = torch.nn.functional.cross_entropy(sim / 0.1, tgt) + torch.nn.functional.cross_entropy(sim.T / 0.1, tgt)
        l_conf = ((1 - conf.diagonal()) ** 2).mean()
        return torch.autograd.grad(l_sim + l_conf, leaves)

    for a, b in zip(loss_of("triton"), loss_of("torch")):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,pooled", [(torch.float32, False), (torch.float16, True), (torch.bfloat16, False)])
def test_on_the_fly_forward_equals_autograd_forward(device, dtype, pooled):
    """Without gradients raw candidates are normalised (and pooled) inside the fused kernel; with them the
    ops hand the autograd path prepared candidates. Both forwards agree, and the backward runs."""
    q, c, w, qm, cm = make_case(device, dtype, b=4, n=33)
    cp = None
    if pooled:
        gen = torch.Generator().manual_seed(3)
        cp = (torch.randn(33, q.shape[-1], generator=gen) * 3).to(device=device, dtype=dtype)
    with torch.no_grad():
        fly = ops.pecm_scores(q, c, w, q_mask=qm, c_mask=cm, c_pooled=cp, backend="triton")
    leaf = c.detach().clone().requires_grad_(True)
    grad = ops.pecm_scores(q, leaf, w, q_mask=qm, c_mask=cm, c_pooled=cp, backend="triton")
    atol = 1e-5 if dtype == torch.float32 else 2e-2
    for a, b in zip(fly, grad):
        torch.testing.assert_close(a, b.detach(), atol=atol, rtol=0)
    grad[2].sum().backward()
    assert leaf.grad is not None and torch.isfinite(leaf.grad.float()).all()
