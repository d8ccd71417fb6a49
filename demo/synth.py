"""Seeded synthetic applicant generator: the source of training data, tests and benchmark traffic.

Each applicant has latent `risk`, `liquidity` and `seek` (credit-seeking) values. Loan
applications arrive as a self-exciting (Hawkes) process over the applicant's time with the
lender, so loans come in bursts; some applications are DECLINED. Every approved loan is a
pay-in-4: ORIGINATION, then INSTALLMENT_DUE every 14 days (days 14, 28, 42, 56), each resolved
as PAID_ON_TIME, PAID_LATE (days_past_due > 0), MISSED (then possibly paid late) or
AUTOPAY_FAIL (then paid late or missed); occasional REFUND, CHARGEBACK and PAYOFF (early
repayment of the rest). The chance that an installment goes bad rises with risk, low liquidity,
the number of concurrently open loans, a hidden deterioration shock (a fifth of applicants), and
a persistent delinquency state (one bad installment makes the next more likely).

Only events at or before `as_of` are kept, newest first, clipped to the newest MAX_EVENTS.
The applicant's tabular features are noisy bureau-like views of the latents plus the history
aggregates a feature store would compute, all computed from exactly the history the request
carries. The labels depend on the latents (partly visible through those features) AND on
ORACLE_FEATURES, order / recency patterns of the same history that tabular counts cannot
capture: a bad payment right after a burst of new loans; recent deterioration versus
old-and-recovered delinquency (the same bad and good payments in a different order); time since
the last missed payment. `shuffle_event_order` is the honesty control that destroys exactly that
information; `signal_report` measures it (python -m uwrt.demo.signal_check).

Determinism: applicant i is drawn from its own Generator(PCG64(SeedSequence(seed,
spawn_key=(i,)))), so the same (n, seed) gives identical requests and generate(m, seed) is a
prefix of generate(n, seed) for m <= n (so a request id never names two different bodies; give
a `drift` set its own id_prefix).
Compare serialized requests with SerializeToString(deterministic=True): upb orders the
`features` map differently from process to process otherwise.

Thread safety: module-level constants are immutable by convention; functions keep no state.
"""
from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from uwrt.runtime import jsonl as _jsonl
from uwrt.runtime.bundle.schema import FeatureSpec, RequestLimits
from uwrt.runtime.pb import pb

# ---------------------------------------------------------------------------------------------
# Constants

DAY = 86_400
#: as_of values are uniform over [AS_OF_START, AS_OF_START + AS_OF_SPAN_S): 2023-01-01 .. 2025-01-01 UTC.
AS_OF_START = 1_672_531_200
AS_OF_SPAN_S = 731 * DAY
#: Newest events kept per request.
MAX_EVENTS = 512
#: Label horizon (documentation: `default` means default within this many days after as_of).
DEFAULT_HORIZON_DAYS = 180

ORIGINATION = pb.ORIGINATION
INSTALLMENT_DUE = pb.INSTALLMENT_DUE
PAID_ON_TIME = pb.PAID_ON_TIME
PAID_LATE = pb.PAID_LATE
MISSED = pb.MISSED
AUTOPAY_FAIL = pb.AUTOPAY_FAIL
REFUND = pb.REFUND
CHARGEBACK = pb.CHARGEBACK
PAYOFF = pb.PAYOFF
DECLINED = pb.DECLINED
_BAD = frozenset((PAID_LATE, MISSED, AUTOPAY_FAIL))
_RESOLUTION = frozenset((PAID_ON_TIME, PAID_LATE, MISSED, AUTOPAY_FAIL))

