"""The pure batching policy: hand-built queues, then hypothesis properties of every invariant.
No clocks, no sleeps: `now_us` is just a number."""
from __future__ import annotations

import random

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from uwrt.runtime.serving.batching import (
    BatchingConfig,
    CostModel,
    Pending,
    Plan,
    bucket_of,
    expiry_us,
    order_key,
    plan,
)

# predict(n, tokens) = 100 + 10 n: easy to do by hand
FLAT = CostModel(100, 10, 0)
CFG = BatchingConfig(max_batch_size=4, max_batch_tokens=100, max_wait_us=1000, length_buckets=(8, 32),
                     deadline_margin_us=50)


def req(seq, *, arrival=0, tokens=5, priority=0, deadline=None):
    return Pending(seq=seq, priority=priority, arrival_us=arrival, deadline_us=deadline, tokens=tokens)


def run(queue, now, cfg=CFG, cost=FLAT, *, free=True, flush=False):
    return plan(queue, now, cfg, cost, worker_free=free, flush=flush)


# ------------------------------------------------------------------ hand-built cases

def test_empty_queue_waits_for_arrivals():
    assert run([], 0) == Plan(dispatch=(), expire=(), wake_at_us=None)


def test_lone_request_waits_for_company_until_max_wait():
    q = [req(0, arrival=100)]
    assert run(q, 100) == Plan((), (), 1100)
    assert run(q, 1099).dispatch == ()
    assert run(q, 1100).dispatch == (0,)


def test_zero_max_wait_sends_at_once():
    cfg = BatchingConfig(max_wait_us=0)
    assert run([req(0, arrival=5)], 5, cfg).dispatch == (0,)


def test_size_cap_sends_the_first_in_order_at_once():
    q = [req(i, arrival=i) for i in range(6)]
    assert run(q, 10).dispatch == (0, 1, 2, 3)


def test_token_cap_and_oversized_request():
    q = [req(0, tokens=60), req(1, tokens=30), req(2, tokens=30)]      # buckets: 60 and 30 -> last, (8,32]
    assert run(q, 0).dispatch == (0,)       # other bucket queued: backlog, send the head alone
    q = [req(0, tokens=60), req(1, tokens=50)]                           # same (last) bucket, 110 > 100
    assert run(q, 0).dispatch == (0,)
    q = [req(0, tokens=500), req(1, tokens=40)]                          # oversized head goes alone
    assert run(q, 0).dispatch == (0,)
    assert run([req(0, tokens=500)], 0).dispatch == (0,)               # never stuck, never waits
    q = [req(0, tokens=60), req(1, tokens=40)]                           # exactly at the cap: full
    assert run(q, 0).dispatch == (0, 1)


def test_batches_hold_one_length_bucket():
    q = [req(0, tokens=5), req(1, tokens=20), req(2, tokens=8), req(3, tokens=9)]
    assert bucket_of(8, (8, 32)) == 0 and bucket_of(9, (8, 32)) == 1 and bucket_of(33, (8, 32)) == 2
    assert run(q, 0).dispatch == (0, 2)


def test_priority_first_then_fifo():
    q = [req(0, arrival=0), req(1, arrival=1, priority=2), req(2, arrival=2), req(3, arrival=3, priority=2)]
    assert run(q, 10).dispatch == (1, 3, 0, 2)
    cfg = BatchingConfig(max_batch_size=2, length_buckets=(8, 32))
    assert run(q, 10, cfg).dispatch == (1, 3)


def test_priority_aging_lets_old_low_priority_work_through():
    q = [req(0, arrival=0, priority=0, tokens=5), req(1, arrival=900, priority=1, tokens=50)]
    strict = BatchingConfig(max_wait_us=0, length_buckets=(8, 32))
    aging = BatchingConfig(max_wait_us=0, length_buckets=(8, 32), priority_aging_us=400)
    assert run(q, 1000, strict).dispatch == (1,)
    assert run(q, 1000, aging).dispatch == (0,)      # 0 has aged two levels, 1 none


