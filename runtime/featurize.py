"""Requests -> packed model inputs, with validation.

A batch of `DecisionRequest`s becomes:
  * `PackedEvents`: every event of every request concatenated (newest first within a request),
    int32 `cu_seqlens[B+1]` marking each request's segment, no padding anywhere;
  * a float32 tabular block [B, n_applicant + n_purchase] in feature-schema order.

Each request is validated on its own: a bad request yields an `InvalidRequest` naming the
field and is left out of the batch, never failing or changing its neighbours.

An empty history becomes one "no history" token (event type id 0, all numerics 0) so every
segment has at least one token; the response carries an EMPTY_HISTORY warning.

Thread safety: pure functions over their arguments; safe to call from any thread.
"""
from __future__ import annotations

import datetime as _dt
import functools
import math
import time
from dataclasses import dataclass, field

import numpy as np

from uwrt.runtime.bundle.schema import EVENT_TYPE_IDS, EncoderConfig, FeatureSchema, is_currency_code
from uwrt.runtime.errors import InvalidRequest, echo
from uwrt.runtime.pb import pb

SECONDS_PER_DAY = 86400.0
MAX_REQUEST_ID_BYTES = 128
#: Largest history event amount (minor units). The purchase's own range is the bundle's
#: (RequestLimits): per-event limits are module constants because the event checks run
#: vectorised over the whole batch.
MAX_AMOUNT_MINOR = 10**10
#: Earliest history event timestamp accepted: 2000-01-01T00:00:00Z (as the default earliest
#: as_of; catches 0, small integers and unit mix-ups). Events are also never after as_of.
MIN_EVENT_UNIX_S = 946_684_800
MAX_DAYS_PAST_DUE = 3650
MAX_INSTALLMENT_INDEX = 360
#: The clock as_of is checked against (the schema's as_of_max_future_s); tests replace it.
_now = time.time

#: +1 when the event adds exposure or signals stress, -1 when money flows back to the lender.
_DIRECTION = np.zeros(max(EVENT_TYPE_IDS) + 1, dtype=np.float32)
for _name, _sign in {
    "ORIGINATION": 1, "INSTALLMENT_DUE": 1, "PAID_ON_TIME": -1, "PAID_LATE": -1, "MISSED": 1,
    "AUTOPAY_FAIL": 1, "REFUND": -1, "CHARGEBACK": 1, "PAYOFF": -1, "DECLINED": 1,
}.items():
    _DIRECTION[pb.EventType.Value(_name)] = _sign
_VALID_TYPE = np.zeros(max(EVENT_TYPE_IDS) + 1, dtype=bool)
_VALID_TYPE[list(EVENT_TYPE_IDS)] = True
_VALID_PRODUCTS = frozenset(v.number for v in pb.Product.DESCRIPTOR.values if v.number != 0)
_HISTORY_COLUMNS = ("timestamp_unix_s", "type", "amount_minor", "mcc", "days_past_due", "installment_index")


def hash_mcc(mcc: np.ndarray, buckets: int) -> np.ndarray:
    """Merchant category code -> embedding bucket in [1, buckets); 0 is kept for 'unknown' (mcc 0)."""
    mcc = mcc.astype(np.uint64)
    h = (mcc * np.uint64(2654435761)) % np.uint64(2**32)
    out = (h % np.uint64(buckets - 1)).astype(np.int64) + 1
    return np.where(mcc == 0, 0, out)


