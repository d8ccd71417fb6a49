"""The bundle's request limits (RequestLimits in the feature schema): every rule refuses nonsense
with INVALID_ARGUMENT naming the field, accepts the edges, and the demo generator, the test
factory and the server's warm-up requests stay valid."""
from __future__ import annotations

import json

import pytest

from tests.factories import AS_OF, make_request
from uwrt.runtime import featurize as fz
from uwrt.runtime.bundle.schema import EncoderConfig, FeatureSchema, FeatureSpec, RequestLimits
from uwrt.runtime.errors import InvalidRequest
from uwrt.runtime.featurize import featurize
from uwrt.runtime.pb import pb

ENC = EncoderConfig(max_history=16)
APPLICANT = [FeatureSpec(n, "applicant", 1.0, "R", 0.0, 100.0) for n in ("a", "b", "c", "d")]
LIMITS = RequestLimits(currencies=(("USD", 2), ("EUR", 2)), amount_min_major=1.0, amount_max_major=50_000.0,
                       installments=(("PAY_IN_4", 4, 4), ("MONTHLY", 3, 24), ("PAY_IN_FULL_30", 1, 1)),
                       as_of_max_future_s=600, required_features=("a",), max_imputed_share=0.5)
SCHEMA = FeatureSchema.build("lim-1", APPLICANT, 32, limits=LIMITS)
NOW = AS_OF + 1000
YEAR_9999 = 253_402_300_799


@pytest.fixture(autouse=True)
def clock(monkeypatch):
    monkeypatch.setattr(fz, "_now", lambda: float(NOW))