def test_expiry_even_while_the_worker_is_busy():
    # predict(1) = 110: a deadline below now + 110 is unreachable
    q = [req(0, deadline=1109), req(1, deadline=1110), req(2, deadline=5000), req(3)]
    p = run(q, 1000, free=False)
    assert p.expire == (0,) and p.dispatch == ()
    assert p.wake_at_us == 1001 == expiry_us(q[1], FLAT)       # 1's deadline becomes unreachable then
    assert run(q[1:], 1001, free=False).expire == (1,)


def test_deadline_pressure_sends_before_max_wait():
    q = [req(0, arrival=0, deadline=800)]
    p = run(q, 0)
    assert p.dispatch == () and p.wake_at_us == 800 - 50 - 110     # latest safe start
    assert run(q, 639).dispatch == ()
    assert run(q, 640).dispatch == (0,)


def test_rider_that_would_break_a_deadline_stops_the_batch():
    # head alone: 110 us; with one rider 120 us. now=0, head deadline 115: the rider would make it late
    q = [req(0, deadline=115), req(1)]
    assert run(q, 0).dispatch == (0,)
    # a rider with a tight deadline is not skipped over either: the batch stops before it
    q = [req(0), req(1, deadline=115), req(2)]
    assert run(q, 0).dispatch == (0,)


def test_max_wait_counts_from_the_oldest_member_not_the_head():
    q = [req(0, arrival=0, priority=0), req(1, arrival=900, priority=1)]
    assert run(q, 999).dispatch == ()
    assert run(q, 999).wake_at_us == 1000
    assert run(q, 1000).dispatch == (1, 0)


def test_backlog_in_another_bucket_sends_now():
    q = [req(0, arrival=0, tokens=5), req(1, arrival=0, tokens=50)]
    assert run(q, 1).dispatch == (0,)


def test_flush_sends_without_waiting():
    q = [req(0, arrival=0)]
    assert run(q, 1).dispatch == ()
    assert run(q, 1, flush=True).dispatch == (0,)


def test_config_validation():
    BatchingConfig()
    with pytest.raises(ValueError):
        BatchingConfig(max_batch_size=0)
    with pytest.raises(ValueError):
        BatchingConfig(max_wait_us=-1)
    with pytest.raises(ValueError):
        BatchingConfig(length_buckets=(8, 8))
    with pytest.raises(ValueError):
        BatchingConfig(length_buckets=(0,))
    assert BatchingConfig(length_buckets=[4, 16]).length_buckets == (4, 16)


# ------------------------------------------------------------------ cost model

def test_cost_model_defaults_and_determinism():
    c = CostModel()
    assert c.predict(1, 8) == 317 and c.predict(32, 4096) == 1804      # 300 + 15 n + 0.25 t, rounded up
    a, b = CostModel(), CostModel()
    shapes = [(n, n * k) for n, k in ((1, 3), (4, 20), (16, 9), (32, 100), (2, 7))] * 5
    for n, t in shapes:
        a.observe(n, t, 50 + 30 * n + t)
        b.observe(n, t, 50 + 30 * n + t)
    assert a.coef == b.coef


def test_cost_model_learns_a_linear_cost():
    c = CostModel()
    r = random.Random(7)
    true = lambda n, t: 100 + 20 * n + 0.5 * t     # noqa: E731
    for _ in range(300):
        n = r.randint(1, 32)
        t = n * r.randint(1, 100)
        c.observe(n, t, true(n, t))
    for n, t in ((1, 5), (8, 300), (32, 3000)):
        assert abs(c.predict(n, t) - true(n, t)) <= 0.05 * true(n, t)


def test_cost_model_one_shape_only_stays_sane():
    c = CostModel()
    for _ in range(100):
        c.observe(8, 200, 100)          # cheaper than the defaults say: a negative coefficient would fit
    assert all(v >= 0 for v in c.coef)
    assert abs(c.predict(8, 200) - 100) <= 5
    assert c.predict(1, 1) <= c.predict(8, 200) <= c.predict(32, 4096)