#: Merchant category codes (ISO 18245) that pay-over-time lenders see, with popularity weights.
MCC_TABLE: tuple[tuple[int, float], ...] = (
    (5651, 10.0),  # family clothing
    (5691, 8.0),   # men's and women's clothing
    (5621, 6.0),   # women's ready-to-wear
    (5661, 5.0),   # shoe stores
    (5311, 6.0),   # department stores
    (5732, 7.0),   # electronics
    (5944, 2.5),   # jewelry
    (5977, 4.0),   # cosmetics
    (5941, 3.0),   # sporting goods
    (5712, 3.0),   # furniture
    (5945, 2.5),   # toys and games
    (5999, 5.0),   # miscellaneous retail
    (5699, 3.0),   # miscellaneous apparel
    (5200, 2.0),   # home supply warehouses
    (5995, 1.5),   # pet shops
    (7230, 2.0),   # beauty shops
    (4722, 2.0),   # travel agencies
    (4511, 1.5),   # airlines
    (7011, 1.5),   # hotels
    (8021, 1.0),   # dentists
    (5411, 1.5),   # grocery stores
    (5812, 1.0),   # restaurants
)
_MCC_CODES = [m for m, _ in MCC_TABLE]
_MCC_CUM = np.cumsum([w for _, w in MCC_TABLE]).tolist()

#: Consumer-readable text for every reason code the applicant, purchase and embedding features use.
REASON_TEXTS: dict[str, str] = {
    "BUREAU_SCORE": "Credit bureau score is too low",
    "DEBT_BURDEN": "Debt obligations are too high relative to income",
    "INCOME": "Income is insufficient for the amount of credit requested",
    "CREDIT_HISTORY_LENGTH": "Length of credit history is too short",
    "OPEN_ACCOUNTS": "Number of open credit accounts",
    "UTILIZATION": "Balances on credit accounts are too high relative to credit limits",
    "CREDIT_SEEKING": "Too many recent credit applications or new loans",
    "DELINQUENCY": "Recent late or missed payments",
    "THIN_FILE": "Limited repayment history with us",
    "EXPOSURE": "Amount of credit borrowed with us is too high",
    "REPAYMENT_HISTORY": "Pattern of recent repayment activity on your account",
    "PURCHASE": "Amount or terms of the requested purchase",
}

#: Applicant tabular features (DecisionRequest.features). impute_value is the approximate
#: population median (measured on generate(20000, 0)); min/max the validity range.
APPLICANT_FEATURES: list[FeatureSpec] = [
    # bureau-like: noisy views of the latents
    FeatureSpec("bureau_score", "applicant", 681.0, "BUREAU_SCORE", 300.0, 850.0),
    FeatureSpec("debt_to_income", "applicant", 0.323, "DEBT_BURDEN", 0.0, 2.0),
    FeatureSpec("income_estimate_log", "applicant", 10.9, "INCOME", 8.0, 14.0),
    FeatureSpec("tenure_months", "applicant", 91.0, "CREDIT_HISTORY_LENGTH", 0.0, 720.0),
    FeatureSpec("open_tradelines", "applicant", 5.0, "OPEN_ACCOUNTS", 0.0, 80.0),
    FeatureSpec("utilization", "applicant", 0.335, "UTILIZATION", 0.0, 1.5),
    FeatureSpec("inquiries_6m", "applicant", 1.0, "CREDIT_SEEKING", 0.0, 40.0),
    # history aggregates (computed from exactly the history the request carries)
    FeatureSpec("n_events_total", "applicant", 12.0, "THIN_FILE", 0.0, float(MAX_EVENTS)),
    FeatureSpec("days_since_first_event", "applicant", 74.4, "THIN_FILE", 0.0, 4000.0),
    FeatureSpec("n_originations_12m", "applicant", 2.0, "CREDIT_SEEKING", 0.0, float(MAX_EVENTS)),
    FeatureSpec("n_declined_12m", "applicant", 0.0, "CREDIT_SEEKING", 0.0, float(MAX_EVENTS)),
    FeatureSpec("total_originated_log", "applicant", 5.84, "EXPOSURE", 0.0, 20.0),
    FeatureSpec("n_late_12m", "applicant", 0.0, "DELINQUENCY", 0.0, float(MAX_EVENTS)),
    FeatureSpec("n_missed_12m", "applicant", 0.0, "DELINQUENCY", 0.0, float(MAX_EVENTS)),
    FeatureSpec("n_autopay_fail_12m", "applicant", 0.0, "DELINQUENCY", 0.0, float(MAX_EVENTS)),
    FeatureSpec("max_dpd_12m", "applicant", 0.0, "DELINQUENCY", 0.0, 365.0),
    FeatureSpec("n_late_90d", "applicant", 0.0, "DELINQUENCY", 0.0, float(MAX_EVENTS)),
]
APPLICANT_FEATURE_NAMES: tuple[str, ...] = tuple(f.name for f in APPLICANT_FEATURES)
#: Probability that any one applicant feature is absent from a request (missing at random).
MISSING_RATE = 0.04

