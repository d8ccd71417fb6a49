"""Deadline-aware dynamic batching policy: a pure function of (queue state, now) -> Plan.

No asyncio, no clock, no I/O: `uwrt.runtime.serving.batcher.Batcher` feeds `plan()` the queue and the time,
then carries out the returned Plan. Tests pass hand-built queues and made-up times.

Semantics of `plan(queue, now_us, cfg, cost, worker_free=..., flush=...)`:

1. Expire. A request is expired when its deadline is already unreachable by the cost model:
   `deadline_us < now_us + cost.predict(1, tokens)`. Expired requests go to `Plan.expire`
   (fail them with DEADLINE_EXCEEDED) and are never dispatched. This is computed whether or
   not the worker is free: unlike Triton, which sweeps expired requests only when an instance
   frees up, a request that cannot make it is failed as soon as the driver wakes.
2. Order. The live (non-expired) requests are ordered by effective priority descending, then
   arrival order (`seq`). Effective priority is `priority`, plus one level per
   `priority_aging_us` waited when aging is on. With aging off (the default) priorities are
   strict: a steady stream of high-priority work starves lower levels (as in Triton).
3. Form the candidate batch (only when `worker_free`). The first request in order is the head.
   Walk the later requests in order, considering only those in the head's length bucket
   (`bucket_of`: index of the first edge >= tokens, one extra bucket past the last edge), and
   append each while (a) the batch stays <= `max_batch_size` requests, (b) the token sum stays
   <= `max_batch_tokens`, and (c) every member with a deadline is still predicted to finish in
   time, `now + cost.predict(size, tokens) <= deadline`. The walk stops at the first candidate
   that does not fit (it never skips one, so FIFO holds within a priority and a bucket); such a
   stop marks the batch full. A head larger than `max_batch_tokens` goes alone (never stuck).
   Lower-priority requests of the head's bucket may ride along behind higher-priority ones.
4. Dispatch the candidate now if any of:
   - full: `max_batch_size` reached, or the next same-bucket candidate did not fit (3a-c);
   - max wait: its oldest member has waited >= `max_wait_us` (0 = never wait for company);
   - deadline pressure: for some member, `now + cost.predict(batch) >= deadline - deadline_margin_us`
     (its latest safe start has come);
   - backlog: some live request is not in the batch (other bucket, or cut by a cap): the worker
     would idle while work is ready, and waiting cannot grow this batch in a useful way;
   - flush: the caller says no more arrivals will come (draining).
   Otherwise nothing is dispatched and the driver should call again at `wake_at_us`.
5. `wake_at_us` is the earliest of: each remaining request's expiry time
   (`deadline - predict(1, tokens) + 1`), and, when the worker is free and the batch waits, its
   oldest member's `arrival + max_wait_us` and each member's latest safe start
   (`deadline - deadline_margin_us - predict(batch)`). It is always > now_us. None means: nothing
   to do until an arrival or a batch completion. Calling `plan` again at `wake_at_us` with the
   same queue always dispatches or expires something (no idle wake-ups).

Invariants (property-tested in tests/runtime/serving/test_batching.py): size and token caps (one oversized
request alone excepted); nobody waits past `max_wait_us` while the worker is free; nobody
dispatched or left queued is already unreachable; dispatch + expire + remaining == queue;
FIFO within a priority and bucket; the head is the first request in priority order.

Cost: O(n log n) in the queue length per call (a sort), O(batch) cost-model evaluations.
Thread safety: `plan` is pure (it reads `cost` and never mutates it); `CostModel.observe`
mutates, so call both from one thread (the batcher's event loop).
"""
from __future__ import annotations

import bisect
import math
import operator
from collections.abc import Iterable
from dataclasses import dataclass

from uwrt.runtime.config import BatchingConfig

__all__ = ["BatchingConfig", "Pending", "Plan", "CostModel", "bucket_of", "expiry_us", "plan"]


