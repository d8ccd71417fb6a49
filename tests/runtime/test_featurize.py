import math

import numpy as np
import pytest

from tests.factories import AS_OF, make_request
from uwrt.runtime.bundle.schema import EncoderConfig, FeatureSchema, FeatureSpec, RequestLimits
from uwrt.runtime.errors import InvalidRequest
from uwrt.runtime.featurize import Limits, featurize, featurize_reference, hash_mcc
from uwrt.runtime.pb import pb

# the factory's requests carry no applicant features unless asked: this schema imputes any number
# (the default limit, half of them, is tested in test_request_limits.py)
SCHEMA = FeatureSchema.build("t1", [FeatureSpec("bureau_score", "applicant", 650.0, "BUREAU", 300, 850),
                                    FeatureSpec("dti", "applicant", 0.3, "DEBT")], 32,
                             limits=RequestLimits(max_imputed_share=1.0))
ENC = EncoderConfig(max_history=16)


def one(req, limits=Limits()):
    fb, errors = featurize([req], SCHEMA, ENC, limits)
    return fb, errors


def error_of(req, **kw):
    fb, errors = one(req, **kw)
    assert fb.batch_size == 0 and 0 in errors
    return errors[0]


def test_numeric_features_by_hand(rng):
    r = make_request(0, rng, features={"bureau_score": 700.0})
    t = [AS_OF - 86400, AS_OF - 3 * 86400, AS_OF - 10 * 86400]
    r.history.timestamp_unix_s.extend(t)
    r.history.type.extend([pb.PAID_LATE, pb.INSTALLMENT_DUE, pb.ORIGINATION])
    r.history.amount_minor.extend([2500, 2500, 10000])
    r.history.mcc.extend([5411, 5411, 0])
    r.history.days_past_due.extend([12, 0, 0])
    r.history.installment_index.extend([1, 1, 0])
    fb, errors = one(r)
    assert not errors
    x = fb.events.numeric
    np.testing.assert_allclose(x[:, 0], [-math.log1p(25), math.log1p(25), math.log1p(100)], rtol=1e-6)
    np.testing.assert_allclose(x[:, 1], [math.log1p(2), math.log1p(7), 0.0], rtol=1e-6)
    np.testing.assert_allclose(x[:, 2], [math.log1p(1), math.log1p(3), math.log1p(10)], rtol=1e-6)
    np.testing.assert_allclose(x[:, 3], [12 / 90, 0, 0], rtol=1e-6)
    np.testing.assert_allclose(x[:, 4], [0.25, 0.25, 0], rtol=1e-6)
    assert list(fb.events.type_ids) == [pb.PAID_LATE, pb.INSTALLMENT_DUE, pb.ORIGINATION]
    assert fb.events.mcc_ids[2] == 0 and fb.events.mcc_ids[0] > 0
    assert fb.tabular[0, 0] == 700.0 and fb.tabular[0, 1] == pytest.approx(0.3)
    assert [(w.code, w.detail) for w in fb.warnings[0]] == [(pb.FEATURE_IMPUTED, "dti")]


def test_empty_history_is_one_no_history_token(rng):
    fb, errors = one(make_request(0, rng))
    assert not errors
    assert list(fb.events.cu_seqlens) == [0, 1] and fb.events.type_ids[0] == 0
    assert not fb.events.numeric.any()
    assert pb.EMPTY_HISTORY in [w.code for w in fb.warnings[0]]


def test_one_event(rng):
    fb, errors = one(make_request(1, rng))
    assert not errors and list(fb.events.cu_seqlens) == [0, 1] and fb.events.numeric[0, 1] == 0.0


def test_longer_than_max_history_truncates_newest_first(rng):
    r = make_request(ENC.max_history + 5, rng)
    fb, errors = one(r)
    assert not errors and fb.events.n_tokens == ENC.max_history
    assert list(fb.events.type_ids) == list(r.history.type)[:ENC.max_history]
    w = [w for w in fb.warnings[0] if w.code == pb.HISTORY_TRUNCATED]
    assert w and f"{ENC.max_history} of {ENC.max_history + 5}" in w[0].detail
    # the gap of the last kept event is measured to the (dropped) event before it, not 0
    ts = list(r.history.timestamp_unix_s)
    k = ENC.max_history - 1
    assert fb.events.numeric[k, 1] == pytest.approx(math.log1p((ts[k] - ts[k + 1]) / 86400), rel=1e-6)


def test_request_limit(rng):
    e = error_of(make_request(40, rng), limits=Limits(max_request_events=32))
    assert e.field == "history" and "request limit of 32" in str(e)


@pytest.mark.parametrize("value", [99, 0, -3])
def test_unknown_event_type(rng, value):
    r = make_request(6, rng)
    r.history.type[4] = value
    assert error_of(r).field == "history.type[4]"


