"""Bad input raises ValueError/TypeError naming the argument; the registry and PECM_BACKEND behave."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import assert_topk_matches, make_inputs, ref_scores
from hypothesis import given, settings
from hypothesis import strategies as st

from pecm import ops
from pecm.backends import available_backends, get_backend

Q, C, W, QM, CM = make_inputs(2, 10, 4, 8, masks=True)


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: ops.pecm_scores(torch.randn(2, 3, 4, 8), C, W), ValueError, r"q: expected shape \[B, K, D\]"),
        (lambda: ops.pecm_scores(Q, torch.randn(10, 32), W), ValueError, r"c: expected shape \[N, K, D\]"),
        (lambda: ops.pecm_scores(torch.randn(2, 5, 8), C, W), ValueError, r"q: expected \[B, K=4, D=8\]"),
        (lambda: ops.pecm_scores(torch.randn(2, 4, 9), C, W), ValueError, r"D=8"),
        (lambda: ops.pecm_scores(Q, C, torch.ones(5)), ValueError, r"w: expected shape \[K=4\], got \[5\]"),
        (lambda: ops.pecm_scores(Q, C, -torch.ones(4)), ValueError, r"w: weights must be non-negative"),
        (lambda: ops.pecm_scores(Q, C, W, q_mask=torch.ones(2, 3, dtype=torch.bool)), ValueError, r"q_mask"),
        (lambda: ops.pecm_scores(Q, C, W, c_mask=torch.ones(9, 4, dtype=torch.bool)), ValueError, r"c_mask.*N=10"),
        (lambda: ops.pecm_scores(Q, C, W, c_mask=torch.ones(10, 4)), TypeError, r"c_mask: expected a bool mask"),
        (lambda: ops.pecm_scores(Q, C, W, c_pooled=torch.ones(10, 7)), ValueError, r"c_pooled.*D=8"),
        (lambda: ops.pecm_scores(Q.int(), C, W), TypeError, r"q: dtype torch.int32 is not supported"),
        (lambda: ops.pecm_scores("x", C, W), TypeError, r"q: expected a torch.Tensor"),
        (lambda: ops.pecm_topk(Q, C, W, 0), ValueError, r"k: expected an int >= 1, got 0"),
        (lambda: ops.pecm_topk(Q, C, W, 2.5), TypeError, r"k: expected an int"),
        (lambda: ops.pecm_topk(Q, C, W, True), TypeError, r"k: expected an int"),
        (lambda: ops.pecm_topk(Q, C, W, 3, by="rank"), ValueError, r"by: expected one of"),
        (lambda: ops.pecm_topk(Q, C, W, 3, chunk_size=0), ValueError, r"chunk_size"),
        (lambda: ops.pecm_topk(Q, C, W, 3, backend="cuda"), ValueError, r"backend: expected one of"),
        (lambda: ops.pecm_rerank(Q, C, torch.tensor([[0, 10]]).repeat(2, 1), W, 1), ValueError, r"candidates.*got 10"),
        (lambda: ops.pecm_rerank(Q, C, torch.tensor([[0, -2]]).repeat(2, 1), W, 1), ValueError, r"candidates.*got -2"),
        (lambda: ops.pecm_rerank(Q, C, torch.zeros(3, 2, dtype=torch.long), W, 1), ValueError, r"candidates.*B=2"),
        (lambda: ops.pecm_rerank(Q, C, torch.zeros(2, 2), W, 1), TypeError, r"candidates: expected an integer"),
    ],
)
def test_bad_input_messages(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize("name", ["q", "c", "w"])
def test_check_nan_inf(name):
    args = {"q": Q.clone(), "c": C.clone(), "w": W.clone()}
    args[name].view(-1)[0] = float("nan") if name != "w" else float("inf")
    with pytest.raises(ValueError, match=rf"{name}: contains NaN or inf"):
        ops.pecm_topk(args["q"], args["c"], args["w"], 2, check=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device for a mixed-device input")
def test_mixed_devices():
    with pytest.raises(ValueError, match="device"):
        ops.pecm_scores(Q.cuda(), C, W)


def test_float64_only_on_torch_backend():
    s = ops.pecm_scores(Q.double(), C.double(), W)  # auto -> torch in float64
    assert s[0].dtype == torch.float64
    if "cpp" in available_backends():
        with pytest.raises((TypeError, ValueError), match="float64|dtype"):
            ops.pecm_scores(Q.double(), C.double(), W, backend="cpp")


def test_backend_env_override(monkeypatch):
    monkeypatch.setenv("PECM_BACKEND", "torch")
    assert get_backend("auto", torch.device("cpu"), torch.float32).name == "torch"
    monkeypatch.setenv("PECM_BACKEND", "gpu-please")
    with pytest.raises(ValueError, match="PECM_BACKEND"):
        ops.pecm_topk(Q, C, W, 2)
    monkeypatch.delenv("PECM_BACKEND")
    expected = "cpp" if "cpp" in available_backends() else "torch"
    assert get_backend("auto", torch.device("cpu"), torch.float16).name == expected


def test_non_differentiable_backend_refuses_grad():
    if "cpp" not in available_backends():
        pytest.skip("cpp backend not built")
    q = Q.clone().requires_grad_()
    with pytest.raises(ValueError, match="not differentiable"):
        ops.pecm_scores(q, C, W, backend="cpp")


@settings(max_examples=40, deadline=None)
@given(
    b=st.integers(1, 4),
    n=st.integers(1, 40),
    k=st.integers(1, 6),
    d=st.integers(1, 12),
    topk=st.integers(1, 50),
    masks=st.booleans(),
    seed=st.integers(0, 2**16),
    scale=st.sampled_from([1e-3, 1.0, 1e3]),
)
def test_property_all_backends_match_reference(b, n, k, d, topk, masks, seed, scale):
    q, c, w, qm, cm = make_inputs(b, n, k, d, masks=masks, seed=seed)
    q, c = q * scale, c * scale
    sim, conf, score = ref_scores(q, c, w, qm, cm)
    cand = torch.from_numpy(np.random.default_rng(seed).integers(-1, n, size=(b, 7)))
    for be in [x for x in available_backends() if x != "triton"]:
        got = ops.pecm_scores(q, c, w, q_mask=qm, c_mask=cm, backend=be)
        for g, e in zip(got, (sim, conf, score)):
            np.testing.assert_allclose(g.double().numpy(), e, atol=1e-5, rtol=0)
        v, i = ops.pecm_topk(q, c, w, topk, q_mask=qm, c_mask=cm, backend=be, chunk_size=max(1, n // 3))
        assert_topk_matches(v, i, score, topk, 1e-5)
        v, i = ops.pecm_rerank(q, c, cand, w, topk, q_mask=qm, c_mask=cm, backend=be)
        for row in range(b):
            ok = i[row] >= 0
            np.testing.assert_allclose(score[row, i[row][ok].numpy()], v[row][ok].double().numpy(), atol=1e-5)
            assert int(ok.sum()) == min(topk, int((cand[row] >= 0).sum()))