@dataclass(frozen=True, slots=True)
class Pending:
    """One queued request, as the policy sees it."""
    seq: int                    # arrival order: unique, increasing
    priority: int               # higher first
    arrival_us: int             # when it was queued (the batcher's clock)
    deadline_us: int | None     # absolute, same clock; None = no deadline
    tokens: int                 # encoder tokens (>= 1)


@dataclass(frozen=True, slots=True)
class Plan:
    """What the driver should do now."""
    dispatch: tuple[int, ...]   # seqs to run now as one batch, in batch order (empty: none)
    expire: tuple[int, ...]     # seqs that can no longer finish in time: fail with DEADLINE_EXCEEDED
    wake_at_us: int | None      # call plan() again then if nothing else happens (None: only on an event)


class CostModel:
    """Predicted batch service time: `fixed_us + per_request_us * size + per_token_us * tokens`.

    `observe(size, tokens, us)` refits the three coefficients by exponentially weighted least
    squares: each observation's weight decays by `1 - alpha` per later observation (memory of
    roughly 1/alpha batches). A small fixed prior (pseudo-observations of the default model at
    three anchor shapes, total weight `prior_weight`, never decayed) keeps the fit well posed
    when every batch has the same shape, and makes the untrained model equal the defaults.
    The fit is constrained to coefficients >= 0 (an exact 3-variable NNLS) so predictions never
    shrink as a batch grows.
    Deterministic: the same observations give the same coefficients.

    Thread safety: not thread-safe; predict/observe from one thread (the batcher's loop).
    """

    ANCHORS = ((1, 8), (8, 256), (32, 4096))

    def __init__(self, fixed_us: float = 300.0, per_request_us: float = 15.0, per_token_us: float = 0.25, *,
                 alpha: float = 0.05, prior_weight: float = 0.01) -> None:
        if min(fixed_us, per_request_us, per_token_us) < 0 or not 0 < alpha <= 1 or prior_weight <= 0:
            raise ValueError("coefficients must be >= 0, 0 < alpha <= 1, prior_weight > 0")
        self.alpha = alpha
        self.coef = (float(fixed_us), float(per_request_us), float(per_token_us))
        self.observations = 0
        w = prior_weight / len(self.ANCHORS)
        self._prior_xx = [[0.0] * 3 for _ in range(3)]
        self._prior_xy = [0.0] * 3
        for n, t in self.ANCHORS:
            self._accumulate(self._prior_xx, self._prior_xy, (1.0, n, t), self._raw(n, t), w)
        self._xx = [[0.0] * 3 for _ in range(3)]   # decayed sum of w x x^T over observations
        self._xy = [0.0] * 3                       # decayed sum of w x y

    def _raw(self, batch_size: int, tokens: int) -> float:
        a, b, c = self.coef
        return a + b * batch_size + c * tokens

    def predict(self, batch_size: int, tokens: int) -> int:
        """Predicted service time in whole microseconds (rounded up), >= 0."""
        return max(0, math.ceil(self._raw(batch_size, tokens)))

    @staticmethod
    def _accumulate(xx: list[list[float]], xy: list[float], x: tuple[float, ...], y: float, w: float) -> None:
        for i in range(3):
            xy[i] += w * x[i] * y
            for j in range(3):
                xx[i][j] += w * x[i] * x[j]

    def observe(self, batch_size: int, tokens: int, us: float) -> None:
        """Record one measured batch (size, token sum, wall microseconds) and refit."""
        if batch_size < 1 or us < 0:
            return
        keep = 1.0 - self.alpha
        for i in range(3):
            self._xy[i] *= keep
            for j in range(3):
                self._xx[i][j] *= keep
        self._accumulate(self._xx, self._xy, (1.0, float(batch_size), float(tokens)), float(us), 1.0)
        self.observations += 1
        a = [[self._xx[i][j] + self._prior_xx[i][j] for j in range(3)] for i in range(3)]
        b = [self._xy[i] + self._prior_xy[i] for i in range(3)]
        self.coef = _nnls3(a, b, self.coef)

    def __repr__(self) -> str:
        a, b, c = self.coef
        return f"CostModel(fixed_us={a:.1f}, per_request_us={b:.2f}, per_token_us={c:.4f}, n={self.observations})"


