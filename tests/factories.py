"""Hand-built requests for tests (independent of the synthetic generator), and the repository root."""
from __future__ import annotations

import pathlib

import numpy as np

from uwrt.runtime.pb import pb

#: The repository root (tests run from a checkout).
ROOT = pathlib.Path(__file__).resolve().parents[1]
AS_OF = 1_750_000_000


def make_request(n_events: int, rng: np.random.Generator, *, request_id: str = "r", features: dict | None = None,
                 as_of: int = AS_OF) -> pb.DecisionRequest:
    """A valid request with `n_events` random (non-degenerate) events, newest first."""
    r = pb.DecisionRequest(request_id=request_id)
    r.as_of.seconds = as_of
    p = r.purchase
    p.amount_minor, p.currency, p.mcc = int(rng.integers(500, 100_000)), "USD", int(rng.integers(1000, 9999))
    p.product, p.installments = pb.PAY_IN_4, 4
    ts = np.sort(rng.integers(as_of - 3 * 365 * 86400, as_of, n_events))[::-1]
    h = r.history
    h.timestamp_unix_s.extend(int(t) for t in ts)
    h.type.extend(int(t) for t in rng.integers(1, 11, n_events))
    h.amount_minor.extend(int(a) for a in rng.integers(1, 200_000, n_events))
    h.mcc.extend(int(m) for m in rng.integers(0, 10_000, n_events))
    h.days_past_due.extend(int(d) for d in rng.integers(0, 60, n_events))
    h.installment_index.extend(int(i) for i in rng.integers(0, 5, n_events))
    for k, v in (features or {}).items():
        r.features[k] = v
    return r


def relabelled(traffic, prefix: str, n: int) -> list[pb.DecisionRequest]:
    """`n` copies of requests from `traffic` (cycled) with ids `prefix-0` .. `prefix-(n-1)`."""
    out = []
    for i in range(n):
        r = pb.DecisionRequest()
        r.CopyFrom(traffic[i % len(traffic)])
        r.request_id = f"{prefix}-{i}"
        out.append(r)
    return out
