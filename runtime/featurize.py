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

import math
from dataclasses import dataclass, field

import numpy as np

from runtime.errors import InvalidRequest
from runtime.pb import pb
from runtime.schema import EncoderConfig, EVENT_TYPE_IDS, FeatureSchema

SECONDS_PER_DAY = 86400.0
MAX_REQUEST_ID_BYTES = 128
MAX_AMOUNT_MINOR = 10**12            # 10 billion in major units: anything above is an error
MAX_DAYS_PAST_DUE = 3650
MAX_INSTALLMENT_INDEX = 360
MAX_INSTALLMENTS = 360

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
    numeric:    float32 [T, n_numeric]  see runtime.schema.EVENT_NUMERIC_FEATURES
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

    def select(self, rows: list[int] | np.ndarray) -> "PackedEvents":
        """A new PackedEvents holding only the given requests, in the given order."""
        starts, lens = self.cu_seqlens[:-1], self.lengths
        idx = np.concatenate([np.arange(starts[r], starts[r] + lens[r]) for r in rows]) if len(rows) else np.zeros(0, np.int64)
        cu = np.zeros(len(rows) + 1, dtype=np.int32)
        cu[1:] = np.cumsum(lens[np.asarray(rows, dtype=np.int64)]) if len(rows) else []
        return PackedEvents(self.type_ids[idx], self.mcc_ids[idx], self.numeric[idx], cu,
                            int(lens[rows].max()) if len(rows) else 0)

    @staticmethod
    def concat(parts: list["PackedEvents"]) -> "PackedEvents":
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
    """Validate and featurize each request; return the batch of valid ones and the errors by position."""
    errors: dict[int, InvalidRequest] = {}
    index: list[int] = []
    ids: list[str] = []
    rows: list[np.ndarray] = []
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    warns: list[list[pb.Warning]] = []
    for i, req in enumerate(requests):
        try:
            row, w1 = _tabular_row(req, schema)
            ev, w2 = _events(req, enc, limits)
        except InvalidRequest as e:
            errors[i] = e
            continue
        index.append(i)
        ids.append(req.request_id)
        rows.append(row)
        parts.append(ev)
        warns.append(w2 + w1)
    lens = np.array([len(p[0]) for p in parts], dtype=np.int64)
    cu = np.zeros(len(parts) + 1, dtype=np.int32)
    cu[1:] = np.cumsum(lens)
    n_num = enc.n_numeric
    events = PackedEvents(
        type_ids=np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int64),
        mcc_ids=np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.int64),
        numeric=np.concatenate([p[2] for p in parts]) if parts else np.zeros((0, n_num), np.float32),
        cu_seqlens=cu, max_len=int(lens.max()) if len(lens) else 0)
    n_cols = len(schema.applicant) + schema.n_purchase
    tab = np.stack(rows).astype(np.float32) if rows else np.zeros((0, n_cols), np.float32)
    return FeatureBatch(index, ids, events, tab, warns), errors