def _nnls3(a: list[list[float]], b: list[float], fallback: tuple[float, float, float]) -> tuple[float, float, float]:
    """argmin over theta >= 0 of theta^T a theta - 2 b^T theta (a: 3x3 positive definite), by
    trying every set of free coefficients (the rest held at 0) and keeping the best feasible one."""
    best, best_val = fallback, math.inf
    for free in ((0, 1, 2), (0, 1), (0, 2), (1, 2), (0,), (1,), (2,)):
        sol = _solve([[a[i][j] for j in free] for i in free], [b[i] for i in free])
        if sol is None or min(sol) < 0:
            continue
        val = -sum(b[i] * v for i, v in zip(free, sol, strict=True))   # objective value at the restricted optimum
        if val < best_val:
            theta = [0.0, 0.0, 0.0]
            for i, v in zip(free, sol, strict=True):
                theta[i] = v
            best, best_val = (theta[0], theta[1], theta[2]), val
        if len(free) == 3:
            break            # the unconstrained optimum is feasible: it is the answer
    return best


def _solve(a: list[list[float]], b: list[float]) -> list[float] | None:
    """Solve a x = b (a symmetric positive semi-definite, n <= 3 here); None if (numerically)
    singular. Closed forms (Cramer's rule) for n <= 3, which runs once per batch on the event
    loop: ~5x cheaper than elimination in Python; `_solve_elimination` is the reference."""
    n = len(b)
    if n == 1:
        x = [b[0] / a[0][0]] if abs(a[0][0]) >= 1e-12 else None
    elif n == 2:
        det = a[0][0] * a[1][1] - a[0][1] * a[1][0]
        if abs(det) < 1e-12 * max(1.0, abs(a[0][0] * a[1][1])):
            return None
        x = [(b[0] * a[1][1] - a[0][1] * b[1]) / det, (a[0][0] * b[1] - b[0] * a[1][0]) / det]
    elif n == 3:
        (p, q, r), (s, t, u), (v, w, y) = a
        c0, c1, c2 = t * y - u * w, u * v - s * y, s * w - t * v          # cofactors of the first row
        det = p * c0 + q * c1 + r * c2
        if abs(det) < 1e-12 * max(1.0, abs(p * t * y)):
            return None
        b0, b1, b2 = b
        x = [(b0 * c0 + q * (u * b2 - b1 * y) + r * (b1 * w - t * b2)) / det,
             (p * (b1 * y - u * b2) + b0 * c1 + r * (s * b2 - b1 * v)) / det,
             (p * (t * b2 - b1 * w) + q * (b1 * v - s * b2) + b0 * c2) / det]
    else:
        return _solve_elimination(a, b)
    return x if x is not None and all(math.isfinite(v) for v in x) else None


def _solve_elimination(a: list[list[float]], b: list[float]) -> list[float] | None:
    """Solve a x = b by Gaussian elimination with partial pivoting; None if (numerically) singular."""
    n = len(b)
    m = [row[:] + [b[i]] for i, row in enumerate(a)]
    for col in range(n):
        piv = max(range(col, n), key=lambda r: abs(m[r][col]))
        if abs(m[piv][col]) < 1e-12:
            return None
        m[col], m[piv] = m[piv], m[col]
        for r in range(col + 1, n):
            f = m[r][col] / m[col][col]
            for k in range(col, n + 1):
                m[r][k] -= f * m[col][k]
    x = [0.0] * n
    for r in reversed(range(n)):
        x[r] = (m[r][n] - sum(m[r][k] * x[k] for k in range(r + 1, n))) / m[r][r]
    return x if all(math.isfinite(v) for v in x) else None


def bucket_of(tokens: int, edges: tuple[int, ...]) -> int:
    """Index of the first edge >= tokens; len(edges) (the last bucket) when tokens exceed them all."""
    return bisect.bisect_left(edges, tokens)


def expiry_us(p: Pending, cost: CostModel) -> int:
    """First time at which `p` counts as expired (its deadline is then unreachable)."""
    return p.deadline_us - cost.predict(1, p.tokens) + 1  # type: ignore[operator]


