"""The load generator (bench/): histogram accuracy, intended-time accounting, a short real run
against an in-process uwrt server, the multi-process mode, and the naive baseline server."""
import asyncio
import json
import math
import threading
import time
from fractions import Fraction

import grpc
import numpy as np
import pytest

from uwrt.bench import loadgen
from uwrt.bench.hist import Histogram
from uwrt.bench.loadgen import Recorder, StepSpec, drive_open, summarize
from uwrt.bench.loadgen.traffic import RequestSource, schedule
from uwrt.runtime.config import RuntimeConfig
from uwrt.runtime.pb import pb, pb_grpc
from uwrt.runtime.serving.batching import BatchingConfig

REQUIRED_KEYS = {"p50_ms", "p99_ms", "p999_ms", "achieved_rps", "target_rps", "errors"}


# ---- histogram -------------------------------------------------------------------------------

def test_histogram_percentiles_match_numpy(rng):
    for dist in ("lognormal", "uniform_small", "heavy"):
        n = int(rng.integers(1, 20000))
        if dist == "lognormal":
            x = rng.lognormal(mean=8.0, sigma=1.0, size=n)                # ~3 ms typical, us
        elif dist == "uniform_small":
            x = rng.integers(0, 2048, size=n)                              # exact range
        else:
            x = rng.pareto(1.2, size=n) * 1e3 + 1
        x = np.minimum(np.asarray(x, np.int64), (1 << 40))
        h = Histogram()
        if rng.random() < 0.5:
            h.record_many(x)
        else:
            for v in x:
                h.record(int(v))
        assert h.count == n and h.min == x.min() and h.max == x.max() and h.total == int(x.sum())
        xs = np.sort(x)
        for q in (0.1, 1, 25, 50, 90, 99, 99.9, 100):
            # nearest rank in exact arithmetic: numpy's method="inverted_cdf" (the same definition)
            # forms q/100*n in floating point and can land one rank high when it is an integer
            # (99.9/100*2000 = 1998.0000000000002 -> rank 1999; UWRT_TEST_SEED=93)
            ref = float(xs[max(1, math.ceil(Fraction(str(q)) / 100 * n)) - 1])
            got = h.percentile(q)
            # never understates; overstates by less than one bucket (2**-10 relative above 2048)
            assert ref <= got <= max(ref * (1 + 2 ** -10), ref) + 1e-9, (dist, q, ref, got)
            if ref < 2048:
                assert got == ref


def test_histogram_edges_merge_and_roundtrip(rng):
    h = Histogram()
    assert math.isnan(h.percentile(50)) and math.isnan(h.mean())
    h.record(0)
    assert h.percentile(50) == 0 and h.percentile(100) == 0
    with pytest.raises(ValueError):
        h.record(-1)
    with pytest.raises(ValueError):
        h.percentile(101)
    a, b = Histogram(), Histogram()
    xa, xb = rng.integers(1, 10 ** 6, 3000), rng.integers(1, 10 ** 7, 2000)
    a.record_many(xa)
    b.record_many(xb)
    a.add(Histogram.from_dict(json.loads(json.dumps(b.to_dict()))))
    both = np.concatenate([xa, xb])
    ref = Histogram()
    ref.record_many(both)
    assert np.array_equal(a.counts, ref.counts) and (a.min, a.max, a.total) == (ref.min, ref.max, ref.total)
    for lo in (0, 1, 2047, 2048, 2049, 4095, 4096, 123456789):
        i = int(ref.index_of(np.array([lo]))[0])
        b_lo, b_hi = ref.bucket_bounds(i)
        assert b_lo <= lo <= b_hi and (b_hi - b_lo + 1) <= max(1, lo * 2 ** -10 * 2)


def test_percentile_with_failures_counts_failures_as_unanswered():
    h = Histogram()
    h.record_many(np.arange(1, 101))                 # 100 OK samples, 1..100
    assert h.percentile_with_failures(99, 0) == h.percentile(99) == 99
    assert h.percentile_with_failures(50, 100) == 100   # rank 100 of 200: the slowest OK sample
    assert h.percentile_with_failures(99, 2) == math.inf  # rank 101 of 102 is a failure


# ---- accounting with made-up times ---------------------------------------------------------------