# ------------------------------------------------------------------ properties

NOW = 100_000


@st.composite
def scenarios(draw):
    edges = tuple(sorted(set(draw(st.lists(st.integers(1, 200), max_size=3)))))   # () = one bucket
    cfg = BatchingConfig(max_batch_size=draw(st.integers(1, 8)), max_batch_tokens=draw(st.integers(1, 1000)),
                         max_wait_us=draw(st.integers(0, 3000)), length_buckets=edges,
                         deadline_margin_us=draw(st.integers(0, 500)),
                         priority_aging_us=draw(st.sampled_from([0, 0, 700, 5000])))
    cost = CostModel(draw(st.integers(0, 500)), draw(st.integers(0, 60)), draw(st.sampled_from([0.0, 0.1, 0.5, 2.0])))
    for n, t, us in draw(st.lists(st.tuples(st.integers(1, 8), st.integers(1, 400), st.integers(0, 3000)), max_size=3)):
        cost.observe(n, t, us)
    n = draw(st.one_of(st.integers(0, 4), st.integers(0, 20)))   # short queues are where waiting happens
    span = draw(st.sampled_from([0, 300, 1500, 5000]))          # how far back arrivals go
    arrivals = sorted(draw(st.lists(st.integers(NOW - span, NOW), min_size=n, max_size=n)))
    queue = [Pending(seq=3 * i + 1, priority=draw(st.integers(0, 2)), arrival_us=a,
                     deadline_us=draw(st.one_of(st.none(), st.none(), st.integers(a - 100, a + 8000),
                                                st.integers(NOW, NOW + 4000))),
                     tokens=draw(st.one_of(st.integers(1, 40), st.integers(1, 300))))
             for i, a in enumerate(arrivals)]
    queue = draw(st.permutations(queue))
    free = draw(st.sampled_from([True, True, True, False]))      # worker_free
    flush = draw(st.sampled_from([False, False, False, True]))
    return cfg, cost, queue, free, flush


def check_invariants(cfg, cost, queue, now, free, flush, p):
    by_seq = {q.seq: q for q in queue}
    d, e = p.dispatch, p.expire
    # no loss, no duplicates: dispatch + expire + remaining == queue
    assert len(set(d)) == len(d) and len(set(e)) == len(e) and not set(d) & set(e)
    assert set(d) | set(e) <= by_seq.keys()
    remaining = [q for q in queue if q.seq not in set(d) | set(e)]
    # expired == exactly those whose deadline is unreachable, busy or not
    unreachable = {q.seq for q in queue
                   if q.deadline_us is not None and q.deadline_us < now + cost.predict(1, q.tokens)}
    assert set(e) == unreachable
    assert list(e) == sorted(e)
    if not free:
        assert d == ()
    batch = [by_seq[s] for s in d]
    live = sorted(remaining + batch, key=lambda q: order_key(q, now, cfg))
    if batch:
        tokens = sum(q.tokens for q in batch)
        assert len(batch) <= cfg.max_batch_size
        assert tokens <= cfg.max_batch_tokens or len(batch) == 1
        # nobody dispatched who is predicted to miss their deadline in this very batch
        for q in batch:
            assert q.deadline_us is None or now + cost.predict(len(batch), tokens) <= q.deadline_us
        # the head is the first in priority order; the batch is a prefix of its bucket in order
        # (so FIFO within a priority and bucket, and priority order within a bucket)
        assert batch[0] is live[0]
        b = bucket_of(batch[0].tokens, cfg.length_buckets)
        same_bucket = [q for q in live if bucket_of(q.tokens, cfg.length_buckets) == b]
        assert batch == same_bucket[:len(batch)]
    # nobody waits past max_wait while the worker is free; flush never waits
    if free and live and (flush or any(now - q.arrival_us >= cfg.max_wait_us for q in live)):
        assert batch
    # wake-ups are in the future, and early enough to expire and to honour max_wait
    if p.wake_at_us is not None:
        assert p.wake_at_us > now
    for q in remaining:
        if q.deadline_us is not None:
            assert p.wake_at_us is not None and p.wake_at_us <= expiry_us(q, cost)
    if free and live and not batch:
        # waiting: wake no later than max_wait of the oldest, nor the latest safe start of the batch
        # that would form (while waiting, every live request is in it)
        assert p.wake_at_us is not None and p.wake_at_us <= min(q.arrival_us for q in live) + cfg.max_wait_us
        run_us = cost.predict(len(live), sum(q.tokens for q in live))
        for q in live:
            if q.deadline_us is not None:
                assert p.wake_at_us <= q.deadline_us - cfg.deadline_margin_us - run_us
        event("waited")
    return remaining, batch


