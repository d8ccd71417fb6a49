import math

import numpy as np
import pytest
import xgboost as xgb

from uwrt.runtime.bundle.schema import Policy
from uwrt.runtime.pb import pb
from uwrt.runtime.policy import counteroffer_amount, group_contributions, outcome_for, score_for, top_reasons
from uwrt.runtime.trees.base import TreeExplainer, XGBoostTreeStage, load_booster


@pytest.fixture
def booster(rng):
    X = rng.normal(size=(2000, 12)).astype(np.float32)
    X[rng.random(X.shape) < 0.1] = np.nan
    y = (np.nan_to_num(X[:, 0]) + 0.5 * np.nan_to_num(X[:, 3]) * np.nan_to_num(X[:, 5]) + rng.normal(size=2000)) > 0.8
    b = xgb.train({"objective": "binary:logistic", "max_depth": 4, "eta": 0.2, "nthread": 1,
                   "seed": int(rng.integers(1 << 30)), "base_score": 0.3}, xgb.DMatrix(X, label=y, missing=np.nan), 40)
    return load_booster(bytearray(b.save_raw("ubj")))


def hard_rows(rng, n, f):
    X = rng.normal(scale=3, size=(n, f)).astype(np.float32)
    X[rng.random(X.shape) < 0.2] = np.nan
    X[0] = np.nan                                # all missing
    X[1] = 1e30                                  # huge
    X[2] = -1e30
    X[3] = np.float32(3.4e38)                    # near float32 max (the featurizer never emits inf)
    return X


def test_tree_stage_matches_xgboost_dmatrix(rng, booster):
    X = hard_rows(rng, 300, 12)
    before = X.copy()
    got = XGBoostTreeStage(booster).predict_margin(X)
    want = booster.predict(xgb.DMatrix(X, missing=np.nan), output_margin=True)
    np.testing.assert_allclose(got, want, atol=1e-6)
    np.testing.assert_array_equal(np.isnan(X), np.isnan(before))   # input not mutated
    np.testing.assert_array_equal(np.nan_to_num(X), np.nan_to_num(before))


def test_tree_stage_batch_invariant(rng, booster):
    X = hard_rows(rng, 64, 12)
    stage = XGBoostTreeStage(booster)
    full = stage.predict_margin(X)
    alone = np.array([stage.predict_margin(X[i:i + 1])[0] for i in range(64)])
    np.testing.assert_array_equal(full, alone)


def test_tree_stage_rejects_wrong_width(booster):
    with pytest.raises(ValueError, match="12"):
        XGBoostTreeStage(booster).predict_margin(np.ones((2, 11), np.float32))


def test_contributions_sum_to_margin(rng, booster):
    X = hard_rows(rng, 50, 12)
    c = TreeExplainer(booster).contributions(X)
    assert c.shape == (50, 13)
    np.testing.assert_allclose(c.sum(1), XGBoostTreeStage(booster).predict_margin(X), atol=1e-4)


def test_grouped_reasons_sum_and_order(rng, booster):
    X = hard_rows(rng, 20, 12)
    c = TreeExplainer(booster).contributions(X)
    codes = ["A", "A", "B", "C", "C", "C", "D", "E", "E", "F", "G", "H"]
    pol = Policy(reason_texts={"A": "text a"})
    for row in c:
        grouped = group_contributions(row[:-1], codes)
        assert sum(grouped.values()) + row[-1] == pytest.approx(row.sum(), abs=1e-9)
        reasons = top_reasons(row[:-1], codes, pol)
        assert len(reasons) <= 4
        vals = [r.contribution for r in reasons]
        assert vals == sorted(vals, reverse=True) and all(v > 0 for v in vals)
        positives = sorted((v for v in grouped.values() if v > 0), reverse=True)[:4]
        assert vals == pytest.approx(positives)
        for r in reasons:
            assert r.text == ("text a" if r.code == "A" else r.code)


def test_outcome_thresholds():
    p = Policy(approve_max_pd=0.05, counteroffer_max_pd=0.1, review_max_pd=0.2)
    assert [outcome_for(x, p) for x in (0.01, 0.05, 0.07, 0.1, 0.15, 0.2, 0.5)] == [
        pb.APPROVE, pb.APPROVE, pb.COUNTEROFFER, pb.COUNTEROFFER, pb.REVIEW, pb.REVIEW, pb.DECLINE]


def test_score_scaling():
    p = Policy(score_offset=600, score_pdo=50)
    assert score_for(0.5, p) == pytest.approx(600)
    assert score_for(1 / 3, p) == pytest.approx(650)      # odds doubled -> +pdo
    assert score_for(0.01, p) > score_for(0.02, p)
    assert math.isfinite(score_for(0.0, p)) and math.isfinite(score_for(1.0, p))
    assert counteroffer_amount(12345, Policy(counteroffer_amount_ratio=0.5)) == 6172


@pytest.mark.parametrize("kw", [dict(approve_max_pd=0.3, counteroffer_max_pd=0.2), dict(counteroffer_amount_ratio=1.5),
                                dict(max_reasons=5), dict(review_max_pd=1.0)])
def test_policy_validation(kw):
    with pytest.raises(ValueError):
        Policy(**kw)