@dataclass
class PackedEvents:
    """All events of a batch, concatenated. T = total tokens, B = requests.

    type_ids:   int64 [T]     event type enum number (0 = 'no history' token)
    mcc_ids:    int64 [T]     hashed MCC bucket (0 = unknown)
    numeric:    float32 [T, n_numeric]  see uwrt.runtime.bundle.schema.EVENT_NUMERIC_FEATURES
    cu_seqlens: int32 [B+1]   segment b is tokens cu_seqlens[b]:cu_seqlens[b+1]; every segment >= 1
    max_len:    host int, longest segment (kept on the host: reading it from a device tensor
                would force a sync)
    """
    type_ids: np.ndarray
    mcc_ids: np.ndarray
    numeric: np.ndarray
    cu_seqlens: np.ndarray
    max_len: int

    @property
    def batch_size(self) -> int:
        return len(self.cu_seqlens) - 1

    @property
    def n_tokens(self) -> int:
        return int(self.cu_seqlens[-1])

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.cu_seqlens)

    def select(self, rows: list[int] | np.ndarray) -> PackedEvents:
        """A new PackedEvents holding only the given requests, in the given order."""
        starts, lens = self.cu_seqlens[:-1], self.lengths
        idx = (np.concatenate([np.arange(starts[r], starts[r] + lens[r]) for r in rows]) if len(rows)
               else np.zeros(0, np.int64))
        cu = np.zeros(len(rows) + 1, dtype=np.int32)
        cu[1:] = np.cumsum(lens[np.asarray(rows, dtype=np.int64)]) if len(rows) else []
        return PackedEvents(self.type_ids[idx], self.mcc_ids[idx], self.numeric[idx], cu,
                            int(lens[rows].max()) if len(rows) else 0)

    @staticmethod
    def concat(parts: list[PackedEvents]) -> PackedEvents:
        lens = np.concatenate([p.lengths for p in parts])
        cu = np.zeros(len(lens) + 1, dtype=np.int32)
        cu[1:] = np.cumsum(lens)
        return PackedEvents(np.concatenate([p.type_ids for p in parts]),
                            np.concatenate([p.mcc_ids for p in parts]),
                            np.concatenate([p.numeric for p in parts]), cu,
                            max(p.max_len for p in parts))


@dataclass
class FeatureBatch:
    """Featurized valid requests. Row i came from requests[index[i]]."""
    index: list[int]
    request_ids: list[str]
    events: PackedEvents
    tabular: np.ndarray                       # float32 [B, n_applicant + n_purchase]
    warnings: list[list[pb.Warning]] = field(default_factory=list)

    @property
    def batch_size(self) -> int:
        return len(self.index)


@dataclass(frozen=True)
class Limits:
    """Request-level limits (distinct from the model's max history, which truncates)."""
    max_request_events: int = 512


def featurize(requests: list[pb.DecisionRequest], schema: FeatureSchema, enc: EncoderConfig,
              limits: Limits = Limits()) -> tuple[FeatureBatch, dict[int, InvalidRequest]]:
    """Validate and featurize each request; return the batch of valid ones and the errors by position.

    The serving path. Per request, only the envelope and tabular checks and the history lengths
    (`_tabular_row`, `_history_lists`) in Python; each history column is appended to one
    batch-wide Python list (no per-request numpy arrays). Then once for the whole batch: six
    arrays, every per-event check (`_bad_events`) and every event feature, vectorised, written
    straight into the packed arrays (when nothing is truncated and no history is empty, the
    packed token order is the concatenation itself, so no scatter). A request with any bad event
    is re-checked on its own (`_check_events`) so its error names the first offending field
    exactly as a lone request would, and is left out.

    Same validation, features, warnings and errors as `featurize_reference` (tested to the bit
    on random batches with every edge case)."""
    errors: dict[int, InvalidRequest] = {}
    index: list[int] = []
    rows: list[np.ndarray] = []
    warns: list[list[pb.Warning]] = []
    lens: list[int] = []
    as_of: list[int] = []
    ts_l: list[int] = []
    ty_l: list[int] = []
    am_l: list[int] = []
    mc_l: list[int] = []
    dp_l: list[int] = []
    in_l: list[int] = []
    for i, req in enumerate(requests):
        try:
            row, w = _tabular_row(req, schema)
            c = _history_lists(req, limits)
        except InvalidRequest as e:
            errors[i] = e
            continue
        index.append(i)
        rows.append(row)
        warns.append(w)
        n = len(c[1])
        lens.append(n)
        as_of.append(req.as_of.seconds)
        if n:
            ts_l += c[0]
            ty_l += c[1]
            am_l += c[2]
            mc_l += c[3]
            dp_l += c[4]
            in_l += c[5]
    B = len(index)
    lens_a = np.array(lens, dtype=np.int64)
    as_of_a = np.array(as_of, dtype=np.int64)
    cols = tuple(np.array(c, dtype=np.int64) for c in (ts_l, ty_l, am_l, mc_l, dp_l, in_l))
    if len(ts_l):
        seg = np.repeat(np.arange(B), lens_a)
        same_next = np.zeros(len(seg), dtype=bool)
        same_next[:-1] = seg[1:] == seg[:-1]
        ts, types, amt, mcc, dpd, inst = cols
        bad = _bad_events(ts, types, amt, mcc, dpd, inst, as_of_a[seg], same_next)
        if bad.any():
            starts = np.zeros(B + 1, np.int64)
            np.cumsum(lens_a, out=starts[1:])
            keep = np.ones(B, dtype=bool)
            for j in np.unique(seg[bad]).tolist():
                r = index[j]
                try:
                    _check_events(tuple(c[starts[j]:starts[j + 1]] for c in cols), as_of[j])
                except InvalidRequest as e:
                    errors[r] = e
                    keep[j] = False
                else:  # pragma: no cover - the vectorised and the per-request rules disagree: a bug
                    raise AssertionError(f"event checks disagree on request {requests[r].request_id!r}")
            tok = keep[seg]
            cols = tuple(c[tok] for c in cols)
            index = [r for r, k in zip(index, keep.tolist(), strict=True) if k]
            rows = [r for r, k in zip(rows, keep.tolist(), strict=True) if k]
            warns = [w for w, k in zip(warns, keep.tolist(), strict=True) if k]
            lens_a, as_of_a, B = lens_a[keep], as_of_a[keep], len(index)
            seg = np.repeat(np.arange(B), lens_a)
            same_next = np.zeros(len(seg), dtype=bool)
            same_next[:-1] = seg[1:] == seg[:-1]
    else:
        seg = np.zeros(0, np.int64)
        same_next = np.zeros(0, dtype=bool)
    events, ev_warns = _pack_fast(cols, lens_a, seg, same_next, as_of_a, enc)
    n_cols = len(schema.applicant) + schema.n_purchase
    tab = np.stack(rows).astype(np.float32) if rows else np.zeros((0, n_cols), np.float32)
    warnings = [ew + w for ew, w in zip(ev_warns, warns, strict=True)]
    return FeatureBatch(index, [requests[i].request_id for i in index], events, tab, warnings), errors