@settings(max_examples=250, deadline=None)
@given(scenarios())
def test_plan_invariants(sc):
    cfg, cost, queue, free, flush = sc
    coef = cost.coef
    p = plan(queue, NOW, cfg, cost, worker_free=free, flush=flush)
    assert cost.coef == coef                                       # pure: the model is only read
    assert plan(queue, NOW, cfg, cost, worker_free=free, flush=flush) == p   # deterministic
    remaining, batch = check_invariants(cfg, cost, queue, NOW, free, flush, p)
    if p.wake_at_us is not None:
        # no idle wake-up: at wake_at, with nothing else happening, something is sent or expired
        free_then = free and not batch
        p2 = plan(remaining, p.wake_at_us, cfg, cost, worker_free=free_then, flush=flush)
        assert p2.dispatch or p2.expire
        check_invariants(cfg, cost, remaining, p.wake_at_us, free_then, flush, p2)


@settings(max_examples=100, deadline=None)
@given(scenarios(), st.integers(0, 5000))
def test_plan_invariants_later(sc, dt):
    """The same queue seen later (requests may have expired or waited past max_wait)."""
    cfg, cost, queue, free, flush = sc
    p = plan(queue, NOW + dt, cfg, cost, worker_free=free, flush=flush)
    check_invariants(cfg, cost, queue, NOW + dt, free, flush, p)


@settings(max_examples=100, deadline=None)
@given(scenarios())
def test_repeated_planning_drains_every_request(sc):
    """Driving plan to completion (batches take their predicted time) answers every request once."""
    cfg, cost, queue, _, _ = sc
    now, pending, seen = NOW, list(queue), []
    for _ in range(4 * len(queue) + 2):
        if not pending:
            break
        p = plan(pending, now, cfg, cost, worker_free=True)
        seen += list(p.dispatch) + list(p.expire)
        gone = set(p.dispatch) | set(p.expire)
        batch = [q for q in pending if q.seq in p.dispatch]
        pending = [q for q in pending if q.seq not in gone]
        if batch:
            now += cost.predict(len(batch), sum(q.tokens for q in batch))
        elif not p.expire:
            assert p.wake_at_us is not None and p.wake_at_us > now
            now = p.wake_at_us
    assert not pending
    assert sorted(seen) == sorted(q.seq for q in queue)


def test_closed_form_solve_matches_elimination(rng):
    """The cost model's 1-3 variable solves (closed forms, once per batch) == Gaussian elimination,
    on random well-conditioned normal equations like the fit's (and both refuse singular ones)."""
    from uwrt.runtime.serving.batching import _solve, _solve_elimination
    for _ in range(300):
        n = int(rng.integers(1, 4))
        x = rng.normal(size=(20, n)) * rng.uniform(0.1, 1000, n)
        a = (x.T @ x).tolist()
        b = (x.T @ rng.normal(size=20) * 100).tolist()
        got, want = _solve(a, b), _solve_elimination(a, b)
        assert got is not None and want is not None
        assert got == pytest.approx(want, rel=1e-6, abs=1e-9)
    assert _solve([[1.0, 2.0], [2.0, 4.0]], [1.0, 2.0]) is None
    assert _solve([[0.0]], [1.0]) is None
    assert _solve([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]], [1.0, 1.0, 1.0]) is None
