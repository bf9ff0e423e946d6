"""Metrics on toy matrices whose answers are worked out by hand in the comments."""

import numpy as np
import pytest
import torch

from pecm import metrics as M

# 3 queries x 3 candidates; match = diagonal.
# q0: ranking 0,1,2 -> match rank 0;  q1: 2,0,1 -> match (1) rank 2;  q2: 2,... -> rank 0
S = np.array([[0.9, 0.5, 0.1], [0.6, 0.2, 0.8], [0.3, 0.4, 0.7]])


def test_recall_hand_computed():
    assert M.recall_at_k(S, (1, 2, 3)) == {1: pytest.approx(200 / 3), 2: pytest.approx(200 / 3), 3: 100.0}
    # transposed (report -> image): col0 [.9,.6,.3] rank 0; col1 [.5,.2,.4] rank 2; col2 [.1,.8,.7] rank 1
    assert M.recall_at_k(S.T, (1, 2)) == {1: pytest.approx(100 / 3), 2: pytest.approx(200 / 3)}
    assert M.recall_at_k(torch.tensor(S), (1,))[1] == pytest.approx(200 / 3)


def test_ties_are_pessimistic():
    t = np.array([[1.0, 1.0], [0.0, 1.0]])  # q0 ties with candidate 1 -> rank 1; q1 rank 0
    np.testing.assert_array_equal(M.ranks_of_match(t), [1, 0])
    assert M.recall_at_k(t, (1,))[1] == 50.0
    assert M.topk_ids(t, 1)[0, 0] == 0  # top-k lists break ties by the lower index


def test_map_is_mrr_for_paired_and_hand_value():
    # ranks 0, 2, 0 -> reciprocal ranks 1, 1/3, 1
    assert M.mean_average_precision(S) == pytest.approx(100 * (1 + 1 / 3 + 1) / 3)
    rel = np.array([[True, False, True], [False, False, False], [False, True, True]])
    # q0 ranking 0,1,2: relevant at positions 1 and 3 -> (1/1 + 2/3) / 2; q1 no relevant (ignored)
    # q2 ranking 2,1,0: relevant at positions 1, 2 -> (1 + 1) / 2
    assert M.mean_average_precision(S, rel) == pytest.approx(100 * ((1 + 2 / 3) / 2 + 1) / 2)


def test_cui_at_k_hand_computed():
    cq = [["A"], ["B"], []]
    cc = [["A", "B"], ["C"], ["B"]]
    # q0 top1 = c0 (A) hit; top2 = c0, c1 -> 1/2.  q1 top1 = c2 (B) hit; top2 = c2, c0 -> 2/2.  q2 no CUIs: skipped
    assert M.cui_at_k(S, cq, cc, (1, 2)) == {1: 100.0, 2: pytest.approx(75.0)}
    assert M.cui_at_k(S, cq, cc, (2,), mode="hit") == {2: 100.0}


def test_cbir_micro_macro_hand_computed():
    s = np.array([[1.0, 0.9, 0.1, 0.5], [0.9, 1.0, 0.2, 0.1], [0.1, 0.2, 1.0, 0.8], [0.5, 0.1, 0.8, 1.0]])
    cuis = [["A"], ["A"], ["B"], ["A", "B"]]
    # self excluded, top1: q0 -> 1 (A) rel; q1 -> 0 rel; q2 -> 3 (B) rel; q3 -> 2 (B) rel: micro 100
    # top2: q0 -> 1, 3 both rel (1.0); q1 -> 0, 2: 1/2; q2 -> 3, 1: 1/2; q3 -> 2, 0: 1.0 -> micro 75
    # macro@2: class A = q0, q1, q3 -> (1 + .5 + 1)/3; class B = q2, q3 -> (.5 + 1)/2
    r = M.cbir_precision_at_k(s, cuis, (1, 2))
    assert r["micro"] == {1: 100.0, 2: pytest.approx(75.0)}
    assert r["macro"][2] == pytest.approx(100 * ((2.5 / 3) + 0.75) / 2)


def test_chance_and_bad_input():
    assert M.chance_levels(200) == {1: 0.5, 5: 2.5, 10: 5.0}
    with pytest.raises(ValueError, match="scores"):
        M.recall_at_k(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="ks"):
        M.recall_at_k(S, (0,))
    with pytest.raises(ValueError, match="mode"):
        M.cui_at_k(S, [[]] * 3, [[]] * 3, mode="x")


def test_retrieval_metrics_keys():
    out = M.retrieval_metrics(S, [["A"], ["B"], ["A"]])
    assert set(out) == {"image_to_report", "report_to_image", "mAP", "cui"}
    assert out["image_to_report"]["R@1"] == pytest.approx(200 / 3)


def test_cui_chance_hand_computed_and_matches_random_rankings():
    cuis = [["A"], ["A", "B"], ["C"], []]
    # cross-modal, candidates = all 4: q0 shares with {0,1} -> 2/4; q1 with {0,1} -> 2/4; q2 with {2} -> 1/4;
    # q3 has no CUI (ignored): mean (0.5 + 0.5 + 0.25) / 3
    assert M.cui_chance(cuis, cuis) == pytest.approx(100 * 1.25 / 3)
    # CBIR, self excluded: q0 -> {1} of 3; q1 -> {0} of 3; q2 -> none: mean (1/3 + 1/3 + 0) / 3
    assert M.cui_chance(cuis) == pytest.approx(100 * (2 / 3) / 3)
    assert np.isnan(M.cui_chance([[], []]))
    # the mean CUI@K over many random score matrices approaches the chance level
    rng = np.random.default_rng(0)
    vals = [M.cui_at_k(rng.random((4, 4)), cuis, cuis, ks=(2,))[2] for _ in range(4000)]
    assert np.mean(vals) == pytest.approx(M.cui_chance(cuis, cuis), abs=1.0)


def test_score_pos_removes_the_sign_quirk_of_r():
    """R = sim * C ranks a pair with sim < 0 and C < 0 above pairs with sim or C near 0; R+ = sim * max(C, 0)
    ranks it last-but-equal with every C <= 0 pair and equals R wherever C >= 0."""
    sim = np.array([[0.5, -0.4, 0.01, 0.3]])
    conf = np.array([[0.6, -0.5, 0.9, 0.0]])
    r = sim * conf
    assert M.topk_ids(r, 4)[0].tolist()[:2] == [0, 1]  # the both-negative pair (id 1) is second by R
    rp = M.score_pos(sim, conf)
    np.testing.assert_array_equal(rp, [[0.5 * 0.6, 0.0, 0.01 * 0.9, 0.0]])
    assert M.topk_ids(rp, 4)[0].tolist() == [0, 2, 1, 3]  # below the sim = 0.01, C = 0.9 pair; tied at 0 with id 3
    t = M.score_pos(torch.tensor(sim), torch.tensor(conf))
    np.testing.assert_array_equal(t.numpy(), rp)