def _pack_fast(cols: tuple[np.ndarray, ...], lens: np.ndarray, seg: np.ndarray, same_next: np.ndarray,
               as_of: np.ndarray, enc: EncoderConfig) -> tuple[PackedEvents, list[list[pb.Warning]]]:
    """`_pack` over the batch's concatenated columns (seg: each event's request; same_next: the
    next event belongs to the same request). Same arithmetic, same dtypes, same results."""
    B, H = len(lens), enc.max_history
    kept = np.minimum(lens, H)
    out_lens = np.maximum(kept, 1)
    cu = np.zeros(B + 1, dtype=np.int32)
    np.cumsum(out_lens, out=cu[1:])
    T = int(cu[-1])
    warnings: list[list[pb.Warning]] = [[] for _ in range(B)]
    n_events = len(seg)
    if B and (int(lens.min()) == 0 or int(lens.max()) > H):       # an empty or a truncated history
        for b in np.flatnonzero(lens == 0).tolist():
            warnings[b].append(pb.Warning(code=pb.EMPTY_HISTORY, detail="no events"))
        for b in np.flatnonzero(lens > H).tolist():
            warnings[b].append(pb.Warning(code=pb.HISTORY_TRUNCATED,
                                          detail=f"kept the newest {H} of {lens[b]} events"))
        direct = False
    else:
        direct = True           # token t of the batch is event t of the concatenation
    type_ids = np.zeros(T, np.int64)
    mcc_ids = np.zeros(T, np.int64)
    num = np.zeros((T, enc.n_numeric), np.float32)
    if n_events:
        ts, types, amt, mcc, dpd, inst = cols
        # gap to the next older event of the same request (0 for the oldest); computed before
        # truncation so the last kept event measures its gap to the first dropped one
        gaps = np.zeros(n_events, np.float64)
        gaps[:-1] = np.where(same_next[:-1], (ts[:-1] - ts[1:]) / SECONDS_PER_DAY, 0.0)
        if direct:
            type_ids[:] = types
            mcc_ids[:] = hash_mcc(mcc, enc.mcc_buckets)
            num[:, 0] = _DIRECTION[types] * np.log1p(amt / 100.0)
            num[:, 1] = np.log1p(gaps)
            num[:, 2] = np.log1p((as_of[seg] - ts) / SECONDS_PER_DAY)
            num[:, 3] = np.minimum(np.maximum(dpd / 90.0, 0.0), 4.0)
            num[:, 4] = np.minimum(np.maximum(inst / 4.0, 0.0), 4.0)
        else:
            starts = np.zeros(B, np.int64)
            np.cumsum(lens[:-1], out=starts[1:])
            pos = np.arange(n_events) - starts[seg]
            k = pos < H
            dst = cu[:-1][seg[k]] + pos[k]
            t_k = types[k]
            type_ids[dst] = t_k
            mcc_ids[dst] = hash_mcc(mcc[k], enc.mcc_buckets)
            num[dst, 0] = _DIRECTION[t_k] * np.log1p(amt[k] / 100.0)
            num[dst, 1] = np.log1p(gaps[k])
            num[dst, 2] = np.log1p((as_of[seg[k]] - ts[k]) / SECONDS_PER_DAY)
            num[dst, 3] = np.minimum(np.maximum(dpd[k] / 90.0, 0.0), 4.0)
            num[dst, 4] = np.minimum(np.maximum(inst[k] / 4.0, 0.0), 4.0)
    return PackedEvents(type_ids, mcc_ids, num, cu, int(out_lens.max()) if B else 0), warnings