@pytest.mark.parametrize("column,value,field", [
    ("amount_minor", -1, "history.amount_minor[2]"),
    ("days_past_due", -5, "history.days_past_due[2]"),
    ("mcc", 12345, "history.mcc[2]"),
    ("installment_index", -1, "history.installment_index[2]"),
])
def test_bad_event_values(rng, column, value, field):
    r = make_request(5, rng)
    getattr(r.history, column)[2] = value
    assert error_of(r).field == field


def test_event_after_as_of(rng):
    r = make_request(3, rng)
    r.history.timestamp_unix_s[0] = AS_OF + 60
    e = error_of(r)
    assert e.field == "history.timestamp_unix_s[0]" and "after as_of" in str(e)


def test_events_not_newest_first(rng):
    r = make_request(4, rng)
    r.history.timestamp_unix_s[3] = r.history.timestamp_unix_s[0]
    assert "newest first" in str(error_of(r))


def test_column_lengths_differ(rng):
    r = make_request(4, rng)
    r.history.mcc.append(5411)
    assert error_of(r).field == "history"


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_feature(rng, value):
    e = error_of(make_request(2, rng, features={"dti": value}))
    assert e.field == 'features["dti"]' and "finite" in str(e)


def test_out_of_range_and_unknown_feature(rng):
    assert error_of(make_request(2, rng, features={"bureau_score": 9000.0})).field == 'features["bureau_score"]'
    assert error_of(make_request(2, rng, features={"shoe_size": 9.0})).field == 'features["shoe_size"]'


@pytest.mark.parametrize("mutate,field", [
    (lambda r: r.ClearField("request_id"), "request_id"),
    (lambda r: r.ClearField("as_of"), "as_of"),
    (lambda r: r.ClearField("purchase"), "purchase"),
    (lambda r: setattr(r.purchase, "amount_minor", -100), "purchase.amount_minor"),
    (lambda r: setattr(r.purchase, "amount_minor", 0), "purchase.amount_minor"),
    (lambda r: setattr(r.purchase, "currency", "dollars"), "purchase.currency"),
    (lambda r: setattr(r.purchase, "product", 0), "purchase.product"),
    (lambda r: setattr(r.purchase, "product", 77), "purchase.product"),
    (lambda r: setattr(r.purchase, "installments", 0), "purchase.installments"),
])
def test_envelope_errors(rng, mutate, field):
    r = make_request(3, rng)
    mutate(r)
    e = error_of(r)
    assert isinstance(e, InvalidRequest) and e.field == field


def test_bad_request_does_not_touch_neighbours(rng):
    good = [make_request(int(n), rng, request_id=f"g{i}") for i, n in enumerate(rng.integers(1, 40, 5))]
    bad = make_request(3, rng, request_id="bad")
    bad.history.amount_minor[0] = -1
    mixed = good[:2] + [bad] + good[2:]
    fb, errors = featurize(mixed, SCHEMA, ENC)
    assert list(errors) == [2] and fb.index == [0, 1, 3, 4, 5]
    alone, _ = featurize(good, SCHEMA, ENC)
    np.testing.assert_array_equal(fb.events.numeric, alone.events.numeric)
    np.testing.assert_array_equal(fb.events.cu_seqlens, alone.events.cu_seqlens)
    np.testing.assert_array_equal(fb.tabular, alone.tabular)


def test_select_and_concat_round_trip(rng):
    reqs = [make_request(int(n), rng, request_id=f"r{i}") for i, n in enumerate(rng.integers(0, 30, 7))]
    fb, _ = featurize(reqs, SCHEMA, ENC)
    parts = [fb.events.select([i]) for i in range(7)]
    back = type(fb.events).concat(parts)
    np.testing.assert_array_equal(back.numeric, fb.events.numeric)
    np.testing.assert_array_equal(back.cu_seqlens, fb.events.cu_seqlens)
    sub = fb.events.select([5, 1])
    np.testing.assert_array_equal(sub.type_ids, np.concatenate([parts[5].type_ids, parts[1].type_ids]))


def test_hash_mcc_range():
    m = np.arange(0, 10000)
    h = hash_mcc(m, 128)
    assert h[0] == 0 and h[1:].min() >= 1 and h.max() < 128 and len(np.unique(h[1:])) == 127


