"""Signal check for the synthetic generator: how much of the label an oracle, a shuffled oracle,
order-free bag statistics and tabular features explain (xgboost, time split).

    python -m uwrt.demo.signal_check [--n 20000] [--seed S] [--label default|dpd30_90]

Not used by the runtime; the demo trainer uses `auc`.
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence

import numpy as np

from uwrt.demo.synth import (
    APPLICANT_FEATURE_NAMES,
    AUTOPAY_FAIL,
    MAX_EVENTS,
    MISSED,
    ORACLE_FEATURES,
    PAID_LATE,
    PAID_ON_TIME,
    generate,
    oracle_features,
    shuffle_event_order,
)
from uwrt.runtime.bundle.schema import PURCHASE_FEATURES
from uwrt.runtime.pb import pb


def tabular_matrix(requests: Sequence[pb.DecisionRequest]) -> tuple[np.ndarray, list[str]]:
    """[n, 17 + 4]: applicant features (NaN where absent) then uwrt.runtime.bundle.schema.PURCHASE_FEATURES."""
    names = list(APPLICANT_FEATURE_NAMES) + list(PURCHASE_FEATURES)
    X = np.full((len(requests), len(names)), np.nan)
    nan = math.nan
    for r, req in enumerate(requests):
        f = req.features
        p = req.purchase
        X[r] = [f.get(k, nan) for k in APPLICANT_FEATURE_NAMES] + [
            math.log1p(p.amount_minor / 100.0), p.installments, p.product, p.mcc // 1000]
    return X, names


def oracle_matrix(requests: Sequence[pb.DecisionRequest]) -> np.ndarray:
    """[n, len(ORACLE_FEATURES)] oracle variables computed from each request's history."""
    return np.array([oracle_features(r) for r in requests], dtype=np.float64).reshape(-1, len(ORACLE_FEATURES))


BAG_FEATURES: tuple[str, ...] = tuple(f"count_{pb.EventType.Name(t).lower()}" for t in range(1, 11)) + (
    "bad_fraction", "mean_dpd", "mean_log_amount", "n_distinct_mcc")


def bag_matrix(requests: Sequence[pb.DecisionRequest]) -> np.ndarray:
    """[n, len(BAG_FEATURES)] order-free statistics of each whole history (invariant under
    shuffle_event_order): what a sequence model could learn that is NOT order or recency."""
    out = np.zeros((len(requests), len(BAG_FEATURES)))
    for r, req in enumerate(requests):
        h = req.history
        n = len(h.type)
        c = np.bincount(np.asarray(h.type, dtype=np.int64), minlength=11)[1:11].astype(np.float64)
        n_res = c[PAID_ON_TIME - 1] + c[PAID_LATE - 1] + c[MISSED - 1] + c[AUTOPAY_FAIL - 1]
        n_bad = n_res - c[PAID_ON_TIME - 1]
        out[r, :10] = c
        if n:
            out[r, 10:] = (n_bad / n_res if n_res else 0.0, sum(h.days_past_due) / n,
                           float(np.log1p(np.asarray(h.amount_minor, dtype=np.float64) / 100.0).mean()),
                           len(set(h.mcc)))
    return out


def auc(y: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC (Mann-Whitney, ties averaged)."""
    y = np.asarray(y, dtype=bool)
    s = np.asarray(score, dtype=np.float64)
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s))
    ss = s[order]
    n = len(s)
    # average ranks over ties
    starts = np.r_[0, np.flatnonzero(np.diff(ss)) + 1]
    ends = np.r_[starts[1:], n]
    avg = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(avg, ends - starts)
    n_pos = int(y.sum())
    n_neg = n - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def signal_report(n: int = 20000, seed: int = 0, *, trees: int = 200, depth: int = 4,
                  eta: float = 0.1, nthread: int = 2, label: str = "default") -> dict:
    """Test AUCs (time split: earliest 70% by as_of train) of xgboost on (a) tabular features,
    (b) tabular + ORACLE_FEATURES, (c) tabular + ORACLE_FEATURES of shuffle_event_order histories,
    and (d) tabular + BAG_FEATURES (order-free history statistics: the most a sequence model could
    gain from a shuffled history; expect it near 0 - AUC noise here is about +-0.005)."""
    import xgboost as xgb

    t0 = time.perf_counter()
    s = generate(n, seed)
    gen_s = time.perf_counter() - t0
    y = getattr(s, label)
    Xa, _ = tabular_matrix(s.requests)
    orc = oracle_matrix(s.requests)
    rng = np.random.Generator(np.random.PCG64(seed + 1_000_003))
    orc_shuf = oracle_matrix([shuffle_event_order(r, rng) for r in s.requests])
    order = np.argsort(s.as_of_unix_s, kind="stable")
    cut = int(0.7 * n)
    tr, te = order[:cut], order[cut:]

    def fit_auc(X: np.ndarray) -> float:
        params = {"objective": "binary:logistic", "max_depth": depth, "eta": eta, "nthread": nthread,
                  "eval_metric": "auc", "seed": 0, "tree_method": "hist"}
        bst = xgb.train(params, xgb.DMatrix(X[tr], label=y[tr]), num_boost_round=trees)
        return auc(y[te], bst.predict(xgb.DMatrix(X[te])))

    auc_a = fit_auc(Xa)
    auc_b = fit_auc(np.hstack([Xa, orc]))
    auc_c = fit_auc(np.hstack([Xa, orc_shuf]))
    auc_d = fit_auc(np.hstack([Xa, bag_matrix(s.requests)]))
    lengths = np.array([len(r.history.timestamp_unix_s) for r in s.requests])
    return {
        "n": n, "seed": seed, "label": label, "generate_s": round(gen_s, 3),
        "auc_tabular": round(auc_a, 4), "auc_tabular_oracle": round(auc_b, 4),
        "auc_tabular_oracle_shuffled": round(auc_c, 4), "auc_tabular_bag": round(auc_d, 4),
        "gain_oracle": round(auc_b - auc_a, 4), "gain_shuffled": round(auc_c - auc_a, 4),
        "gain_bag": round(auc_d - auc_a, 4),
        "default_rate": round(float(s.default.mean()), 4), "dpd30_90_rate": round(float(s.dpd30_90.mean()), 4),
        "default_rate_train": round(float(s.default[tr].mean()), 4),
        "default_rate_test": round(float(s.default[te].mean()), 4),
        "label_corr": round(float(np.corrcoef(s.default, s.dpd30_90)[0, 1]), 4),
        "length_percentiles": {p: int(np.percentile(lengths, p)) for p in (10, 25, 50, 75, 90, 99)},
        "length_max": int(lengths.max()), "length_mean": round(float(lengths.mean()), 1),
        "n_at_cap": int((lengths == MAX_EVENTS).sum()),
    }


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="uwrt synthetic applicant generator: signal report")
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--label", default="default", choices=["default", "dpd30_90"])
    a = ap.parse_args()
    print(json.dumps(signal_report(a.n, a.seed, label=a.label), indent=2))