def featurize_reference(requests: list[pb.DecisionRequest], schema: FeatureSchema, enc: EncoderConfig,
                        limits: Limits = Limits()) -> tuple[FeatureBatch, dict[int, InvalidRequest]]:
    """The reference `featurize` (simpler, slower; tests compare the fast path against it).

    Per request: envelope and tabular checks, and the history columns pulled out as arrays. Then
    once for the whole batch: every per-event check and every event feature, vectorised over the
    concatenated columns. A request with any bad event is re-checked on its own (`_check_events`)
    so its error names the first offending field exactly as a lone request would.
    """
    errors: dict[int, InvalidRequest] = {}
    index: list[int] = []
    rows: list[np.ndarray] = []
    warns: list[list[pb.Warning]] = []
    cols: list[tuple[np.ndarray, ...]] = []
    for i, req in enumerate(requests):
        try:
            row, w = _tabular_row(req, schema)
            c = _columns(req, limits)
        except InvalidRequest as e:
            errors[i] = e
            continue
        index.append(i)
        rows.append(row)
        warns.append(w)
        cols.append(c)
    if cols:
        keep = _drop_bad_events(requests, index, cols, errors)
        if not keep.all():
            index = [r for r, k in zip(index, keep, strict=True) if k]
            rows = [r for r, k in zip(rows, keep, strict=True) if k]
            warns = [w for w, k in zip(warns, keep, strict=True) if k]
            cols = [c for c, k in zip(cols, keep, strict=True) if k]
    as_of = np.array([requests[i].as_of.seconds for i in index], dtype=np.int64)
    events, ev_warns = _pack(cols, as_of, enc)
    n_cols = len(schema.applicant) + schema.n_purchase
    tab = np.stack(rows).astype(np.float32) if rows else np.zeros((0, n_cols), np.float32)
    warnings = [ew + w for ew, w in zip(ev_warns, warns, strict=True)]
    return FeatureBatch(index, [requests[i].request_id for i in index], events, tab, warnings), errors


@functools.lru_cache(maxsize=16)
def _applicant_plan(schema: FeatureSchema
                    ) -> tuple[tuple[tuple[str, float, float, float, bool], ...], frozenset[str], int]:
    """(name, impute, lo, hi, required) per applicant feature, the known names and the most
    features one request may have imputed; cached per schema."""
    required = set(schema.limits.required_features)
    plan = tuple((f.name, f.impute_value, -math.inf if f.min_value is None else f.min_value,
                  math.inf if f.max_value is None else f.max_value, f.name in required) for f in schema.applicant)
    max_imputed = math.floor(schema.limits.max_imputed_share * len(plan) + 1e-9)
    return plan, frozenset(f.name for f in schema.applicant), max_imputed


@dataclass(frozen=True)
class _Envelope:
    """A schema's RequestLimits, precomputed for the per-request checks."""
    currencies: frozenset[str]
    currency_list: str
    amount_lo: int                                   # minor units, inclusive
    amount_hi: int
    amount_text: str                                 # the range in major units, for messages
    installments: dict[int, tuple[int, int, str]]    # Product number -> (min, max, name)
    products_text: str
    as_of_min: int
    as_of_max_future_s: int