def req(rng, n_events=3, **kw):
    feats = kw.pop("features", {"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0})
    return make_request(n_events, rng, features=feats, **kw)


def check(r, schema=SCHEMA):
    fb, errors = featurize([r], schema, ENC)
    return errors.get(0), fb


def error_of(r, schema=SCHEMA) -> InvalidRequest:
    e, _ = check(r, schema)
    assert isinstance(e, InvalidRequest), "expected the request to be refused"
    return e


def test_valid_request_passes(rng):
    e, fb = check(req(rng))
    assert e is None and fb.batch_size == 1


# ----------------------------------------------------------------------------------- as_of

@pytest.mark.parametrize("as_of", [2**63 - 1, 2**62, YEAR_9999, NOW + 601, NOW * 1000])
def test_as_of_in_the_future(rng, as_of):
    r = req(rng, 0)
    r.as_of.seconds = as_of
    e = error_of(r)
    assert e.field == "as_of" and "after the server's clock" in e.message


@pytest.mark.parametrize("as_of", [1, 86_400 * 365, 946_684_799])
def test_as_of_before_the_lower_bound(rng, as_of):
    r = req(rng, 0)
    r.as_of.seconds = as_of
    e = error_of(r)
    assert e.field == "as_of" and "2000-01-01T00:00:00Z" in e.message


def test_as_of_edges_accepted(rng):
    for as_of in (NOW + 600, 946_684_800, AS_OF - 10 * 365 * 86_400):   # skew allowance; bound; a backtest
        r = req(rng, 0)
        r.as_of.seconds = as_of
        assert check(r)[0] is None, as_of


# ----------------------------------------------------------------------------------- currency

@pytest.mark.parametrize("code", ["ÄÖÜ", "usd", "US", "USDX", "U$D", "", "ＵＳＤ"])
def test_currency_must_be_three_ascii_capitals(rng, code):
    r = req(rng)
    r.purchase.currency = code
    e = error_of(r)
    assert e.field == "purchase.currency" and "ISO 4217 code" in e.message


@pytest.mark.parametrize("code", ["JPY", "GBP", "XXX"])
def test_currency_not_accepted_by_the_bundle(rng, code):
    r = req(rng)
    r.purchase.currency = code
    e = error_of(r)
    assert e.field == "purchase.currency" and "not accepted by this bundle (accepts EUR, USD" in e.message
    r.purchase.currency = "EUR"
    assert check(r)[0] is None


def test_minor_unit_exponent_scales_the_amount_range(rng):
    yen = FeatureSchema.build("jpy", APPLICANT, 32, limits=RequestLimits(
        currencies=(("JPY", 0),), amount_min_major=100, amount_max_major=7_000_000, max_imputed_share=1.0))
    assert yen.limits.amount_range_minor() == (100, 7_000_000)
    assert LIMITS.amount_range_minor() == (100, 5_000_000)
    assert RequestLimits(currencies=(("KWD", 3),), amount_max_major=1.5).amount_range_minor() == (10, 1500)
    r = req(rng)
    r.purchase.currency, r.purchase.amount_minor = "JPY", 7_000_000
    assert check(r, yen)[0] is None
    r.purchase.amount_minor = 7_000_001
    assert error_of(r, yen).field == "purchase.amount_minor"
    r.purchase.currency = "USD"                              # a USD request to a JPY model
    assert error_of(r, yen).field == "purchase.currency"


# ----------------------------------------------------------------------------------- amount

@pytest.mark.parametrize("amount", [10**12, 5_000_001, 99, 0, -100])
def test_purchase_amount_outside_the_range(rng, amount):
    r = req(rng)
    r.purchase.amount_minor = amount
    e = error_of(r)
    assert e.field == "purchase.amount_minor" and "[1, 50000] major units (100..5000000 minor units)" in e.message


def test_purchase_amount_edges_accepted(rng):
    for amount in (100, 5_000_000):
        r = req(rng)
        r.purchase.amount_minor = amount
        assert check(r)[0] is None


# ----------------------------------------------------------------------------------- products

@pytest.mark.parametrize("product,n,ok", [
    (pb.PAY_IN_4, 360, False), (pb.PAY_IN_4, 3, False), (pb.PAY_IN_4, 4, True),
    (pb.PAY_IN_FULL_30, 2, False), (pb.PAY_IN_FULL_30, 1, True),
    (pb.MONTHLY, 2, False), (pb.MONTHLY, 25, False), (pb.MONTHLY, 3, True), (pb.MONTHLY, 24, True),
])
def test_installments_per_product(rng, product, n, ok):
    r = req(rng)
    r.purchase.product, r.purchase.installments = product, n
    e, _ = check(r)
    if ok:
        assert e is None
    else:
        assert e.field == "purchase.installments" and pb.Product.Name(product) in e.message


def test_product_not_offered(rng):
    schema = FeatureSchema.build("p", APPLICANT, 32, limits=RequestLimits(installments=(("PAY_IN_4", 4, 4),)))
    r = req(rng)
    r.purchase.product, r.purchase.installments = pb.MONTHLY, 6
    e = error_of(r, schema)
    assert e.field == "purchase.product" and "MONTHLY is not offered by this bundle (accepts PAY_IN_4)" in e.message


# ----------------------------------------------------------------------------------- imputation

def test_required_feature_missing(rng):
    e = error_of(req(rng, features={"b": 1.0, "c": 1.0, "d": 1.0}))
    assert e.field == 'features["a"]' and "required" in e.message


def test_all_applicant_features_missing(rng):
    e = error_of(req(rng, features={}))
    assert e.field == 'features["a"]'
    no_required = FeatureSchema.build("n", APPLICANT, 32, limits=RequestLimits(max_imputed_share=0.5))
    e = error_of(req(rng, features={}), no_required)
    assert e.field == "features" and "4 of 4 applicant features are missing" in e.message and "at most 2" in e.message


@pytest.mark.parametrize("share,present,ok", [(0.5, 2, True), (0.5, 1, False), (0.0, 4, True), (0.0, 3, False),
                                              (0.25, 3, True), (1.0, 0, True)])
def test_max_imputed_share(rng, share, present, ok):
    schema = FeatureSchema.build("s", APPLICANT, 32, limits=RequestLimits(max_imputed_share=share))
    names = ["a", "b", "c", "d"]
    chosen = rng.permutation(names)[:present]
    e, fb = check(req(rng, features={n: 5.0 for n in chosen}), schema)
    assert (e is None) == ok, e
    if ok:
        imputed = sorted(w.detail for w in fb.warnings[0] if w.code == pb.FEATURE_IMPUTED)
        assert imputed == sorted(set(names) - set(chosen))


# ----------------------------------------------------------------------------------- events

def test_event_before_2000_refused_batched_and_alone(rng):
    good = [req(rng, int(n), request_id=f"g{i}") for i, n in enumerate(rng.integers(1, 10, 4))]
    bad = req(rng, 5, request_id="bad")
    bad.history.timestamp_unix_s[4] = 946_684_799
    fb, errors = featurize(good[:2] + [bad] + good[2:], SCHEMA, ENC)
    assert list(errors) == [2] and errors[2].field == "history.timestamp_unix_s[4]"
    assert "2000-01-01" in errors[2].message and fb.batch_size == 4
    bad.history.timestamp_unix_s[4] = 946_684_800
    bad.history.timestamp_unix_s[3] = max(bad.history.timestamp_unix_s[3], 946_684_800)
    assert check(bad)[0] is None


def test_event_amount_cap(rng):
    r = req(rng, 4)
    r.history.amount_minor[1] = fz.MAX_AMOUNT_MINOR + 1
    assert error_of(r).field == "history.amount_minor[1]"
    r.history.amount_minor[1] = fz.MAX_AMOUNT_MINOR
    assert check(r)[0] is None


# ----------------------------------------------------------------------------------- the schema itself

@pytest.mark.parametrize("kw,msg", [
    ({"currencies": ()}, "at least one currency"),
    ({"currencies": (("usd", 2),)}, "not an ISO 4217 code"),
    ({"currencies": (("ÄÖÜ", 2),)}, "not an ISO 4217 code"),
    ({"currencies": (("USD", 2), ("JPY", 0))}, "share one minor-unit exponent"),
    ({"currencies": (("USD", 7),)}, "exponent must be 0..4"),
    ({"amount_min_major": 0.0}, "0 < amount_min_major"),
    ({"amount_min_major": 10.0, "amount_max_major": 5.0}, "amount_min_major <= amount_max_major"),
    ({"amount_max_major": float("inf")}, "finite"),
    ({"amount_min_major": 0.001, "amount_max_major": 0.004}, "no whole minor unit"),
    ({"installments": (("PAY_IN_8", 8, 8),)}, "unknown product"),
    ({"installments": (("MONTHLY", 0, 12),)}, "1 <= min <= max <= 360"),
    ({"installments": (("MONTHLY", 12, 400),)}, "1 <= min <= max <= 360"),
    ({"installments": ()}, "at least one product"),
    ({"as_of_min_unix_s": 0}, "as_of_min_unix_s must be an integer >= 1"),
    ({"as_of_max_future_s": -1}, "as_of_max_future_s"),
    ({"max_imputed_share": 1.5}, "max_imputed_share"),
])
def test_bad_limits_are_refused(kw, msg):
    with pytest.raises(ValueError, match=msg):
        RequestLimits(**kw)


def test_limits_json_round_trip_and_defaults():
    d = json.loads(json.dumps(SCHEMA.to_dict()))
    assert d["limits"]["currencies"] == {"EUR": 2, "USD": 2}
    assert d["limits"]["installments"]["MONTHLY"] == [3, 24]
    assert FeatureSchema.from_dict(d) == SCHEMA
    old = {k: v for k, v in d.items() if k != "limits"}                 # a bundle from before limits
    assert FeatureSchema.from_dict(old).limits == RequestLimits()
    partial = dict(d, limits={"currencies": {"GBP": 2}})                # keys left out take the defaults
    assert FeatureSchema.from_dict(partial).limits == RequestLimits(currencies=(("GBP", 2),))
    for bad, msg in (({"currency": {"USD": 2}}, "unknown limits keys"), ({"currencies": ["USD"]}, "object like"),
                     ({"installments": {"MONTHLY": 6}}, "object like"), ({"max_imputed_share": "half"}, "number"),
                     ({"currencies": {"USD": 2.5}}, "integer")):
        with pytest.raises(ValueError, match=msg):
            FeatureSchema.from_dict(dict(d, limits=bad))
    with pytest.raises(ValueError, match="not applicant features"):
        FeatureSchema.build("x", APPLICANT, 32, limits=RequestLimits(required_features=("purchase_log_amount",)))
    with pytest.raises(ValueError, match="unknown feature schema keys"):
        FeatureSchema.from_dict(dict(d, limts={}))


# ----------------------------------------------------------------------------------- what must stay valid

def test_demo_generator_requests_pass_the_demo_limits(monkeypatch):
    from uwrt.demo import synth
    monkeypatch.setattr(fz, "_now", fz.time.time)
    schema = FeatureSchema.build("demo", list(synth.APPLICANT_FEATURES), 32, limits=synth.REQUEST_LIMITS)
    for seed in (0, 1, 2):
        reqs = synth.generate(400, seed).requests + synth.generate(200, seed, id_prefix="d-", drift=1.5).requests
        fb, errors = featurize(reqs, schema, EncoderConfig())
        assert not errors, list(errors.values())[:3]


def test_warmup_and_factory_requests_pass(rng, monkeypatch):
    from uwrt.demo import synth
    from uwrt.runtime.serving.warmup import warmup_request
    monkeypatch.setattr(fz, "_now", fz.time.time)
    # the demo's limits, the defaults, and a bundle with nothing in common with the demo traffic
    # (another currency and exponent, one product at 12+ installments, a high floor, a late as_of)
    odd = RequestLimits(currencies=(("JPY", 0),), amount_min_major=200_000, amount_max_major=900_000,
                        installments=(("MONTHLY", 12, 36),), as_of_min_unix_s=1_760_000_000,
                        as_of_max_future_s=10 * 365 * 86_400,
                        required_features=tuple(f.name for f in synth.APPLICANT_FEATURES[:2]))
    for limits in (synth.REQUEST_LIMITS, RequestLimits(), odd):
        schema = FeatureSchema.build("w", list(synth.APPLICANT_FEATURES), 32, limits=limits)
        reqs = [warmup_request(schema, n, i) for n in (0, 1, 17, 128) for i in range(3)]
        assert not featurize(reqs, schema, EncoderConfig())[1]
        if limits is odd:       # the hand-built factory requests are USD, 2025: only for the others
            continue
        factory = [make_request(int(n), rng, features={f.name: f.impute_value for f in schema.applicant})
                   for n in rng.integers(0, 40, 8)]
        assert not featurize(factory, schema, EncoderConfig())[1]
