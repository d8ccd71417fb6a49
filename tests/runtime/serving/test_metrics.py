"""Prometheus metrics: the accumulators against prometheus_client's own observe, and live servers
scraped after real traffic (one process; several workers through the supervisor's one scrape):
the histograms' counts equal the requests sent and every documented metric is present."""
from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import grpc
import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.parser import text_string_to_metric_families

from tests.factories import ROOT, relabelled
from tests.runtime.serving.test_supervisor import FRESH, _read_until
from uwrt.runtime.pb import pb, pb_grpc
from uwrt.runtime.serving.metrics import (
    CONDITIONAL_METRIC_NAMES,
    LATENCY_BUCKETS_S,
    METRIC_NAMES,
    SUPERVISOR_METRIC_NAMES,
    FastHistogram,
)
from uwrt.runtime.serving.ports import check_free

SERVE = [sys.executable, "-m", "uwrt.runtime.cli", "serve", "--profile", "cpu"]


def _samples(reg) -> dict[tuple, float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for fam in reg.collect() for s in fam.samples
            if not s.name.endswith("_created")}


def test_fast_histogram_matches_observe(rng):
    """The accumulator + flush (the fast path) against Histogram.observe one by one (the reference),
    on fresh random values plus every bound itself, just above and below it, 0 and values past 1 s."""
    bounds = LATENCY_BUCKETS_S
    vals = list(rng.lognormal(np.log(3e-3), 1.5, 3000))
    for b in bounds:
        vals += [b, np.nextafter(b, 0.0), np.nextafter(b, 2.0)]
    vals += [0.0, 5.0, 1e9]
    ref_reg, fast_reg = CollectorRegistry(), CollectorRegistry()
    ref = Histogram("x_seconds", "x", ["m"], buckets=bounds, registry=ref_reg)
    fast = Histogram("x_seconds", "x", ["m"], buckets=bounds, registry=fast_reg)
    for v in vals:
        ref.labels("a").observe(v)
    acc = FastHistogram(fast.labels("a"), bounds)
    half = len(vals) // 2
    acc.observe_many(vals[:half])
    acc.flush()                        # two flushes: counts add up across them
    for v in vals[half:]:
        acc.observe(v)
    acc.flush()
    acc.flush()                        # nothing new: a no-op
    r, f = _samples(ref_reg), _samples(fast_reg)
    assert r.keys() == f.keys()
    for k in r:
        assert f[k] == pytest.approx(r[k], rel=1e-12), k


def test_latency_buckets_are_log_spaced_50us_to_1s():
    b = np.array(LATENCY_BUCKETS_S)
    assert b[0] == 50e-6 and b[-1] == 1.0 and np.all(np.diff(b) > 0)
    ratios = b[1:] / b[:-1]
    assert ratios.max() < 1.3             # fine enough to read a single-digit-ms p99


def test_readme_lists_every_metric():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Operating uwrt", 1)[1].split("\n## ", 1)[0]
    missing = [n for n in {**METRIC_NAMES, **SUPERVISOR_METRIC_NAMES, **CONDITIONAL_METRIC_NAMES}
               if f"`{n}`" not in section]
    assert not missing, f"README's Operating uwrt section lacks {missing}"


# ------------------------------------------------------------------------------------------------
# live servers

