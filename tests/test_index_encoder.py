"""The C++ index item encoder (`pecm._C.encode_items`, used by float16 `ArchiveIndex.add`) against the
float64 math, the torch encoder it replaces, and numpy's float16 rounding, on every SIMD path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

_C = pytest.importorskip("pecm._C", reason="pecm._C is not built")

from pecm import reference  # noqa: E402
from pecm.index import ArchiveIndex  # noqa: E402
from pecm.index import format as fmt  # noqa: E402


def _encoder(monkeypatch, which, k, d, w, block):
    monkeypatch.setenv("PECM_INDEX_ENCODER", which)
    enc = fmt.BlockEncoder(k, d, w, "float16", block)
    assert (enc.native is not None) == (which == "cpp")
    return enc


def _case(n, k, d, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, k, d)).astype(np.float32) * rng.uniform(0.01, 50.0, (n, k, 1)).astype(np.float32)
    x[0, k - 1] = 0  # zero prototype: stays exactly zero
    m = rng.random((n, k)) > 0.3
    m[:, 0] = True
    m[2] = False  # fully masked item
    w = rng.uniform(0.2, 1.8, k).astype(np.float32)
    return x, m, w


@pytest.mark.parametrize("k,d", [(5, 12), (26, 256), (3, 17), (1, 1)])
@pytest.mark.parametrize("in_dtype", ["float32", "float16", "float64", "strided"])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("given_pooled", [False, True])
def test_native_encoder_matches_float64_and_torch(monkeypatch, simd, k, d, in_dtype, masked, given_pooled):
    n = 9
    x, m, w = _case(n, k, d, seed=k * d)
    if in_dtype == "strided":
        xin = np.concatenate([x, x], axis=2)[:, :, ::2]
        assert not xin.flags.c_contiguous
    else:
        xin = x.astype(in_dtype)
    x64 = np.asarray(xin, dtype=np.float64)
    mask = m if masked else None
    pooled = np.random.default_rng(1).standard_normal((n, d)).astype(np.float32) if given_pooled else None
    got = _encoder(monkeypatch, "cpp", k, d, w, n).encode(xin, mask, pooled)
    ref = _encoder(monkeypatch, "torch", k, d, w, n).encode(xin, mask, pooled)
    assert got["prototypes"].dtype == np.float16 and got["pooled"].dtype == np.float16
    np.testing.assert_array_equal(got["masks"], ref["masks"])
    # float64 truth: unit prototypes (zero where masked), pooled Eq. 4 (or the given vector, normalised)
    mm = np.ones((n, k), bool) if mask is None else mask
    unit64 = x64 / np.maximum(np.linalg.norm(x64, axis=-1, keepdims=True), fmt.EPS) * mm[..., None]
    p = got["prototypes"].astype(np.float64)
    np.testing.assert_allclose(p, unit64, rtol=1e-3, atol=1e-7)  # fp16 rounding: half an ulp <= 4.9e-4 relative
    np.testing.assert_allclose(p, ref["prototypes"].astype(np.float64), rtol=1e-3, atol=1e-7)
    assert np.all(p[~mm] == 0) and np.all(p[0, k - 1] == 0)
    for i in range(n):
        want = (pooled[i] / np.linalg.norm(pooled[i])) if given_pooled else reference.pooled(x64[i], w, mm[i])
        np.testing.assert_allclose(got["pooled"][i].astype(np.float64), want, rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(got["pooled"].astype(np.float64), ref["pooled"].astype(np.float64), atol=2e-3)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_native_encoder_refuses_non_finite_like_torch(monkeypatch, simd, bad):
    x, _, w = _case(4, 3, 20)
    x[3, 2, 7] = bad
    for which in ("cpp", "torch"):
        with pytest.raises(ValueError, match="NaN or inf"):
            _encoder(monkeypatch, which, 3, 20, w, 4).encode(x, None, None)


def test_encoders_normalise_every_finite_magnitude(monkeypatch, simd):
    """Finite values whose float32 sum of squares over- or underflows (1e20, 3e38, 1e-30, subnormals) are
    normalised exactly, not refused or divided by an eps (both encoders; issue 15 item 7)."""
    x, _, w = _case(4, 3, 20)
    x = x.astype(np.float32)
    for i, mag in enumerate((1e20, 3e38, 1e-30, 1e-42)):
        x[i, 1] = np.linspace(-1, 1, 20, dtype=np.float64) * mag
    x[0, 2] = 0.0  # an exactly zero prototype stays zero
    x64 = x.astype(np.float64)
    n64 = np.linalg.norm(x64, axis=-1, keepdims=True)
    unit64 = np.divide(x64, n64, out=np.zeros_like(x64), where=n64 > 0)
    for which in ("cpp", "torch"):
        got = _encoder(monkeypatch, which, 3, 20, w, 4).encode(x, None, None)
        np.testing.assert_allclose(got["prototypes"].astype(np.float64), unit64, rtol=1e-3, atol=1e-3)
        for i in range(4):
            want = reference.pooled(x64[i], w)
            np.testing.assert_allclose(got["pooled"][i].astype(np.float64), want, atol=2e-3)


def test_to_half_rounds_like_numpy(simd):
    rng = np.random.default_rng(0)
    special = np.array(
        [
            0.0,
            -0.0,
            np.inf,
            -np.inf,
            np.nan,
            65504,
            65519.99,
            65520,
            1e6,
            2.0**-25,
            2.0**-24,
            1.5 * 2.0**-24,
            2.5 * 2.0**-24,
            2.0**-14,
            2.0**-14 * (1 - 2.0**-11),
            1 / 3,
            -0.999,
            1.0,
        ],
        dtype=np.float32,
    )
    x = np.concatenate(
        [
            special,
            rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32).view(np.float32),
            (rng.standard_normal(50_000) * 1e-5).astype(np.float32),
            rng.standard_normal(50_001).astype(np.float32),
        ]
    )
    got = _C._to_half(x).view(np.float16)
    with np.errstate(over="ignore"):
        want = x.astype(np.float16)
    nan = np.isnan(want)
    np.testing.assert_array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(got[~nan].view(np.uint16), want[~nan].view(np.uint16))


def test_index_add_native_equals_torch_encoder(monkeypatch, tmp_path):
    x, m, w = _case(50, 5, 12)
    arrays = {}
    for which in ("cpp", "torch"):
        monkeypatch.setenv("PECM_INDEX_ENCODER", which)
        idx = ArchiveIndex.create(tmp_path / which, 5, 12, weights=w)  # float16 by default
        idx.add(x[:20], m[:20])
        idx.add(torch.from_numpy(x[20:]).half(), m[20:])  # a float16 tensor goes in without a float32 copy
        arrays[which] = {name: np.asarray(idx.array(name)).astype(np.float64) for name in ("prototypes", "pooled")}
        idx.close()
        assert ArchiveIndex.open(tmp_path / which, verify=True).stats()["count"] == 50
    for name in ("prototypes", "pooled"):
        np.testing.assert_allclose(arrays["cpp"][name], arrays["torch"][name], rtol=2e-3, atol=2e-3)


def test_encoder_env_and_argument_checks(monkeypatch):
    monkeypatch.setenv("PECM_INDEX_ENCODER", "gpu")
    with pytest.raises(ValueError, match="PECM_INDEX_ENCODER"):
        fmt.BlockEncoder(3, 8, np.ones(3), "float16", 4)
    monkeypatch.setenv("PECM_INDEX_ENCODER", "cpp")
    assert fmt.BlockEncoder(3, 8, np.ones(3), "float32", 4).native is None  # float32/int8 keep the torch path
    x = np.ones((2, 3, 8), np.float32)
    unit = np.empty((2, 3, 8), np.float16)
    w = np.ones(3, np.float32)
    cases = [
        (dict(x=x.astype(np.int32)), "x: dtype"),
        (dict(x=x[0]), "x: expected shape"),
        (dict(w=np.ones(4, np.float32)), "w: expected"),
        (dict(unit=np.empty((2, 3, 8), np.float32)), "unit: expected"),
        (dict(unit=np.empty((2, 3, 7), np.float16)), "unit: expected"),
        (dict(mask=np.ones((2, 4), bool)), "mask: expected shape"),
        (dict(mask=np.ones((2, 3), np.float32)), "mask: expected a C-contiguous bool"),
        (dict(pooled=np.empty((2, 8), np.float64)), "pooled: expected float32"),
        (dict(pooled=np.empty((2, 9), np.float32)), "pooled: expected shape"),
    ]
    for kw, match in cases:
        args = dict(x=x, w=w, mask=None, unit=unit, pooled=None, eps=1e-12)
        args.update(kw)
        with pytest.raises(ValueError, match=match):
            _C.encode_items(**args)


def test_given_pooled_with_nan_is_refused_by_both_encoders(monkeypatch):
    x, _, w = _case(3, 4, 10)
    pooled = np.ones((3, 10), np.float32)
    pooled[1, 4] = np.nan
    for which in ("cpp", "torch"):
        with pytest.raises(ValueError, match="pooled: contains NaN"):
            _encoder(monkeypatch, which, 4, 10, w, 3).encode(x, None, pooled)
