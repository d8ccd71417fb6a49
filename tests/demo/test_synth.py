"""Synthetic applicant generator (uwrt.demo.synth): determinism, validity, shape, labels, controls, I/O."""
from __future__ import annotations

import io
import math
from collections import Counter

import numpy as np
import pytest

from uwrt.demo import signal_check, synth
from uwrt.runtime.bundle.schema import EVENT_TYPE_IDS, FeatureSchema
from uwrt.runtime.pb import pb

N = 5000
SEED = 11


@pytest.fixture(scope="module")
def big() -> synth.SyntheticSet:
    return synth.generate(N, SEED)


def _ser(reqs):
    return [r.SerializeToString(deterministic=True) for r in reqs]


def _rows(req):
    h = req.history
    return list(zip(h.type, h.amount_minor, h.mcc, h.days_past_due, h.installment_index, strict=True))


def test_deterministic_and_prefix_stable():
    a = synth.generate(300, 3)
    b = synth.generate(300, 3)
    assert _ser(a.requests) == _ser(b.requests)
    assert np.array_equal(a.default, b.default) and np.array_equal(a.dpd30_90, b.dpd30_90)
    assert np.array_equal(a.as_of_unix_s, b.as_of_unix_s)
    c = synth.generate(300, 4)
    assert sum(x != y for x, y in zip(_ser(a.requests), _ser(c.requests), strict=True)) == 300
    # a smaller n is a prefix: one request id never names two different bodies
    p = synth.generate(40, 3)
    assert _ser(p.requests) == _ser(a.requests[:40])
    assert np.array_equal(p.default, a.default[:40])


def test_dataset_types_and_ids(big):
    assert len(big.requests) == N
    assert big.default.dtype == bool and big.default.shape == (N,)
    assert big.dpd30_90.dtype == bool and big.dpd30_90.shape == (N,)
    assert big.as_of_unix_s.dtype == np.int64 and big.as_of_unix_s.shape == (N,)
    ids = [r.request_id for r in big.requests]
    assert ids[:2] == [f"app-{SEED}-0", f"app-{SEED}-1"]
    assert len(set(ids)) == N
    assert synth.generate(3, 5, id_prefix="x/").requests[2].request_id == "x/5-2"
    assert synth.generate(0, 1).requests == []


def test_every_request_valid(big):
    valid_types = set(EVENT_TYPE_IDS)
    specs = {f.name: f for f in synth.APPLICANT_FEATURES}
    for req, as_of in zip(big.requests, big.as_of_unix_s, strict=True):
        assert req.as_of.seconds == as_of
        assert synth.AS_OF_START <= as_of < synth.AS_OF_START + synth.AS_OF_SPAN_S
        h = req.history
        n = len(h.timestamp_unix_s)
        assert 1 <= n <= synth.MAX_EVENTS
        assert len(h.type) == len(h.amount_minor) == len(h.mcc) == len(h.days_past_due) == len(h.installment_index) == n
        ts = np.asarray(h.timestamp_unix_s)
        assert ts[0] <= as_of and np.all(np.diff(ts) <= 0)
        assert set(h.type) <= valid_types
        assert min(h.amount_minor) >= 0 and min(h.days_past_due) >= 0
        assert all(0 <= m <= 9999 for m in h.mcc)
        assert all(0 <= k <= 4 for k in h.installment_index)
        for t, d in zip(h.type, h.days_past_due, strict=True):
            if t == pb.PAID_LATE:
                assert d > 0
            elif t in (pb.PAID_ON_TIME, pb.ORIGINATION, pb.INSTALLMENT_DUE):
                assert d == 0
        p = req.purchase
        assert p.amount_minor > 0 and p.currency == "USD" and 0 <= p.mcc <= 9999
        assert (p.product, p.installments) in {(pb.PAY_IN_4, 4), (pb.MONTHLY, 3), (pb.MONTHLY, 6),
                                               (pb.MONTHLY, 12), (pb.PAY_IN_FULL_30, 1)}
        for k, v in req.features.items():
            s = specs[k]
            assert math.isfinite(v) and s.min_value <= v <= s.max_value, (k, v)


def test_aggregates_match_carried_history(big):
    for req in big.requests[:1000]:
        h = req.history
        agg = synth.history_aggregates(list(h.timestamp_unix_s), list(h.type), list(h.amount_minor),
                                       list(h.days_past_due), req.as_of.seconds)
        for k, v in agg.items():
            if k in req.features:
                assert req.features[k] == pytest.approx(v), k


def test_lengths_heavy_tailed(big):
    lens = np.array([len(r.history.timestamp_unix_s) for r in big.requests])
    assert 6 <= np.median(lens) <= 25
    assert lens.max() > 100 and (lens > 100).mean() < 0.1
    assert np.percentile(lens, 99) > 100
    assert (lens == synth.MAX_EVENTS).mean() < 0.01