def order_key(p: Pending, now_us: int, cfg: BatchingConfig) -> tuple[int, int]:
    """Sort key: effective priority descending, then arrival order."""
    prio = p.priority
    if cfg.priority_aging_us:
        prio += max(0, now_us - p.arrival_us) // cfg.priority_aging_us
    return (-prio, p.seq)


def plan(queue: Iterable[Pending], now_us: int, cfg: BatchingConfig, cost: CostModel, *,
         worker_free: bool, flush: bool = False) -> Plan:
    """Decide what to do now; see the module docstring for the exact rules.

    `queue` holds every queued (not dispatched) request, in any order, seqs unique (arrival
    order is cheapest). `worker_free`: no batch is running. `flush`: no more arrivals will come
    (draining), so do not wait for company. Pure: reads `cost`, mutates nothing.
    """
    # 1. expire: deadline < now + predict(1, tokens), inlined (this loop runs on every event)
    a, b, c = cost.coef
    a1 = a + b * 1
    expire: list[int] = []
    live: list[Pending] = []
    expiries: list[tuple[int, int]] = []      # (expiry time, seq) of live requests with a deadline
    for p in queue:
        d = p.deadline_us
        if d is not None:
            ex = d - max(0, math.ceil(a1 + c * p.tokens)) + 1   # == expiry_us(p, cost)
            if now_us >= ex:
                expire.append(p.seq)
                continue
            expiries.append((ex, p.seq))
        live.append(p)
    expire.sort()
    next_expiry = min(expiries)[0] if expiries else None
    if not (worker_free and live):
        return Plan(dispatch=(), expire=tuple(expire), wake_at_us=next_expiry)

    # 2. order: effective priority descending, then seq (two stable C-level sorts when no aging)
    if cfg.priority_aging_us:
        live.sort(key=lambda p: order_key(p, now_us, cfg))
    else:
        live.sort(key=_SEQ)
        live.sort(key=_PRIORITY, reverse=True)

    # 3. the candidate batch: the head, then same-bucket requests in order while they fit
    head = live[0]
    edges = cfg.length_buckets
    bucket = bucket_of(head.tokens, edges)
    batch = [head]
    tokens = head.tokens
    min_deadline = head.deadline_us            # tightest deadline in the batch (None: none)
    full = tokens >= cfg.max_batch_tokens or cfg.max_batch_size == 1
    if not full:
        for p in live[1:]:
            if bucket_of(p.tokens, edges) != bucket:
                continue
            t = tokens + p.tokens
            d = p.deadline_us if min_deadline is None else (
                min_deadline if p.deadline_us is None else min(min_deadline, p.deadline_us))
            if t > cfg.max_batch_tokens or (d is not None and now_us + cost.predict(len(batch) + 1, t) > d):
                full = True                      # the next in line does not fit: never skip it
                break
            batch.append(p)
            tokens, min_deadline = t, d
            if len(batch) >= cfg.max_batch_size or tokens >= cfg.max_batch_tokens:
                full = True
                break

    # 4. dispatch now, or wait for company until the earliest reason to act
    oldest_us = min(p.arrival_us for p in batch)
    safe_start = None            # latest start at which every member still ends deadline_margin_us early
    if min_deadline is not None:
        safe_start = min_deadline - cfg.deadline_margin_us - cost.predict(len(batch), tokens)
    if (full or flush or len(batch) < len(live) or now_us - oldest_us >= cfg.max_wait_us
            or (safe_start is not None and now_us >= safe_start)):
        sent = {p.seq for p in batch}
        wake = min((ex for ex, seq in expiries if seq not in sent), default=None)
        return Plan(dispatch=tuple(p.seq for p in batch), expire=tuple(expire), wake_at_us=wake)
    wake = oldest_us + cfg.max_wait_us
    for w in (safe_start, next_expiry):
        if w is not None and w < wake:
            wake = w
    return Plan(dispatch=(), expire=tuple(expire), wake_at_us=wake)


_SEQ = operator.attrgetter("seq")
_PRIORITY = operator.attrgetter("priority")
