"""Warm-up traffic: one batch for every (batch size x token bucket) shape the batcher can form.

The server runs these before reporting SERVING so that the first real requests do not pay
first-call costs (allocator growth, lazy initialisation; on GPU, CUDA-graph capture per
bucket). Requests are synthetic but valid for the bundle's schema.
Thread safety: pure functions.
"""
from __future__ import annotations

from collections.abc import Iterator

from uwrt.runtime.bundle.schema import EVENT_TYPE_IDS, FeatureSchema
from uwrt.runtime.pb import pb
from uwrt.runtime.serving.batching import BatchingConfig

_AS_OF = 1_750_000_000


def warmup_request(schema: FeatureSchema, n_events: int, i: int) -> pb.DecisionRequest:
    r = pb.DecisionRequest(request_id=f"warmup-{n_events}-{i}")
    r.as_of.seconds = _AS_OF
    p = r.purchase
    p.amount_minor, p.currency, p.mcc, p.product, p.installments = 12_000 + 100 * i, "USD", 5411, pb.PAY_IN_4, 4
    for f in schema.applicant:
        r.features[f.name] = f.impute_value
    h = r.history
    for k in range(n_events):
        h.timestamp_unix_s.append(_AS_OF - 86_400 * (k + 1) - i)
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