@functools.lru_cache(maxsize=16)
def _envelope_plan(schema: FeatureSchema) -> _Envelope:
    lim = schema.limits
    lo, hi = lim.amount_range_minor()
    return _Envelope(
        currencies=frozenset(c for c, _ in lim.currencies), currency_list=", ".join(c for c, _ in lim.currencies),
        amount_lo=lo, amount_hi=hi, amount_text=f"[{lim.amount_min_major:g}, {lim.amount_max_major:g}] major units "
                                                f"({lo}..{hi} minor units)",
        installments={pb.Product.Value(p): (a, b, p) for p, a, b in lim.installments},
        products_text=", ".join(p for p, _, _ in lim.installments),
        as_of_min=lim.as_of_min_unix_s, as_of_max_future_s=lim.as_of_max_future_s)


def _tabular_row(req: pb.DecisionRequest, schema: FeatureSchema) -> tuple[np.ndarray, list[pb.Warning]]:
    _check_envelope(req, _envelope_plan(schema))
    plan, known, max_imputed = _applicant_plan(schema)
    feats = dict(req.features)
    if not feats.keys() <= known:
        name = min(feats.keys() - known)          # sorted: map order differs between processes
        raise InvalidRequest(f'features["{echo(name)}"]', "unknown feature (not in the bundle's feature schema "
                             f"{schema.version})")
    vals: list[float] = []
    warnings = []
    for name, impute, lo, hi, required in plan:
        v = feats.get(name)
        if v is None:
            if required:
                raise InvalidRequest(f'features["{name}"]', f"required by the bundle's feature schema "
                                     f"{schema.version} (never imputed)")
            vals.append(impute)
            warnings.append(pb.Warning(code=pb.FEATURE_IMPUTED, detail=name))
        elif math.isfinite(v) and lo <= v <= hi:
            vals.append(v)
        elif not math.isfinite(v):
            raise InvalidRequest(f'features["{name}"]', f"must be finite, got {v}")
        else:
            raise InvalidRequest(f'features["{name}"]', f"{v} is outside [{lo}, {hi}]")
    if len(warnings) > max_imputed:
        raise InvalidRequest("features", f"{len(warnings)} of {len(plan)} applicant features are missing; the "
                             f"bundle's feature schema {schema.version} imputes at most {max_imputed} "
                             f"(max_imputed_share {schema.limits.max_imputed_share:g})")
    if schema.n_purchase:
        p = req.purchase
        vals += (math.log1p(p.amount_minor / 100.0), p.installments, p.product, p.mcc // 1000)
    return np.array(vals, dtype=np.float64), warnings


def _utc(unix_s: int) -> str:
    return _dt.datetime.fromtimestamp(unix_s, _dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _check_envelope(req: pb.DecisionRequest, env: _Envelope) -> None:
    if not req.request_id:
        raise InvalidRequest("request_id", "required")
    if len(req.request_id.encode()) > MAX_REQUEST_ID_BYTES:
        raise InvalidRequest("request_id", f"longer than {MAX_REQUEST_ID_BYTES} bytes")
    if not req.HasField("as_of") or req.as_of.seconds <= 0:
        raise InvalidRequest("as_of", "required (a timestamp after 1970)")
    as_of = req.as_of.seconds
    if as_of < env.as_of_min:
        raise InvalidRequest("as_of", f"{as_of} is before {_utc(env.as_of_min)}, the earliest decision time "
                             "the bundle accepts")
    now = int(_now())
    if as_of > now + env.as_of_max_future_s:
        raise InvalidRequest("as_of", f"{as_of} is more than {env.as_of_max_future_s} s after the server's clock "
                             f"({now}, {_utc(now)}): a decision cannot be taken in the future (seconds, not ms?)")
    if not req.HasField("purchase"):
        raise InvalidRequest("purchase", "required")
    p = req.purchase
    if not is_currency_code(p.currency):
        raise InvalidRequest("purchase.currency", f"must be an ISO 4217 code like 'USD', got '{echo(p.currency)}'")
    if p.currency not in env.currencies:     # before the amount: an amount means nothing in another currency
        raise InvalidRequest("purchase.currency", f"{p.currency} is not accepted by this bundle (accepts "
                             f"{env.currency_list}; amounts are not converted)")
    if not env.amount_lo <= p.amount_minor <= env.amount_hi:
        raise InvalidRequest("purchase.amount_minor", f"must be in {env.amount_text}, got {p.amount_minor}")
    if not 0 <= p.mcc <= 9999:
        raise InvalidRequest("purchase.mcc", f"must be in 0..9999, got {p.mcc}")
    if p.product not in _VALID_PRODUCTS:
        raise InvalidRequest("purchase.product", f"unknown or unspecified product {p.product}")
    rng = env.installments.get(p.product)
    if rng is None:
        raise InvalidRequest("purchase.product", f"{pb.Product.Name(p.product)} is not offered by this bundle "
                             f"(accepts {env.products_text})")
    lo, hi, name = rng
    if not lo <= p.installments <= hi:
        want = f"{lo}" if lo == hi else f"in {lo}..{hi}"
        raise InvalidRequest("purchase.installments", f"must be {want} for {name}, got {p.installments}")


def _history_lists(req: pb.DecisionRequest, limits: Limits) -> tuple[list[int], ...]:
    """The six history columns as Python lists (newest first; a slice of a repeated field is one C
    call), after the per-request shape checks (equal column lengths, the request limit)."""
    h = req.history
    c = (h.timestamp_unix_s[:], h.type[:], h.amount_minor[:], h.mcc[:], h.days_past_due[:], h.installment_index[:])
    n = len(c[1])
    if not len(c[0]) == len(c[2]) == len(c[3]) == len(c[4]) == len(c[5]) == n:
        raise InvalidRequest("history", "columns must all have the same length, got "
                             + ", ".join(f"{name}={len(v)}" for name, v in zip(_HISTORY_COLUMNS, c, strict=True)))
    if n > limits.max_request_events:
        raise InvalidRequest("history", f"{n} events exceeds the request limit of {limits.max_request_events}")
    return c


def _columns(req: pb.DecisionRequest, limits: Limits) -> tuple[np.ndarray, ...]:
    """The six history columns as int64 arrays (newest first), after the per-request shape checks."""
    return tuple(np.array(c, dtype=np.int64) for c in _history_lists(req, limits))


def _bad_events(ts, types, amt, mcc, dpd, inst, as_of_tok, same_seg_next) -> np.ndarray:
    """Per-event: does it break any rule (see _check_events for the rules and their messages)."""
    t = np.minimum(np.maximum(types, 0), len(_VALID_TYPE) - 1)     # np.clip, without its slow wrapper
    bad = (types != t) | ~_VALID_TYPE[t]
    bad |= (ts < MIN_EVENT_UNIX_S) | (ts > as_of_tok)
    bad |= (amt < 0) | (amt > MAX_AMOUNT_MINOR) | (mcc < 0) | (mcc > 9999)
    bad |= (dpd < 0) | (dpd > MAX_DAYS_PAST_DUE) | (inst < 0) | (inst > MAX_INSTALLMENT_INDEX)
    newer_after = np.zeros(len(ts), dtype=bool)
    newer_after[1:] = (ts[1:] > ts[:-1]) & same_seg_next[:-1]
    return bad | newer_after


def _drop_bad_events(requests, index, cols, errors) -> np.ndarray:
    """Vectorised event checks for the whole batch; returns a keep mask over `index`."""
    lens = np.array([len(c[0]) for c in cols], dtype=np.int64)
    keep = np.ones(len(cols), dtype=bool)
    if lens.sum() == 0:
        return keep
    ts, types, amt, mcc, dpd, inst = (np.concatenate([c[k] for c in cols]) for k in range(6))
    seg = np.repeat(np.arange(len(cols)), lens)
    as_of = np.array([requests[i].as_of.seconds for i in index], dtype=np.int64)
    same_next = np.zeros(len(seg), dtype=bool)
    same_next[:-1] = seg[1:] == seg[:-1]
    bad = _bad_events(ts, types, amt, mcc, dpd, inst, as_of[seg], same_next)
    for j in np.unique(seg[bad]):
        r = index[j]
        try:
            _check_events(cols[j], requests[r].as_of.seconds)
        except InvalidRequest as e:
            errors[r] = e
            keep[j] = False
        else:  # pragma: no cover - the vectorised and the per-request rules disagree: a bug
            raise AssertionError(f"event checks disagree on request {requests[r].request_id!r}")
    return keep


def _check_events(c: tuple[np.ndarray, ...], as_of: int) -> None:
    """The per-event rules, in order, for one request; raises InvalidRequest naming the first bad field."""
    ts, types, amt, mcc, dpd, inst = c
    _first_bad("history.type",
               (types < 0) | (types >= len(_VALID_TYPE)) | ~_VALID_TYPE[np.clip(types, 0, len(_VALID_TYPE) - 1)],
               types, "unknown or unspecified event type")
    _first_bad("history.timestamp_unix_s", ts < MIN_EVENT_UNIX_S, ts,
               f"is before {_utc(MIN_EVENT_UNIX_S)}, the earliest event time accepted")
    _first_bad("history.timestamp_unix_s", ts > as_of, ts, f"is after as_of ({as_of})")
    if len(ts) > 1:
        bad = np.flatnonzero(ts[1:] > ts[:-1])
        if len(bad):
            i = int(bad[0]) + 1
            raise InvalidRequest(f"history.timestamp_unix_s[{i}]", "events must be newest first "
                                 f"({ts[i]} is newer than the event before it, {ts[i - 1]})")
    _first_bad("history.amount_minor", (amt < 0) | (amt > MAX_AMOUNT_MINOR), amt,
               f"must be in [0, {MAX_AMOUNT_MINOR}] (the event type gives the direction)")
    _first_bad("history.mcc", (mcc < 0) | (mcc > 9999), mcc, "must be in 0..9999")
    _first_bad("history.days_past_due", (dpd < 0) | (dpd > MAX_DAYS_PAST_DUE), dpd,
               f"must be in 0..{MAX_DAYS_PAST_DUE}")
    _first_bad("history.installment_index", (inst < 0) | (inst > MAX_INSTALLMENT_INDEX), inst,
               f"must be in 0..{MAX_INSTALLMENT_INDEX}")


def _pack(cols: list[tuple[np.ndarray, ...]], as_of: np.ndarray, enc: EncoderConfig
          ) -> tuple[PackedEvents, list[list[pb.Warning]]]:
    """Truncate to the newest enc.max_history events and compute every event feature, for the
    whole batch at once. An empty history becomes one 'no history' token (all zeros)."""
    B, H = len(cols), enc.max_history
    lens = np.array([len(c[0]) for c in cols], dtype=np.int64)
    kept = np.minimum(lens, H)
    out_lens = np.maximum(kept, 1)
    cu = np.zeros(B + 1, dtype=np.int32)
    cu[1:] = np.cumsum(out_lens)
    T = int(cu[-1])
    type_ids = np.zeros(T, np.int64)
    mcc_ids = np.zeros(T, np.int64)
    num = np.zeros((T, enc.n_numeric), np.float32)
    warnings: list[list[pb.Warning]] = [[] for _ in range(B)]
    for b in np.flatnonzero(lens == 0):
        warnings[b].append(pb.Warning(code=pb.EMPTY_HISTORY, detail="no events"))
    for b in np.flatnonzero(lens > H):
        warnings[b].append(pb.Warning(code=pb.HISTORY_TRUNCATED, detail=f"kept the newest {H} of {lens[b]} events"))
    if lens.sum():
        ts, types, amt, mcc, dpd, inst = (np.concatenate([c[k] for c in cols]) for k in range(6))
        seg = np.repeat(np.arange(B), lens)
        starts = np.zeros(B, np.int64)
        starts[1:] = np.cumsum(lens)[:-1]
        pos = np.arange(len(ts)) - starts[seg]
        # gap to the next older event of the same request (0 for the oldest); computed before
        # truncation so the last kept event measures its gap to the first dropped one
        gaps = np.zeros(len(ts), np.float64)
        same_next = np.zeros(len(ts), dtype=bool)
        same_next[:-1] = seg[1:] == seg[:-1]
        gaps[:-1] = np.where(same_next[:-1], (ts[:-1] - ts[1:]) / SECONDS_PER_DAY, 0.0)
        k = pos < H
        dst = cu[:-1][seg[k]] + pos[k]
        t_k = types[k]
        type_ids[dst] = t_k
        mcc_ids[dst] = hash_mcc(mcc[k], enc.mcc_buckets)
        num[dst, 0] = _DIRECTION[t_k] * np.log1p(amt[k] / 100.0)
        num[dst, 1] = np.log1p(gaps[k])
        num[dst, 2] = np.log1p((as_of[seg[k]] - ts[k]) / SECONDS_PER_DAY)
        num[dst, 3] = np.clip(dpd[k] / 90.0, 0.0, 4.0)
        num[dst, 4] = np.clip(inst[k] / 4.0, 0.0, 4.0)
    return PackedEvents(type_ids, mcc_ids, num, cu, int(out_lens.max()) if B else 0), warnings


def _first_bad(name: str, bad: np.ndarray, values: np.ndarray, message: str) -> None:
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise InvalidRequest(f"{name}[{i}]", f"{message}, got {values[i]}")