def test_batch_featurization_equals_one_by_one(rng):
    """The vectorised batch path == featurizing each request alone, with bad, empty and long requests mixed in."""
    reqs = []
    for i in range(40):
        n = int(rng.choice([0, 1, 2, 15, 16, 17, 40]))
        r = make_request(n, rng, request_id=f"m{i}", features={"dti": float(rng.random())})
        kind = rng.integers(0, 8)
        if n and kind == 0:
            r.history.type[int(rng.integers(n))] = 99
        elif n and kind == 1:
            r.history.mcc[int(rng.integers(n))] = -2
        elif n > 1 and kind == 2:
            r.history.timestamp_unix_s[n - 1] = r.history.timestamp_unix_s[0] + 1
        reqs.append(r)
    fb, errors = featurize(reqs, SCHEMA, ENC)
    parts, n_ok = [], 0
    for i, r in enumerate(reqs):
        one_fb, one_err = featurize([r], SCHEMA, ENC)
        if one_err:
            assert str(errors[i]) == str(one_err[0])
            continue
        assert fb.index[n_ok] == i
        np.testing.assert_array_equal(fb.tabular[n_ok], one_fb.tabular[0])
        assert [(w.code, w.detail) for w in fb.warnings[n_ok]] == [(w.code, w.detail) for w in one_fb.warnings[0]]
        parts.append(one_fb.events)
        n_ok += 1
    assert n_ok == fb.batch_size and len(errors) == len(reqs) - n_ok
    joined = type(fb.events).concat(parts)
    for f in ("type_ids", "mcc_ids", "numeric", "cu_seqlens"):
        np.testing.assert_array_equal(getattr(fb.events, f), getattr(joined, f))


def _mixed_batch(rng, n_requests, max_history):
    """Random requests with every edge case: empty, one event, exactly / just over max_history,
    the request limit, bad events at random positions, bad envelopes, imputed features."""
    lens = [0, 1, 2, max_history - 1, max_history, max_history + 1, 3 * max_history, 64]
    reqs = []
    for i in range(n_requests):
        n = int(rng.choice(lens)) if rng.random() < 0.5 else int(rng.integers(0, 2 * max_history))
        feats = {} if rng.random() < 0.3 else {"dti": float(rng.random()),
                                                "bureau_score": float(rng.integers(300, 851))}
        r = make_request(n, rng, request_id=f"x{i}", features=feats)
        kind = int(rng.integers(0, 12))
        if n and kind == 0:
            r.history.type[int(rng.integers(n))] = int(rng.choice([0, 99, -4]))
        elif n and kind == 1:
            r.history.amount_minor[int(rng.integers(n))] = -int(rng.integers(1, 10))
        elif n > 1 and kind == 2:
            j = int(rng.integers(1, n))
            r.history.timestamp_unix_s[j] = r.history.timestamp_unix_s[j - 1] + 1
        elif n and kind == 3:
            r.history.timestamp_unix_s[int(rng.integers(n))] = r.as_of.seconds + 10
        elif kind == 4:
            r.purchase.amount_minor = 0
        elif n and kind == 5:
            r.history.mcc.append(1)                          # column lengths differ
        elif kind == 6:
            r.features["dti"] = float("nan")
        reqs.append(r)
    return reqs


@pytest.mark.parametrize("max_history", [1, 8, 16, 33])
def test_fast_path_equals_reference(rng, max_history):
    """`featurize` (the serving path) == `featurize_reference`, to the bit, on random mixed batches
    (every edge case; several batch sizes, including all-invalid and single requests)."""
    enc = EncoderConfig(max_history=max_history)
    limits = Limits(max_request_events=2 * max_history + 40)
    for size in (1, 2, 7, 40):
        for _ in range(3):
            reqs = _mixed_batch(rng, size, max_history)
            fb, errors = featurize(reqs, SCHEMA, enc, limits)
            rf, rerrors = featurize_reference(reqs, SCHEMA, enc, limits)
            assert sorted(errors) == sorted(rerrors)
            for i in errors:
                assert (errors[i].field, str(errors[i])) == (rerrors[i].field, str(rerrors[i]))
            assert fb.index == rf.index and fb.request_ids == rf.request_ids
            for f in ("type_ids", "mcc_ids", "numeric", "cu_seqlens"):
                a, b = getattr(fb.events, f), getattr(rf.events, f)
                assert a.dtype == b.dtype and a.shape == b.shape
                np.testing.assert_array_equal(a, b)
            assert fb.events.max_len == rf.events.max_len
            assert fb.tabular.dtype == rf.tabular.dtype
            np.testing.assert_array_equal(fb.tabular, rf.tabular)
            assert ([[(w.code, w.detail) for w in ws] for ws in fb.warnings]
                    == [[(w.code, w.detail) for w in ws] for ws in rf.warnings])


def test_fast_path_empty_and_all_invalid(rng):
    fb, errors = featurize([], SCHEMA, ENC)
    assert fb.batch_size == 0 and fb.events.batch_size == 0 and fb.tabular.shape == (0, 6) and not errors
    bad = make_request(3, rng)
    bad.history.type[1] = 99
    fb, errors = featurize([bad, bad], SCHEMA, ENC)
    assert fb.batch_size == 0 and fb.events.n_tokens == 0 and sorted(errors) == [0, 1]
    assert errors[0].field == "history.type[1]"