#: What the demo model was trained on, as the bundle's request limits (RequestLimits): USD
#: purchases of $5-$20,000 (accepted up to $50,000), pay-in-4, monthly in 3/6/12 installments
#: (accepted 3..24), pay-in-full; at most half the applicant features imputed (the generator
#: drops each with probability MISSING_RATE).
REQUEST_LIMITS = RequestLimits(
    currencies=(("USD", 2),), amount_min_major=1.0, amount_max_major=50_000.0,
    installments=(("PAY_IN_4", 4, 4), ("MONTHLY", 3, 24), ("PAY_IN_FULL_30", 1, 1)),
    max_imputed_share=0.5)

#: The hidden order/recency variables the labels use, computed from a request's history.
ORACLE_FEATURES: tuple[str, ...] = (
    "burst_then_bad",   # max #originations in the 30 days before a bad payment event in the last 90 days
    "deterioration",    # over the newest 12 payment resolutions: 2 * P(a bad one is newer than a good one) - 1
                        # (+1 all bad ones after all good ones, -1 old-and-recovered; 0 if not mixed)
    "recent_missed",    # exp(-days since the newest MISSED / 60); 0 if never missed
)

# ---------------------------------------------------------------------------------------------
# Random draws


class _Draws:
    """Buffered uniform / normal draws from one numpy Generator (fast scalar access)."""
    __slots__ = ("rng", "_u", "_ui", "_n", "_ni")

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self._u = rng.random(256).tolist()
        self._ui = 0
        self._n = rng.standard_normal(32).tolist()
        self._ni = 0

    def u(self) -> float:
        i = self._ui
        if i >= len(self._u):
            self._u = self.rng.random(256).tolist()
            i = 0
        self._ui = i + 1
        return self._u[i]

    def n(self) -> float:
        i = self._ni
        if i >= len(self._n):
            self._n = self.rng.standard_normal(32).tolist()
            i = 0
        self._ni = i + 1
        return self._n[i]

    def exp(self, mean: float) -> float:
        return -mean * math.log(1.0 - self.u())

    def poisson(self, lam: float) -> int:
        if lam > 30.0:
            return int(self.rng.poisson(lam))
        limit = math.exp(-lam)
        k = 0
        p = self.u()
        while p > limit:
            k += 1
            p *= self.u()
        return k


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


# ---------------------------------------------------------------------------------------------
# History-derived variables (shared by the generator, the tests and signal_report)


def history_aggregates(ts: Sequence[int], ty: Sequence[int], amt: Sequence[int],
                       dpd: Sequence[int], as_of: int) -> dict[str, float]:
    """The feature-store aggregates of a history (newest first) at `as_of`."""
    y0 = as_of - 365 * DAY
    q0 = as_of - 90 * DAY
    n_orig = n_dec = n_late = n_missed = n_apf = n_late90 = 0
    max_dpd = 0
    total = 0
    for t, e, a, d in zip(ts, ty, amt, dpd, strict=True):
        if e == ORIGINATION:
            total += a
        if t < y0:
            continue
        if d > max_dpd:
            max_dpd = d
        if e == ORIGINATION:
            n_orig += 1
        elif e == PAID_LATE:
            n_late += 1
            if t >= q0:
                n_late90 += 1
        elif e == MISSED:
            n_missed += 1
        elif e == AUTOPAY_FAIL:
            n_apf += 1
        elif e == DECLINED:
            n_dec += 1
    n = len(ts)
    return {
        "n_events_total": float(n),
        "days_since_first_event": round((as_of - ts[-1]) / DAY, 2) if n else 0.0,
        "n_originations_12m": float(n_orig),
        "n_declined_12m": float(n_dec),
        "total_originated_log": round(math.log1p(total / 100.0), 4),
        "n_late_12m": float(n_late),
        "n_missed_12m": float(n_missed),
        "n_autopay_fail_12m": float(n_apf),
        "max_dpd_12m": float(max_dpd),
        "n_late_90d": float(n_late90),
    }


