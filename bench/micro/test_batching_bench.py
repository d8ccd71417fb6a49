"""The batching policy (runtime/serving/batching.py `plan`) per queue length, checked against its invariants."""
import pytest

from uwrt.runtime.serving.batching import BatchingConfig, CostModel, Pending, plan


def make_queue(rng, n, now_us):
    q = []
    for s in range(n):
        arrival = now_us - int(rng.integers(0, 5000))
        deadline = None if rng.random() < 0.3 else now_us + int(rng.integers(-1000, 50_000))
        q.append(Pending(seq=s, priority=int(rng.integers(0, 3)), arrival_us=arrival, deadline_us=deadline,
                         tokens=int(rng.integers(1, 300))))
    return q


@pytest.mark.parametrize("n", [1, 8, 64, 256])
def test_plan(benchmark, micro_rng, n):
    benchmark.group = "batching plan"
    now = 10_000_000
    cfg, cost = BatchingConfig(), CostModel()
    q = make_queue(micro_rng, n, now)
    p = benchmark(plan, q, now, cfg, cost, worker_free=True)
    seqs = {x.seq for x in q}
    assert set(p.dispatch) <= seqs and set(p.expire) <= seqs and not set(p.dispatch) & set(p.expire)
    assert len(p.dispatch) <= cfg.max_batch_size
    assert p.wake_at_us is None or p.wake_at_us > now
    if n and not p.expire and not p.dispatch:
        assert p.wake_at_us is not None       # something queued and nothing done: a wake-up is planned