def scrape(port: int) -> dict[str, list]:
    """{sample name: [(labels, value)]} from a live /metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out: dict[str, list] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def value(m: dict[str, list], name: str, **labels) -> float:
    return sum(v for lab, v in m.get(name, []) if all(lab.get(k) == x for k, x in labels.items()))


def assert_documented_present(m: dict[str, list], *, supervisor: bool) -> None:
    names = {**METRIC_NAMES, **(SUPERVISOR_METRIC_NAMES if supervisor else {})}
    missing = [n for n, kind in names.items() if (n + "_count" if kind == "histogram" else n) not in m]
    assert not missing, f"documented metrics absent from the scrape: {missing}"


class Live:
    def __init__(self, bundle, tmp_path, *extra: str) -> None:
        self.mport = check_free("127.0.0.1", 0)
        self.log = tmp_path / "serve.log"
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen([*SERVE, "--bundle", str(bundle), "--port", "0", "--metrics-port",
                                      str(self.mport), "--drift-min-decisions", "20", *extra],
                                     stdout=subprocess.PIPE, stderr=open(self.log, "w"), text=True, env=env)
        try:
            self.port = int(_read_until(self.proc, r"uwrt serving on [\d.]+:(\d+)", 300).group(1))
        except AssertionError:
            self.proc.kill()
            raise AssertionError(self.log.read_text()[-3000:]) from None

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def _poll(port: int, cond, timeout_s: float = 20.0) -> dict[str, list]:
    end = time.monotonic() + timeout_s
    while True:
        m = scrape(port)
        if cond(m) or time.monotonic() > end:
            return m
        time.sleep(0.25)


def test_single_process_scrape_counts_every_request(small_bundle, traffic, tmp_path):
    live = Live(small_bundle, tmp_path, "--workers", "1")
    try:
        ok = relabelled(traffic, "m", 60)
        bad = relabelled(traffic, "bad", 5)
        for r in bad:
            r.purchase.amount_minor = 0                       # INVALID_ARGUMENT
        streamed = relabelled(traffic, "s", 10)
        with grpc.insecure_channel(f"127.0.0.1:{live.port}") as ch:
            stub = pb_grpc.UnderwritingStub(ch)
            futs = [stub.Decide.future(r, timeout=30) for r in ok]
            got = [f.result() for f in futs]
            for r in bad:
                with pytest.raises(grpc.RpcError) as e:
                    stub.Decide(r, timeout=30)
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert len(list(stub.DecideStream(iter(streamed), timeout=30))) == 10
            stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
            stub.Explain(pb.ExplainRequest(request_id="m-3"), timeout=10)
            with pytest.raises(grpc.RpcError) as e:
                stub.Explain(pb.ExplainRequest(request_id="never-decided"), timeout=10)
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
        # drift gauges are refreshed every 5 s by the sync thread; everything else is flushed per scrape
        m = _poll(live.mport, lambda m: value(m, "uwrt_drift_window_decisions") == 70)
        dur = "uwrt_request_duration_seconds_count"
        assert value(m, dur, method="Decide", code="OK") == 60
        assert value(m, dur, method="Decide", code="INVALID_ARGUMENT") == 5
        assert value(m, dur, method="DecideStream", code="OK") == 10
        assert value(m, dur, method="Explain", code="OK") == 1
        assert value(m, dur, method="Explain", code="NOT_FOUND") == 1
        assert value(m, dur, method="GetModelInfo", code="OK") >= 1
        for code, n in (("OK", 60), ("INVALID_ARGUMENT", 5)):
            assert value(m, "uwrt_requests_total", method="Decide", code=code) == n
        decided = 70
        assert value(m, "uwrt_queue_wait_seconds_count") == decided
        assert value(m, "uwrt_batch_size_sum") == decided
        batches = value(m, "uwrt_batch_size_count")
        assert 1 <= batches <= decided
        for stage in ("featurize", "encode", "trees", "policy", "batch"):
            assert value(m, "uwrt_stage_duration_seconds_count", stage=stage) == batches
        assert value(m, "uwrt_stage_duration_seconds_count", stage="reasons") <= batches
        assert value(m, "uwrt_decisions_total") == decided
        adverse = sum(r.outcome in (pb.DECLINE, pb.COUNTEROFFER) for r in got)
        assert value(m, "uwrt_decisions_total", outcome="DECLINE") + \
            value(m, "uwrt_decisions_total", outcome="COUNTEROFFER") >= adverse
        assert value(m, "uwrt_tree_path_batches_total") == batches        # warm-up is not counted
        assert value(m, "uwrt_drift_window_decisions") == decided
        assert value(m, "uwrt_drift_enabled") == 1
        assert math.isfinite(value(m, "uwrt_drift_psi", variable="score"))
        assert value(m, "uwrt_inflight_requests") == 0
        (labels, v), = m["uwrt_bundle_info"]
        assert v == 1 and labels["bundle_digest"] == got[0].model.bundle_digest
        assert_documented_present(m, supervisor=False)
        assert "process_cpu_seconds_total" in m
    finally:
        assert live.stop() == 0


def test_metrics_port_in_use_fails_start_up(small_bundle, tmp_path):
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    try:
        p = subprocess.run([*SERVE, "--bundle", str(small_bundle), "--port", "0", "--workers", "1", "--metrics-port",
                            str(s.getsockname()[1])], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
    finally:
        s.close()
    assert p.returncode == 4, p.stderr[-2000:]
    assert re.search(r"metrics port: cannot listen on 127\.0\.0\.1:\d+", p.stderr), p.stderr[-2000:]


@pytest.mark.slow
def test_supervised_workers_reach_one_scrape(small_bundle, traffic, tmp_path):
    live = Live(small_bundle, tmp_path, "--workers", "2", "--pin-workers", "off")
    try:
        reqs = relabelled(traffic, "w", 80)
        channels = [grpc.insecure_channel(f"127.0.0.1:{live.port}", options=FRESH) for _ in range(8)]
        stubs = [pb_grpc.UnderwritingStub(c) for c in channels]
        pids = set()
        futs = [stubs[i % len(stubs)].Decide.future(r, timeout=30) for i, r in enumerate(reqs)]
        for f in futs:
            f.result()
        for s in stubs:
            pids.add(s.GetModelInfo(pb.GetModelInfoRequest(), timeout=10).settings["workers.this.pid"])
        for c in channels:
            c.close()
        # workers flush once a second; the supervisor reads their files at every scrape
        m = _poll(live.mport, lambda m: value(m, "uwrt_request_duration_seconds_count", method="Decide") >= 80
                  and value(m, "uwrt_drift_window_decisions") >= 80)
        assert value(m, "uwrt_request_duration_seconds_count", method="Decide", code="OK") == 80
        assert value(m, "uwrt_requests_total", method="Decide", code="OK") == 80
        assert value(m, "uwrt_queue_wait_seconds_count") == 80
        assert value(m, "uwrt_batch_size_sum") == 80
        assert value(m, "uwrt_decisions_total") == 80
        assert value(m, "uwrt_drift_window_decisions") == 80          # livesum over both workers
        assert value(m, "uwrt_workers", state="serving") == 2
        assert math.isfinite(value(m, "uwrt_drift_psi", variable="score"))       # pooled in the supervisor
        assert len(m["uwrt_worker_cpu_seconds_total"]) == 2
        assert len(m["uwrt_bundle_info"]) == 1                         # same labels from both: one series
        assert_documented_present(m, supervisor=True)
        # a worker killed: its counters stay in the sums, its live gauges leave the scrape
        if len(pids) == 2:
            os.kill(int(sorted(pids)[0]), signal.SIGKILL)
            m = _poll(live.mport, lambda m: value(m, "uwrt_drift_window_decisions") < 80)
            assert value(m, "uwrt_requests_total", method="Decide", code="OK") == 80
            assert value(m, "uwrt_drift_window_decisions") < 80
    finally:
        live.stop()