def oracle_features_arrays(ts: Sequence[int], ty: Sequence[int], as_of: int) -> tuple[float, ...]:
    """ORACLE_FEATURES of a history given as newest-first timestamps and event types."""
    n = len(ts)
    recent = as_of - 90 * DAY
    burst = 0
    n_res = 0            # resolutions seen (newest first), up to 12
    n_good = 0
    pairs_bad_newer = 0  # (bad, good) pairs among them where the bad one is newer
    n_bad = 0
    missed_age = -1.0
    n_burst_checked = 0
    for j in range(n):
        e = ty[j]
        if e not in _RESOLUTION:
            continue
        t = ts[j]
        bad = e in _BAD
        if n_res < 12:
            n_res += 1
            if bad:
                n_bad += 1
            else:
                n_good += 1
                pairs_bad_newer += n_bad
        if bad:
            if t >= recent and n_burst_checked < 16:
                n_burst_checked += 1
                lo = t - 30 * DAY
                c = 0
                for k in range(j + 1, n):
                    if ts[k] < lo:
                        break
                    if ty[k] == ORIGINATION:
                        c += 1
                if c > burst:
                    burst = c
            if e == MISSED and missed_age < 0:
                missed_age = (as_of - t) / DAY
        if n_res >= 12 and missed_age >= 0 and (t < recent or n_burst_checked >= 16):
            break
    det = 2.0 * pairs_bad_newer / (n_bad * n_good) - 1.0 if n_bad and n_good else 0.0
    recent_missed = math.exp(-missed_age / 60.0) if missed_age >= 0 else 0.0
    return (float(burst), det, recent_missed)


def oracle_features(req: pb.DecisionRequest) -> tuple[float, ...]:
    """ORACLE_FEATURES of a request's history."""
    h = req.history
    return oracle_features_arrays(list(h.timestamp_unix_s), list(h.type), req.as_of.seconds)


def _label_logits(risk: float, liq: float, orc: tuple[float, ...], purchase_log_ratio: float,
                  monthly: bool, shared: float) -> tuple[float, float]:
    """Log-odds of (default, dpd30_90). `shared` is a per-applicant N(0,1) "future shock" both
    labels share (it makes them correlated); the sequence term is the part only order and
    recency reveal."""
    burst, det, recent_missed = orc
    seq = 1.8 * (burst >= 3) + 3.5 * det + 0.6 * recent_missed
    base = 0.35 * risk - 0.25 * liq + 0.2 * purchase_log_ratio + 0.15 * monthly + 0.6 * shared
    return -3.3 + base + seq, -3.2 + 0.9 * base + 1.1 * seq


# ---------------------------------------------------------------------------------------------
# One applicant


def _pick_mcc(d: _Draws, own: list[int], own_cum: list[float]) -> int:
    if d.u() < 0.9:
        return own[bisect_right(own_cum, d.u() * own_cum[-1])]
    return _MCC_CODES[bisect_right(_MCC_CUM, d.u() * _MCC_CUM[-1])]