def test_recorder_charges_latency_from_the_intended_time():
    rec = Recorder()
    rec.on_send(10.000, 10.000)                      # on time
    rec.on_done(10.000, 10.002, "OK", (1, 2, 3, 4, 5, 15))
    rec.on_send(10.010, 10.060)                      # sent 50 ms late, answered 2 ms after the send
    rec.on_done(10.010, 10.062, "OK", (1, 2, 3, 4, 5, 15))
    rec.on_send(10.020, 10.020)
    rec.on_done(10.020, 10.030, "RESOURCE_EXHAUSTED")
    rec.on_unsent()
    r = rec.raw
    assert r.lat.count == 2 and r.lat.max == 52_000 and r.lat.min == 2_000   # 52 ms, not 2 ms
    assert r.late == 1 and r.sent == 3 and r.unsent == 1 and r.ok == 2
    assert dict(r.errors) == {"RESOURCE_EXHAUSTED": 1}
    r.scheduled, r.wall_s = 4, 1.0
    row = summarize(StepSpec(rate=4, duration_s=1.0), r)
    assert row["fell_behind"] and row["unsent"] == 1 and row["late_sends"] == 1
    assert row["max_ms"] == pytest.approx(52.0) and row["server_mean_us"]["total_us"] == 15
    assert row["p99_all_ms"] == math.inf and row["error_count"] == 1
    assert not loadgen.meets(row, 1e9)
    on_time = Recorder()
    for k in range(200):
        t = 5.0 + k * 0.01
        on_time.on_send(t, t + 0.0002)
        on_time.on_done(t, t + 0.003, "OK")
    on_time.raw.scheduled = 200
    row = summarize(StepSpec(rate=100, duration_s=2.0), on_time.raw)
    assert not row["fell_behind"] and row["p99_ms"] == pytest.approx(3.0) and loadgen.meets(row, 10)


class BlockingFakeTransport:
    """Answers after `service_s`, but first blocks the event loop for `stall_s` (a generator
    too slow for its schedule): later sends go out late."""

    def __init__(self, stall_s: float, service_s: float) -> None:
        self.stall_s, self.service_s = stall_s, service_s
        self.sent_at: list[float] = []

    async def start(self):
        pass

    async def close(self):
        pass

    async def call(self, payload, rid, timeout_s):
        self.sent_at.append(loadgen.clock())
        time.sleep(self.stall_s)                     # blocks the loop on purpose
        await asyncio.sleep(self.service_s)
        return "OK", None


def test_open_loop_late_sends_are_charged_from_intended_time_and_flagged():
    n, gap = 20, 0.005
    offs = np.arange(n) * gap
    tr = BlockingFakeTransport(stall_s=0.02, service_s=0.001)   # each send costs 4 gaps
    rec = Recorder()

    async def main():
        t0 = loadgen.clock() + 0.05
        await drive_open(tr, [b""] * n, [""] * n, offs, t0, 10.0, rec)
        return t0

    t0 = asyncio.run(main())
    r = rec.raw
    assert r.sent == n and r.ok == n
    # the last request was intended at t0 + 19 gaps but could not go before ~19 stalls had passed
    last_lag = tr.sent_at[-1] - (t0 + offs[-1])
    assert last_lag > 0.1
    assert r.lat.max / 1e6 >= last_lag                         # charged from the intended time
    r.scheduled, r.wall_s = n, 1.0
    row = summarize(StepSpec(rate=1 / gap, duration_s=n * gap), r)
    assert row["fell_behind"] and row["late_sends"] > n // 2


def test_adverse_outcomes_match_the_stubs():
    assert set(loadgen.ADVERSE_OUTCOMES) == {pb.DECLINE, pb.COUNTEROFFER}
    from uwrt.runtime.policy import ADVERSE
    assert set(loadgen.ADVERSE_OUTCOMES) == set(ADVERSE)


def test_schedule_shapes(rng):
    c = schedule(100, 2.0, "constant", rng)
    assert len(c) == 200 and np.allclose(np.diff(c), 0.01)
    parts = np.sort(np.concatenate([schedule(50, 2.0, "constant", rng, phase=p) for p in (0.0, 0.5)]))
    assert np.allclose(np.diff(parts), 0.01)                   # two phased halves = one even schedule
    p = schedule(1000, 5.0, "poisson", rng)
    assert 4500 < len(p) < 5500 and np.all(np.diff(p) >= 0) and p[-1] < 5.0
    gaps = np.diff(p)
    assert abs(gaps.std() / gaps.mean() - 1.0) < 0.15         # exponential gaps: CV ~ 1
    with pytest.raises(ValueError):
        schedule(100, 1.0, "bursty", rng)


def test_request_source_unique_ids(own_traffic):
    src = RequestSource(list(own_traffic[:7]), id_prefix="x-")
    pl = src.payloads(20, "t")
    ids = [pb.DecisionRequest.FromString(b).request_id for b in pl]
    assert ids == [f"x-t-{i}" for i in range(20)]
    assert pb.DecisionRequest.FromString(pl[8]).history == own_traffic[1].history


# ---- a real server -------------------------------------------------------------------------------------