def _tabular_row(req: pb.DecisionRequest, schema: FeatureSchema) -> tuple[np.ndarray, list[pb.Warning]]:
    _check_envelope(req)
    known = {f.name: f for f in schema.applicant}
    for name in req.features:
        if name not in known:
            raise InvalidRequest(f'features["{name}"]', "unknown feature (not in the bundle's feature schema "
                                 f"{schema.version})")
    out = np.empty(len(known) + schema.n_purchase, dtype=np.float64)
    warnings = []
    for j, spec in enumerate(schema.applicant):
        if spec.name in req.features:
            v = req.features[spec.name]
            if not math.isfinite(v):
                raise InvalidRequest(f'features["{spec.name}"]', f"must be finite, got {v}")
            if (spec.min_value is not None and v < spec.min_value) or (spec.max_value is not None and v > spec.max_value):
                raise InvalidRequest(f'features["{spec.name}"]',
                                     f"{v} is outside [{spec.min_value}, {spec.max_value}]")
            out[j] = v
        else:
            out[j] = spec.impute_value
            warnings.append(pb.Warning(code=pb.FEATURE_IMPUTED, detail=spec.name))
    p = req.purchase
    if schema.n_purchase:
        j = len(known)
        out[j:j + 4] = (math.log1p(p.amount_minor / 100.0), p.installments, p.product, p.mcc // 1000)
    return out, warnings


def _check_envelope(req: pb.DecisionRequest) -> None:
    if not req.request_id:
        raise InvalidRequest("request_id", "required")
    if len(req.request_id.encode()) > MAX_REQUEST_ID_BYTES:
        raise InvalidRequest("request_id", f"longer than {MAX_REQUEST_ID_BYTES} bytes")
    if not req.HasField("as_of") or req.as_of.seconds <= 0:
        raise InvalidRequest("as_of", "required (a timestamp after 1970)")
    if not req.HasField("purchase"):
        raise InvalidRequest("purchase", "required")
    p = req.purchase
    if not 0 < p.amount_minor <= MAX_AMOUNT_MINOR:
        raise InvalidRequest("purchase.amount_minor", f"must be in (0, {MAX_AMOUNT_MINOR}], got {p.amount_minor}")
    if len(p.currency) != 3 or not p.currency.isalpha() or not p.currency.isupper():
        raise InvalidRequest("purchase.currency", f"must be an ISO 4217 code like 'USD', got {p.currency!r}")
    if not 0 <= p.mcc <= 9999:
        raise InvalidRequest("purchase.mcc", f"must be in 0..9999, got {p.mcc}")
    if p.product not in _VALID_PRODUCTS:
        raise InvalidRequest("purchase.product", f"unknown or unspecified product {p.product}")
    if not 1 <= p.installments <= MAX_INSTALLMENTS:
        raise InvalidRequest("purchase.installments", f"must be in 1..{MAX_INSTALLMENTS}, got {p.installments}")


def _events(req: pb.DecisionRequest, enc: EncoderConfig, limits: Limits
            ) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], list[pb.Warning]]:
    h = req.history
    lens = {c: len(getattr(h, c)) for c in _HISTORY_COLUMNS}
    n = lens["type"]
    if len(set(lens.values())) != 1:
        raise InvalidRequest("history", "columns must all have the same length, got "
                             + ", ".join(f"{c}={v}" for c, v in lens.items()))
    if n > limits.max_request_events:
        raise InvalidRequest("history", f"{n} events exceeds the request limit of {limits.max_request_events}")
    if n == 0:
        w = [pb.Warning(code=pb.EMPTY_HISTORY, detail="no events")]
        return (np.zeros(1, np.int64), np.zeros(1, np.int64), np.zeros((1, enc.n_numeric), np.float32)), w
    ts = np.fromiter(h.timestamp_unix_s, dtype=np.int64, count=n)
    types = np.fromiter(h.type, dtype=np.int64, count=n)
    amt = np.fromiter(h.amount_minor, dtype=np.int64, count=n)
    mcc = np.fromiter(h.mcc, dtype=np.int64, count=n)
    dpd = np.fromiter(h.days_past_due, dtype=np.int64, count=n)
    inst = np.fromiter(h.installment_index, dtype=np.int64, count=n)
    as_of = req.as_of.seconds
    _first_bad("history.type", (types < 0) | (types >= len(_VALID_TYPE)) | ~_VALID_TYPE[np.clip(types, 0, len(_VALID_TYPE) - 1)],
               types, "unknown or unspecified event type")
    _first_bad("history.timestamp_unix_s", ts <= 0, ts, "must be a positive Unix time")
    _first_bad("history.timestamp_unix_s", ts > as_of, ts, f"is after as_of ({as_of})")
    if n > 1:
        bad = np.flatnonzero(ts[1:] > ts[:-1])
        if len(bad):
            i = int(bad[0]) + 1
            raise InvalidRequest(f"history.timestamp_unix_s[{i}]", "events must be newest first "
                                 f"({ts[i]} is newer than the event before it, {ts[i - 1]})")
    _first_bad("history.amount_minor", (amt < 0) | (amt > MAX_AMOUNT_MINOR), amt,
               f"must be in [0, {MAX_AMOUNT_MINOR}] (the event type gives the direction)")
    _first_bad("history.mcc", (mcc < 0) | (mcc > 9999), mcc, "must be in 0..9999")
    _first_bad("history.days_past_due", (dpd < 0) | (dpd > MAX_DAYS_PAST_DUE), dpd, f"must be in 0..{MAX_DAYS_PAST_DUE}")
    _first_bad("history.installment_index", (inst < 0) | (inst > MAX_INSTALLMENT_INDEX), inst,
               f"must be in 0..{MAX_INSTALLMENT_INDEX}")
    warnings = []
    keep = enc.max_history
    if n > keep:
        warnings.append(pb.Warning(code=pb.HISTORY_TRUNCATED, detail=f"kept the newest {keep} of {n} events"))
        # gaps need the event just older than the last kept one, so slice one further
        ts_gap = ts[:keep + 1]
        ts, types, amt, mcc, dpd, inst = ts[:keep], types[:keep], amt[:keep], mcc[:keep], dpd[:keep], inst[:keep]
        n = keep
    else:
        ts_gap = ts
    num = np.empty((n, enc.n_numeric), dtype=np.float32)
    num[:, 0] = _DIRECTION[types] * np.log1p(amt / 100.0)
    gaps = np.zeros(n, dtype=np.float64)
    m = min(n, len(ts_gap) - 1)
    gaps[:m] = (ts_gap[:m] - ts_gap[1:m + 1]) / SECONDS_PER_DAY
    num[:, 1] = np.log1p(gaps)
    num[:, 2] = np.log1p((as_of - ts) / SECONDS_PER_DAY)
    num[:, 3] = np.clip(dpd / 90.0, 0.0, 4.0)
    num[:, 4] = np.clip(inst / 4.0, 0.0, 4.0)
    return (types, hash_mcc(mcc, enc.mcc_buckets), num), warnings


def _first_bad(name: str, bad: np.ndarray, values: np.ndarray, message: str) -> None:
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise InvalidRequest(f"{name}[{i}]", f"{message}, got {values[i]}")