def _applicant(seed: int, i: int, id_prefix: str, drift: float):
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(i,))))
    d = _Draws(rng)
    u, nrm = d.u, d.n

    as_of = AS_OF_START + int(u() * AS_OF_SPAN_S)
    frac = (as_of - AS_OF_START) / AS_OF_SPAN_S
    risk = nrm() + drift * frac
    liq = -0.4 * risk + 0.9165 * nrm()
    seek = nrm()

    # merchant categories this applicant shops in (2..5 distinct), with personal weights
    own: list[int] = []
    for _ in range(2 + int(u() * 4)):
        m = _MCC_CODES[bisect_right(_MCC_CUM, u() * _MCC_CUM[-1])]
        if m not in own:
            own.append(m)
    own_cum: list[float] = []
    acc = 0.0
    for _ in own:
        acc += math.exp(nrm())
        own_cum.append(acc)

    # --- loan applications: Hawkes process via its cluster representation
    t_days = min(max(math.exp(math.log(75.0) + 1.1 * nrm()), 0.5), 1500.0)
    t_start = as_of - t_days * DAY
    lam0 = math.exp(math.log(1.0 / 150.0) + 0.6 * nrm() + 0.35 * seek)   # immigrants per day
    alpha = 0.25 + 0.45 * _sigmoid(seek + 0.5 * nrm())                      # branching ratio
    apps = [t_start]
    for _ in range(d.poisson(lam0 * t_days)):
        apps.append(t_start + u() * t_days * DAY)
    queue = list(apps)
    while queue and len(apps) < 400:
        t = queue.pop()
        for _ in range(d.poisson(alpha)):
            c = t + d.exp(6.0) * DAY
            if c < as_of:
                apps.append(c)
                queue.append(c)
    apps.sort()

    ev: list[tuple[int, int, int, int, int, int, int]] = []  # (t, seq, type, amount, mcc, dpd, inst)
    seq = 0
    origs: list[int] = []
    loan_t: list[int] = []
    loan_inst: list[list[int]] = []
    loan_mcc: list[int] = []
    payoff_at: list[int] = []
    dues: list[tuple[int, int, int]] = []
    for ta in apps:
        t = int(ta)
        amt = max(500, min(500_000, int(math.exp(math.log(12_000.0) + 0.8 * nrm()))))
        mcc = _pick_mcc(d, own, own_cum)
        n_open = len(origs) - bisect_right(origs, t - 56 * DAY)
        if u() < _sigmoid(-3.4 + 0.7 * risk + 0.45 * n_open + 0.25 * seek):
            ev.append((t, seq, DECLINED, amt, mcc, 0, 0))
            seq += 1
            continue
        lid = len(loan_t)
        origs.append(t)
        loan_t.append(t)
        loan_mcc.append(mcc)
        ev.append((t, seq, ORIGINATION, amt, mcc, 0, 0))
        seq += 1
        q = amt // 4
        loan_inst.append([amt - 3 * q, q, q, q])
        payoff_at.append(1 + int(u() * 3) if u() < _sigmoid(-2.8 + 0.6 * liq) else 0)
        for k in range(1, 5):
            dues.append((t + 14 * k * DAY, lid, k))
        if u() < 0.05:
            ev.append((t + int((2 + 28 * u()) * DAY), seq, REFUND, int(amt * (0.2 + 0.8 * u())), mcc, 0, 0))
            seq += 1
        if u() < _sigmoid(-4.6 + 0.5 * risk):
            ev.append((t + int((10 + 50 * u()) * DAY), seq, CHARGEBACK, amt, mcc, 0, 0))
            seq += 1

    # --- installments in time order, with a persistent delinquency state
    dues.sort()
    shock_t = t_start + u() * (t_days + 60.0) * DAY if u() < 0.2 else math.inf
    shock = 0.8 + 1.2 * u()
    state = 0.0
    closed = [False] * len(loan_t)
    for td, lid, k in dues:
        if td > as_of:
            break
        if closed[lid]:
            continue
        a = loan_inst[lid][k - 1]
        mcc = loan_mcc[lid]
        n_open = bisect_right(origs, td) - bisect_right(origs, td - 56 * DAY)
        z = (-3.1 + 0.75 * risk - 0.55 * liq + 0.4 * min(n_open - 1, 5) + 1.6 * state
             + (shock if td >= shock_t else 0.0))
        ev.append((td, seq, INSTALLMENT_DUE, a, mcc, 0, k))
        seq += 1
        if u() < _sigmoid(z):
            p_missed = _sigmoid(-1.6 + 0.6 * risk + 1.0 * state)
            state = 1.0
            r = u()
            missed = r < p_missed
            if not missed and r < p_missed + 0.3 * (1.0 - p_missed):      # autopay failure
                ev.append((td + 60 + int(3600 * u()), seq, AUTOPAY_FAIL, a, mcc, 0, k))
                seq += 1
                if u() < 0.75:
                    dpd = min(9, 1 + int(d.exp(2.5)))
                    ev.append((td + dpd * DAY + int(43_200 * u()), seq, PAID_LATE, a, mcc, dpd, k))
                    seq += 1
                else:
                    missed = True
            elif not missed:                                                 # manual late payment
                dpd = min(29, 1 + int(d.exp(4.0)))
                ev.append((td + dpd * DAY + int(43_200 * u()), seq, PAID_LATE, a, mcc, dpd, k))
                seq += 1
            if missed:
                ev.append((td + 10 * DAY, seq, MISSED, a, mcc, 10, k))
                seq += 1
                if u() < 0.6:
                    dpd = min(89, 11 + int(d.exp(15.0)))
                    ev.append((td + dpd * DAY + int(43_200 * u()), seq, PAID_LATE, a, mcc, dpd, k))
                    seq += 1
                else:
                    ev.append((td + 40 * DAY, seq, MISSED, a, mcc, 40, k))
                    seq += 1
                    if u() < 0.5:
                        dpd = 41 + int(80 * u())
                        ev.append((td + dpd * DAY + int(43_200 * u()), seq, PAID_LATE, a, mcc, dpd, k))
                        seq += 1
        else:
            state *= 0.5
            ev.append((td + int(43_200 * u()), seq, PAID_ON_TIME, a, mcc, 0, k))
            seq += 1
            if payoff_at[lid] == k and k < 4:
                rest = sum(loan_inst[lid][k:])
                ev.append((td + int((1 + 12 * u()) * DAY), seq, PAYOFF, rest, mcc, 0, 0))
                seq += 1
                closed[lid] = True

    ev = [e for e in ev if e[0] <= as_of]
    ev.sort()
    ev.reverse()
    del ev[MAX_EVENTS:]
    ts, _, ty, am, mc, dp, ix = (list(c) for c in zip(*ev, strict=True))

    # --- tabular features
    feats = {
        "bureau_score": float(round(min(850.0, max(300.0, 682.0 - 55.0 * risk + 15.0 * liq + 32.0 * nrm())))),
        "debt_to_income": round(min(2.0, max(0.0, 0.32 + 0.07 * risk - 0.05 * liq + 0.10 * nrm())), 3),
        "income_estimate_log": round(min(14.0, max(8.0, 10.9 + 0.35 * liq - 0.1 * risk + 0.35 * nrm())), 3),
        "tenure_months": float(min(720, max(0, round(math.exp(math.log(90.0) - 0.2 * risk + 0.7 * nrm()))))),
        "open_tradelines": float(min(80, d.poisson(math.exp(1.6 + 0.15 * seek + 0.3 * nrm())))),
        "utilization": round(min(1.5, max(0.0, _sigmoid(-0.7 + 0.6 * risk - 0.5 * liq + 0.5 * nrm()))), 3),
        "inquiries_6m": float(min(40, d.poisson(math.exp(0.1 + 0.35 * risk + 0.5 * seek)))),
    }
    feats.update(history_aggregates(ts, ty, am, dp, as_of))
    missing = [u() < MISSING_RATE for _ in APPLICANT_FEATURE_NAMES]
    feats = {k: feats[k] for k, m in zip(APPLICANT_FEATURE_NAMES, missing, strict=True) if not m}

    # --- the purchase being decided
    r = u()
    if r < 0.80:
        product, inst, med = pb.PAY_IN_4, 4, 12_000.0
    elif r < 0.97:
        r2 = u()
        product, inst, med = pb.MONTHLY, (3 if r2 < 0.4 else 6 if r2 < 0.8 else 12), 60_000.0
    else:
        product, inst, med = pb.PAY_IN_FULL_30, 1, 15_000.0
    p_amt = max(500, min(2_000_000, int(math.exp(math.log(med) + 0.8 * nrm()))))
    p_mcc = _pick_mcc(d, own, own_cum)
    merchant = f"mer-{p_mcc}-{int(u() * 50):02d}"

    # --- labels
    orc = oracle_features_arrays(ts, ty, as_of)
    l_def, l_dpd = _label_logits(risk, liq, orc, math.log(p_amt / med), product == pb.MONTHLY, nrm())
    y_def = u() < _sigmoid(l_def)
    y_dpd = u() < _sigmoid(l_dpd)

    req = pb.DecisionRequest(
        request_id=f"{id_prefix}{seed}-{i}",
        purchase=pb.Purchase(amount_minor=p_amt, currency="USD", mcc=p_mcc, product=product,
                             installments=inst, merchant_id=merchant),
        features=feats,
        history=pb.EventHistory(timestamp_unix_s=ts, type=ty, amount_minor=am, mcc=mc,
                                days_past_due=dp, installment_index=ix),
    )
    req.as_of.seconds = as_of
    return req, y_def, y_dpd, as_of