class ThreadedServer:
    """A uwrt Server on its own event loop in a background thread (the test thread runs the generator)."""

    def __init__(self, pipe, cfg):
        from uwrt.runtime.serving.server import Server
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

        async def start():
            s = Server(pipe, cfg)
            await s.start()
            return s

        self.server = asyncio.run_coroutine_threadsafe(start(), self.loop).result(120)
        self.target = f"127.0.0.1:{self.server.port}"

    def close(self):
        asyncio.run_coroutine_threadsafe(self.server.stop(1.0), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def live_server(pipe):
    cfg = RuntimeConfig(port=0, grace_s=1.0, batching=BatchingConfig(max_batch_size=8, max_wait_us=1000))
    s = ThreadedServer(pipe, cfg)
    yield s
    s.close()


def test_short_real_run_writes_json_and_csv(live_server, tmp_path):
    out, csv_path = tmp_path / "run.json", tmp_path / "run.csv"
    rc = loadgen.main(["--target", live_server.target, "--rates", "20,40", "--duration", "1", "--warmup", "0.3",
                       "--pool", "50", "--json", str(out), "--csv", str(csv_path), "--quiet"])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["meta"]["git"] and doc["meta"]["target"] == live_server.target
    assert len(doc["steps"]) == 2
    for step, rate in zip(doc["steps"], (20, 40), strict=True):
        assert REQUIRED_KEYS <= set(step)
        assert step["target_rps"] == rate and step["errors"] == {} and step["completed"] == step["sent"] > 0
        assert 0 < step["p50_ms"] <= step["p99_ms"] <= step["p999_ms"] <= step["max_ms"]
        assert step["mean_batch_size"] is not None and step["mean_batch_size"] >= 1
        assert step["server_mean_us"]["encode_us"] > 0 and step["server_mean_us"]["total_us"] > 0
        assert 0 <= step["adverse_share"] <= 1
    lines = csv_path.read_text().splitlines()
    assert len(lines) == 3 and "p99_ms" in lines[0] and "server_mean_us.queue_us" in lines[0]


def test_jsonl_input(live_server, traffic, tmp_path):
    from uwrt.runtime.jsonl import write_jsonl
    path = tmp_path / "reqs.jsonl"
    with open(path, "w") as fh:
        write_jsonl(traffic[:5], fh)
    out = tmp_path / "j.json"
    assert loadgen.main(["--target", live_server.target, "--rate", "20", "--duration", "0.5", "--warmup", "0",
                         "--input", str(path), "--json", str(out), "--quiet"]) == 0
    step = json.loads(out.read_text())["steps"][0]
    assert step["errors"] == {} and step["completed"] == step["sent"] > 0
    missing = str(tmp_path / "missing.jsonl")
    assert loadgen.main(["--target", live_server.target, "--rate", "5", "--input", missing]) == 2


def test_stream_and_closed_loop_against_real_server(live_server, own_traffic):
    src = RequestSource(list(own_traffic[:40]))
    row = loadgen.run_step(live_server.target, StepSpec(rate=30, duration_s=1.0, rpc="stream", tag="st"), src)
    assert row["errors"] == {} and row["completed"] == row["sent"] > 10
    row = loadgen.run_step(live_server.target, StepSpec(rate=None, concurrency=3, duration_s=0.8, tag="cl"), src)
    assert row["mode"] == "closed" and row["errors"] == {} and row["completed"] > 3
    assert not row["fell_behind"]


def test_errors_are_counted_by_status_code(live_server, traffic):
    bad = pb.DecisionRequest()
    bad.CopyFrom(traffic[0])
    bad.history.type.append(99)                                 # unknown event type -> INVALID_ARGUMENT
    src = RequestSource([bad])
    row = loadgen.run_step(live_server.target, StepSpec(rate=20, duration_s=0.5, tag="bad"), src)
    assert row["completed"] == 0 and row["errors"] == {"INVALID_ARGUMENT": row["sent"]} and row["sent"] > 0
    assert row["p99_all_ms"] == math.inf


def test_generator_that_cannot_keep_up_is_flagged(live_server):
    # 200k health checks/s is far beyond one Python process: the run must say so
    row = loadgen.run_step(live_server.target, StepSpec(rate=200_000, duration_s=0.3, rpc="health",
                                                        arrivals="constant", timeout_s=0.2, tag="ff"))
    assert row["fell_behind"]
    assert row["achieved_rps"] < 200_000 * 0.9 or row["unsent"] > 0.1 * row["scheduled"]
    assert row["unsent"] + row["sent"] == row["scheduled"] == 60_000


def test_multi_process_generator_merges_workers(live_server):
    pool = loadgen.WorkerPool(2, live_server.target, dict(kind="gen", pool=30, seed=3))
    try:
        row = loadgen.run_step(live_server.target, StepSpec(rate=60, duration_s=1.0, arrivals="constant", tag="mp"),
                               pool=pool)
    finally:
        pool.close()
    assert row["procs"] == 2 and row["errors"] == {}
    assert row["scheduled"] == 60 and row["completed"] == 60    # 2 x 30 phased constant sends


def test_uwrt_cli_has_bench(live_server, tmp_path):
    from uwrt.runtime.cli.main import main
    out = tmp_path / "cli.json"
    assert main(["bench", "--target", live_server.target, "--rate", "20", "--duration", "0.5", "--warmup", "0",
                 "--pool", "20", "--json", str(out), "--quiet"]) == 0
    assert REQUIRED_KEYS <= set(json.loads(out.read_text())["steps"][0])
    assert main(["bench", "--target", "10.1.2.3:50051", "--rate", "1"]) == 2       # loopback only


# ---- the naive baseline ------------------------------------------------------------------------------

def test_naive_server_answers_like_the_pipeline(pipe, traffic):
    from uwrt.bench.naive_server import build_server
    server, port, svc, _ = build_server(pipe, port=0, workers=2)
    try:
        ch = grpc.insecure_channel(f"127.0.0.1:{port}")
        stub = pb_grpc.UnderwritingStub(ch)
        reqs = list(traffic[:40])
        offline = pipe.decide(reqs)
        for r, o in zip(reqs, offline, strict=True):
            g = stub.Decide(r, timeout=30)
            assert g.request_id == o.request_id and g.outcome == o.outcome
            assert g.probability_of_default == o.probability_of_default   # batch of 1 = same bits (batch invariant)
            assert [x.code for x in g.reasons] == [x.code for x in o.reasons]
            assert g.timing.total_us >= g.timing.encode_us > 0
        streamed = list(stub.DecideStream(iter(reqs[:10]), timeout=30))
        assert [s.request_id for s in streamed] == [r.request_id for r in reqs[:10]]
        bad = pb.DecisionRequest()
        bad.CopyFrom(reqs[0])
        bad.history.type.append(99)
        with pytest.raises(grpc.RpcError) as e:
            stub.Decide(bad, timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5)
        assert info.settings["stats.requests"] == info.settings["stats.batches"] == str(svc.requests)
        ch.close()
    finally:
        server.stop(0)


# ---- compare, plot and the Ray peer (subprocess servers) -------------------------------------------------

@pytest.mark.slow
def test_compare_runs_a_server_subprocess_and_writes_the_table(small_bundle, tmp_path):
    from uwrt.bench import compare
    out = tmp_path / "cmp"
    rc = compare.main(["--servers", "naive", "--bundle", str(small_bundle), "--rates", "20,40", "--duration", "0.7",
                       "--warmup", "0.3", "--common-rate", "40", "--refine", "0", "--pool", "30", "--out", str(out),
                       "--quiet", "--start-timeout-s", "120"])
    assert rc == 0
    doc = json.loads((out / "compare.json").read_text())
    (srv,) = doc["servers"]
    assert srv["name"] == "naive" and srv["exit_code"] == 0 and len(srv["rows"]) == 2
    assert srv["common"]["target_rps"] == 40 and srv["server_settings"]["server"].startswith("uwrt.bench.naive_server")
    assert all(REQUIRED_KEYS <= set(r) for r in srv["rows"])
    md = (out / "compare.md").read_text()
    assert "| naive |" in md and "max rate at p99 <= 10 ms" in md
    assert (out / "compare.csv").read_text().startswith("server,max_rate_at_limit")


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    from uwrt.bench.plot import plot_latency_vs_rate
    rows = [dict(target_rps=r, p50_ms=r / 100, p99_ms=r / 50, p99_all_ms=(r / 50 if r < 400 else math.inf),
                 fell_behind=r == 300) for r in (100, 200, 300, 400)]
    path = plot_latency_vs_rate({"a": rows, "b": rows[:2]}, str(tmp_path / "p.png"))
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


@pytest.mark.slow
def test_ray_peer_answers_like_the_pipeline(small_bundle, pipe, traffic):
    pytest.importorskip("ray.serve")
    from uwrt.bench.compare import ServerProcess, server_command
    srv = ServerProcess("ray", server_command("ray", str(small_bundle), ""), 300)
    try:
        ch = grpc.insecure_channel(srv.target)
        stub = pb_grpc.UnderwritingStub(ch)
        reqs = list(traffic[:12])
        for r, o in zip(reqs, pipe.decide(reqs), strict=True):
            g = stub.Decide(r, timeout=30)
            assert g.request_id == o.request_id and g.outcome == o.outcome
            assert g.probability_of_default == pytest.approx(o.probability_of_default, abs=1e-6)
        info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
        assert int(info.settings["stats.requests"]) >= 12
        ch.close()
    finally:
        assert srv.stop() == 0
