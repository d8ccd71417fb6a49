"""Warm-up traffic: one batch for every (batch size x token bucket) shape the batcher can form.

The server runs these before reporting SERVING so that the first real requests do not pay
first-call costs (allocator growth, lazy initialisation; on GPU, CUDA-graph capture per
bucket). Requests are synthetic but valid for the bundle's schema and request limits (its first accepted
currency, a product it decides at its smallest installment count, an amount inside its range, an
as_of no earlier than its lower bound, every applicant feature present).
Thread safety: pure functions.
"""
from __future__ import annotations

from collections.abc import Iterator

from uwrt.runtime.bundle.schema import EVENT_TYPE_IDS, FeatureSchema
from uwrt.runtime.pb import pb
from uwrt.runtime.serving.batching import BatchingConfig

_AS_OF = 1_750_000_000
_DAY_S = 86_400


def warmup_request(schema: FeatureSchema, n_events: int, i: int) -> pb.DecisionRequest:
    lim = schema.limits
    # late enough that every event (one a day, newest first) stays after the earliest as_of
    as_of = max(_AS_OF, lim.as_of_min_unix_s + _DAY_S * (n_events + 2))
    lo, hi = lim.amount_range_minor()
    product, n_inst, _ = lim.installments[0]
    r = pb.DecisionRequest(request_id=f"warmup-{n_events}-{i}")
    r.as_of.seconds = as_of
    p = r.purchase
    p.amount_minor = min(hi, max(lo, 12_000 + 100 * i))
    p.currency, p.mcc, p.product, p.installments = lim.currencies[0][0], 5411, pb.Product.Value(product), n_inst
    for f in schema.applicant:
        r.features[f.name] = f.impute_value
    h = r.history
    for k in range(n_events):
        h.timestamp_unix_s.append(as_of - _DAY_S * (k + 1) - i)
        h.type.append(EVENT_TYPE_IDS[(k + i) % len(EVENT_TYPE_IDS)])
        h.amount_minor.append(1_000 + 37 * k)
        h.mcc.append(5411 + k % 7)
        h.days_past_due.append(k % 5)
        h.installment_index.append(k % 5)
    return r


def warmup_shapes(max_history: int, cfg: BatchingConfig) -> list[tuple[int, int]]:
    """(batch size, events per request) pairs: each length bucket at batch 1 and at the largest
    batch the caps allow for it."""
    lengths = sorted({min(L, max_history) for L in (*cfg.length_buckets, max_history)})
    shapes = []
    for L in lengths:
        full = max(1, min(cfg.max_batch_size, cfg.max_batch_tokens // max(L, 1)))
        shapes += [(1, L)] + ([(full, L)] if full > 1 else [])
    return shapes


def warmup_batches(schema: FeatureSchema, max_history: int, cfg: BatchingConfig) -> Iterator[list[pb.DecisionRequest]]:
    for bs, L in warmup_shapes(max_history, cfg):
        yield [warmup_request(schema, L, i) for i in range(bs)]