def test_labels_base_rates_and_time_spread(big):
    assert 0.08 <= big.default.mean() <= 0.16
    assert 0.08 <= big.dpd30_90.mean() <= 0.18
    assert np.corrcoef(big.default, big.dpd30_90)[0, 1] > 0.2
    span = big.as_of_unix_s.max() - big.as_of_unix_s.min()
    assert span > 1.8 * 365 * synth.DAY
    # time split: the earliest 70% and the rest have similar base rates (stationary by default)
    order = np.argsort(big.as_of_unix_s)
    cut = int(0.7 * N)
    assert abs(big.default[order[:cut]].mean() - big.default[order[cut:]].mean()) < 0.04


def test_label_depends_on_event_order(big):
    """Deterioration (bad payments newer than good ones) defaults far more often than
    old-and-recovered delinquency."""
    orc = signal_check.oracle_matrix(big.requests)
    det = orc[:, synth.ORACLE_FEATURES.index("deterioration")]
    assert big.default[det > 0.5].mean() > 2.0 * big.default[det < -0.5].mean()
    assert (det > 0.5).sum() > 100 and (det < -0.5).sum() > 100


def test_missing_at_random(big):
    present = Counter(k for r in big.requests for k in r.features)
    assert set(present) == set(synth.APPLICANT_FEATURE_NAMES)
    rates = np.array([1 - present[k] / N for k in synth.APPLICANT_FEATURE_NAMES])
    assert np.all((rates > 0.02) & (rates < 0.07))


def test_schema_and_reason_texts():
    schema = FeatureSchema.build("synth-test", synth.APPLICANT_FEATURES, embedding_dim=4)
    assert len(synth.APPLICANT_FEATURES) >= 12
    for f in synth.APPLICANT_FEATURES:
        assert f.source == "applicant" and f.reason_code and f.min_value <= f.impute_value <= f.max_value
    assert set(schema.reason_codes) <= set(synth.REASON_TEXTS)
    assert {"REPAYMENT_HISTORY", "PURCHASE"} <= set(synth.REASON_TEXTS)
    assert all(t.strip() for t in synth.REASON_TEXTS.values())


def test_shuffle_control(big, rng):
    long_reqs = [r for r in big.requests if len(r.history.type) >= 20][:200]
    changed = 0
    for req in long_reqs:
        before = req.SerializeToString(deterministic=True)
        out = synth.shuffle_event_order(req, rng)
        assert req.SerializeToString(deterministic=True) == before  # input untouched
        assert list(out.history.timestamp_unix_s) == list(req.history.timestamp_unix_s)
        assert Counter(_rows(out)) == Counter(_rows(req))
        assert dict(out.features) == dict(req.features)
        assert out.purchase == req.purchase and out.request_id == req.request_id and out.as_of == req.as_of
        assert np.allclose(signal_check.bag_matrix([out]), signal_check.bag_matrix([req]), rtol=1e-12, atol=0)
        changed += _rows(out) != _rows(req)
    assert changed >= 0.9 * len(long_reqs)
    one = next(r for r in big.requests if len(r.history.type) == 1)
    assert synth.shuffle_event_order(one, rng) == one
    a = synth.shuffle_event_order(long_reqs[0], np.random.default_rng(1))
    b = synth.shuffle_event_order(long_reqs[0], np.random.default_rng(1))
    assert a == b


def test_jsonl_round_trip(big):
    reqs = big.requests[:300]
    buf = io.StringIO()
    synth.write_jsonl(reqs, buf)
    text = buf.getvalue()
    assert text.count("\n") == len(reqs) and "\n\n" not in text
    back = list(synth.read_jsonl(io.StringIO(text)))
    assert back == reqs
    buf2 = io.StringIO()
    synth.write_jsonl(back, buf2)
    assert buf2.getvalue() == text  # stable bytes (features map keys sorted)
    assert list(synth.read_jsonl(io.StringIO(text + "\n"))) == reqs  # trailing blank line is fine


@pytest.mark.parametrize("bad, why", [
    ("{not json", "line 3"),
    ('{"requestId": "x", "noSuchField": 1}', "noSuchField"),
    ('{"requestId": "x", "history": {"type": ["NOT_A_TYPE"]}}', "line 3"),
])
def test_read_jsonl_error_names_line(big, bad, why):
    buf = io.StringIO()
    synth.write_jsonl(big.requests[:2], buf)
    text = buf.getvalue() + bad + "\n"
    with pytest.raises(ValueError, match="line 3") as ei:
        list(synth.read_jsonl(io.StringIO(text)))
    assert why in str(ei.value)


def test_drift_worsens_later_population():
    s = synth.generate(3000, 2, id_prefix="drift-", drift=1.5)
    scores = np.array([r.features.get("bureau_score", np.nan) for r in s.requests])
    late = s.as_of_unix_s > np.median(s.as_of_unix_s)
    assert np.nanmean(scores[late]) < np.nanmean(scores[~late]) - 15
    assert s.default[late].mean() > s.default[~late].mean()


def test_signal_report_smoke():
    """Small-n run of the signal check (the real one is n=20000: python -m uwrt.demo.synth)."""
    r = signal_check.signal_report(3000, 5, trees=60)
    assert 0.6 < r["auc_tabular"] < 0.95
    assert r["gain_oracle"] > 0.02 and r["gain_oracle"] > r["gain_shuffled"] + 0.01
