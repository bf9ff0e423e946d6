"""The vectorised reference equals its per-pair definition, and hand-computable cases."""

from __future__ import annotations

import numpy as np

from pecm import reference


def test_vectorised_equals_pair_definition():
    rng = np.random.default_rng(0)
    q, c, w = rng.normal(size=(3, 4, 5)), rng.normal(size=(6, 4, 5)), rng.random(4)
    c[1, 2] = 0.0
    qm, cm = rng.random((3, 4)) > 0.4, rng.random((6, 4)) > 0.4
    cm[0] = False
    got = reference.scores(q, c, w, qm, cm)
    for i in range(3):
        for j in range(6):
            exp = reference.pair_score(q[i], c[j], w, qm[i], cm[j])
            np.testing.assert_allclose([g[i, j] for g in got], exp, atol=1e-12)


def test_hand_computed_pair():
    # K=2, D=2: prototype 0 identical (cos 1), prototype 1 orthogonal (cos 0); w = (3, 1).
    q = np.array([[1.0, 0.0], [0.0, 2.0]])
    c = np.array([[5.0, 0.0], [1.0, 0.0]])
    w = np.array([3.0, 1.0])
    sim, conf, score = reference.pair_score(q, c, w)
    assert np.isclose(conf, 3.0 / 4.0)
    # h_q = 3*(1,0) + (0,1) -> (3,1)/sqrt(10); h_c = 3*(1,0) + (1,0) -> (1,0)
    assert np.isclose(sim, 3.0 / np.sqrt(10.0))
    assert np.isclose(score, sim * conf)
    # masking prototype 0 of the candidate leaves only the orthogonal one: C = 0
    _, conf_m, _ = reference.pair_score(q, c, w, c_mask=np.array([False, True]))
    assert conf_m == 0.0
    # fully masked pair: C defined as 0
    _, conf_0, score_0 = reference.pair_score(q, c, w, q_mask=np.array([False, False]))
    assert conf_0 == 0.0 and score_0 == 0.0


def test_topk_and_rerank_sentinels():
    v, i = reference.topk(np.array([[0.1, 0.5, 0.3]]), 5)
    assert list(i[0]) == [1, 2, 0, -1, -1] and np.all(np.isneginf(v[0, 3:]))
    v, i = reference.rerank(np.array([[0.1, 0.5, 0.3]]), np.array([[2, -1, 0]]), 3)
    assert list(i[0]) == [2, 0, -1]