# ---------------------------------------------------------------------------------------------
# Public API


@dataclass
class SyntheticSet:
    requests: list[pb.DecisionRequest]   # request_id f"{prefix}{seed}-{i}"
    default: np.ndarray                  # bool [n]: default within DEFAULT_HORIZON_DAYS after as_of
    dpd30_90: np.ndarray                 # bool [n]: 30+ days past due within 90 days
    as_of_unix_s: np.ndarray             # int64 [n]


def generate(n: int, seed: int, *, id_prefix: str = "app-", drift: float = 0.0,
             progress: Callable[[int], object] | None = None) -> SyntheticSet:
    """`n` synthetic applicants from `seed`; deterministic, prefix-stable in `n`.

    drift: shift of the mean latent risk (in standard deviations) from the earliest to the latest
    as_of; 0 (default) is a stationary population, > 0 a population that worsens over time.
    progress: called with the number of applicants just generated (every 256), e.g. a bar's update.
    """
    if n < 0:
        raise ValueError("n must be >= 0")
    reqs = []
    y_def = np.zeros(n, dtype=bool)
    y_dpd = np.zeros(n, dtype=bool)
    as_of = np.zeros(n, dtype=np.int64)
    for i in range(n):
        req, a, b, t = _applicant(seed, i, id_prefix, drift)
        reqs.append(req)
        y_def[i] = a
        y_dpd[i] = b
        as_of[i] = t
        if progress is not None and (i + 1) % 256 == 0:
            progress(256)
    if progress is not None and n % 256:
        progress(n % 256)
    return SyntheticSet(reqs, y_def, y_dpd, as_of)


def shuffle_event_order(req: pb.DecisionRequest, rng: np.random.Generator) -> pb.DecisionRequest:
    """Honesty control: a copy whose event contents (type, amount, mcc, days past due,
    installment index) are randomly permuted across positions while the timestamps stay in
    place. Order/recency information is destroyed; the bag of events, and so the tabular
    aggregates (the features map is copied unchanged), is not."""
    out = pb.DecisionRequest()
    out.CopyFrom(req)
    h = req.history
    n = len(h.timestamp_unix_s)
    if n > 1:
        perm = rng.permutation(n).tolist()
        cols = [list(h.type), list(h.amount_minor), list(h.mcc), list(h.days_past_due),
                list(h.installment_index)]
        ty, am, mc, dp, ix = ([c[p] for p in perm] for c in cols)
        out.history.CopyFrom(pb.EventHistory(
            timestamp_unix_s=list(h.timestamp_unix_s), type=ty, amount_minor=am, mcc=mc,
            days_past_due=dp, installment_index=ix))
    return out


# The request file format belongs to the runtime (every command reads it); re-exported here.
write_jsonl = _jsonl.write_jsonl
read_jsonl = _jsonl.read_jsonl
