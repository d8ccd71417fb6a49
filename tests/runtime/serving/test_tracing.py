"""OpenTelemetry tracing (runtime/serving/tracing.py): a live in-process server with an in-memory
exporter; one root span per request with a child span per stage and the batch's id and size as
attributes; sampling by ratio (the exact draws of the seeded generator); off = no tracer, no spans."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import grpc
import numpy as np
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.factories import ROOT, relabelled
from uwrt.runtime.config import RuntimeConfig
from uwrt.runtime.pb import pb, pb_grpc
from uwrt.runtime.serving.batching import BatchingConfig
from uwrt.runtime.serving.server import Server
from uwrt.runtime.serving.tracing import Tracing

CFG = RuntimeConfig(port=0, grace_s=5.0, batching=BatchingConfig(max_batch_size=8, max_queue=1024,
                                                                 max_queue_delay_us=60_000_000))
STAGES = {"queue", "featurize", "encode", "trees", "policy"}


def _serve(pipe, reqs, tracing: Tracing | None, cfg: RuntimeConfig = CFG, stream: bool = False):
    async def main():
        server = Server(pipe, cfg)
        if tracing is not None:
            server.rt.obs.tracing = tracing          # an in-memory exporter instead of cfg's
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
                stub = pb_grpc.UnderwritingStub(ch)
                if stream:
                    got = [r async for r in stub.DecideStream(iter(reqs), timeout=60)]
                else:
                    got = await asyncio.gather(*(stub.Decide(r, timeout=60) for r in reqs))
            return list(got), server.rt.obs
        finally:
            await server.stop(1.0)
    return asyncio.run(main())


def test_every_request_traced_at_ratio_one(pipe, traffic):
    exporter = InMemorySpanExporter()
    reqs = relabelled(traffic, "tr", 40)
    got, obs = _serve(pipe, reqs, Tracing(1.0, exporter, simple=True))
    spans = exporter.get_finished_spans()
    roots = [s for s in spans if s.parent is None]
    assert sorted(s.attributes["uwrt.request_id"] for s in roots) == sorted(r.request_id for r in reqs)
    assert all(s.name == "uwrt.Decide" for s in roots)
    by_id = {r.request_id: r for r in got}
    children: dict[int, list] = {}
    for s in spans:
        if s.parent is not None:
            children.setdefault(s.parent.span_id, []).append(s)
    batches: dict[int, set[str]] = {}
    for root in roots:
        a = root.attributes
        resp = by_id[a["uwrt.request_id"]]
        assert a["uwrt.outcome"] == pb.Outcome.Name(resp.outcome)
        assert a["rpc.method"] == "Decide" and a["uwrt.bundle_digest"] == resp.model.bundle_digest[:12]
        assert 1 <= a["uwrt.batch.size"] <= CFG.batching.max_batch_size
        batches.setdefault(a["uwrt.batch.id"], set()).add(a["uwrt.request_id"])
        kids = children[root.context.span_id]
        names = {k.name for k in kids}
        adverse = resp.outcome in (pb.DECLINE, pb.COUNTEROFFER)
        # reasons: a child only when the batch computed TreeSHAP (some member was adverse)
        assert STAGES <= names <= STAGES | {"reasons"}
        if adverse:
            assert "reasons" in names
        for k in kids:
            assert k.context.trace_id == root.context.trace_id
            assert root.start_time <= k.start_time <= k.end_time <= root.end_time, k.name
        stage = {k.name: k for k in kids}
        order = ["featurize", "encode", "trees", "policy"]
        for x, y in zip(order, order[1:], strict=False):       # back to back, in pipeline order
            assert stage[x].end_time <= stage[y].start_time
        assert stage["queue"].end_time <= stage["featurize"].start_time
    for members in batches.values():       # every member of a batch reports that batch's size
        sizes = {r.attributes["uwrt.batch.size"] for r in roots if r.attributes["uwrt.request_id"] in members}
        assert sizes == {len(members)}
    assert obs.tracing.sampled == len(reqs)


def test_stream_messages_are_traced(pipe, traffic):
    exporter = InMemorySpanExporter()
    reqs = relabelled(traffic, "st", 12)
    _serve(pipe, reqs, Tracing(1.0, exporter, simple=True), stream=True)
    roots = [s for s in exporter.get_finished_spans() if s.parent is None]
    assert len(roots) == 12 and {s.name for s in roots} == {"uwrt.DecideStream"}


def test_ratio_samples_exactly_the_seeded_draws(rng):
    """Tracing.on_batch against the reference: request j of a batch is sampled when the seeded
    generator's j-th uniform is below the ratio (fresh random batch sizes and ratios)."""
    for _ in range(10):
        ratio, seed = float(rng.uniform(0.01, 0.9)), int(rng.integers(0, 1 << 30))
        exporter = InMemorySpanExporter()
        tr = Tracing(ratio, exporter, simple=True, seed=seed)
        ref = np.random.default_rng(seed)
        times = SimpleNamespace(featurize_us=10, encode_us=20, trees_us=5, policy_us=3, reasons_us=0)
        expected_ids = []
        for b in range(int(rng.integers(3, 12))):
            n = int(rng.integers(1, 33))
            resps = [pb.DecisionResponse(request_id=f"r{b}-{j}", outcome=pb.APPROVE) for j in range(n)]
            expected_ids += [f"r{b}-{j}" for j in np.flatnonzero(ref.random(n) < ratio)]
            t0 = time.perf_counter_ns()
            tr.on_batch(resps, times)
            for r in resps:
                tr.finish("Decide", r, t0, time.perf_counter_ns())
        roots = [s for s in exporter.get_finished_spans() if s.parent is None]
        assert [s.attributes["uwrt.request_id"] for s in roots] == expected_ids
        assert tr.sampled == len(expected_ids)
        tr.shutdown()


def test_live_ratio_traces_a_subset(pipe, traffic):
    exporter = InMemorySpanExporter()
    reqs = relabelled(traffic, "half", 60)
    _serve(pipe, reqs, Tracing(0.5, exporter, simple=True, seed=3))
    roots = [s for s in exporter.get_finished_spans() if s.parent is None]
    assert 0 < len(roots) < 60           # seed 3 over these batches: some, not all (exact draws: above)
    assert {s.attributes["uwrt.request_id"] for s in roots} <= {r.request_id for r in reqs}


def test_tracing_off_creates_no_tracer_and_no_spans(pipe, traffic):
    got, obs = _serve(pipe, relabelled(traffic, "off", 10), None, RuntimeConfig(port=0, trace_sample_ratio=0.0))
    assert len(got) == 10 and obs.tracing is None
    assert obs.info()["tracing.sample_ratio"] == 0.0


def test_tracing_off_never_imports_opentelemetry(small_bundle):
    """Off costs nothing: building the serving runtime with tracing off does not even import the SDK."""
    code = ("import sys\n"
            "from uwrt.runtime.config import RuntimeConfig\n"
            "from uwrt.runtime.pipeline import Pipeline\n"
            "from uwrt.runtime.serving.server import ServingRuntime\n"
            f"rt = ServingRuntime(Pipeline.from_dir({str(small_bundle)!r}), RuntimeConfig(port=0))\n"
            "assert rt.obs.tracing is None\n"
            "bad = [m for m in sys.modules if m.startswith('opentelemetry')]\n"
            "assert not bad, bad\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 0, p.stderr[-3000:]


def test_otlp_exporter_missing_is_a_clear_error(monkeypatch):
    import builtins

    from uwrt.runtime.serving.tracing import TracingUnavailable, build_exporter
    real = builtins.__import__

    def no_otlp(name, *a, **kw):
        if name.startswith("opentelemetry.exporter.otlp"):
            raise ImportError("No module named 'opentelemetry.exporter.otlp'")
        return real(name, *a, **kw)
    monkeypatch.setattr(builtins, "__import__", no_otlp)
    with pytest.raises(TracingUnavailable, match="requirements/otlp.txt"):
        build_exporter("otlp")
    assert build_exporter("none").export([]).name == "SUCCESS"


def _traceparent(rng, sampled: bool) -> tuple[str, int, int]:
    trace_id = int(rng.integers(1, 1 << 62)) << 64 | int(rng.integers(1, 1 << 62))
    span_id = int(rng.integers(1, 1 << 62))
    return f"00-{trace_id:032x}-{span_id:016x}-{'01' if sampled else '00'}", trace_id, span_id


MALFORMED = ["", "garbage", "00-" + "0" * 32 + "-" + "1" * 16 + "-01",          # all-zero trace id: invalid
             "00-" + "a" * 32 + "-" + "0" * 16 + "-01", "zz-" + "a" * 32 + "-" + "b" * 16 + "-01",
             "00-" + "a" * 31 + "-" + "b" * 16 + "-01"]


def _serve_with_metadata(pipe, calls, tracing: Tracing, stream_call=None):
    """calls: [(request, metadata or None)], unary; stream_call: (requests, metadata) for one stream."""
    async def main():
        server = Server(pipe, CFG)
        server.rt.obs.tracing = tracing
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
                stub = pb_grpc.UnderwritingStub(ch)
                await asyncio.gather(*(stub.Decide(r, metadata=md, timeout=60) for r, md in calls))
                if stream_call is not None:
                    reqs, md = stream_call
                    assert len([r async for r in stub.DecideStream(iter(reqs), metadata=md, timeout=60)]) == len(reqs)
        finally:
            await server.stop(1.0)
    asyncio.run(main())


def test_client_traceparent_is_joined_and_its_sampled_flag_decides(pipe, traffic, rng):
    """A sampled client span makes the server trace the request (ratio all but 0) as its child,
    in the client's trace; no traceparent, or a malformed one, leaves it to the ratio."""
    reqs = relabelled(traffic, "tp", 24)
    sampled = {r.request_id: _traceparent(rng, True) for r in reqs[:8]}
    calls = [(r, (("traceparent", sampled[r.request_id][0]),)) for r in reqs[:8]]
    calls += [(r, None) for r in reqs[8:14]]
    calls += [(r, (("traceparent", MALFORMED[k % len(MALFORMED)]),)) for k, r in enumerate(reqs[14:20])]
    stream_tp, stream_trace, stream_span = _traceparent(rng, True)
    exporter = InMemorySpanExporter()
    _serve_with_metadata(pipe, calls, Tracing(1e-12, exporter, simple=True, seed=0),
                         stream_call=(reqs[20:], (("traceparent", stream_tp), ("tracestate", "vendor=x"))))
    spans = exporter.get_finished_spans()
    servers = [s for s in spans if s.name.startswith("uwrt.")]
    by_id = {s.attributes["uwrt.request_id"]: s for s in servers}
    assert set(by_id) == set(sampled) | {r.request_id for r in reqs[20:]}, sorted(by_id)
    for rid, (_, trace_id, span_id) in sampled.items():
        s = by_id[rid]
        assert s.context.trace_id == trace_id and s.parent.span_id == span_id and s.parent.is_remote
        kids = [k for k in spans if k.parent is not None and k.parent.span_id == s.context.span_id]
        assert STAGES <= {k.name for k in kids} and all(k.context.trace_id == trace_id for k in kids)
    for r in reqs[20:]:
        s = by_id[r.request_id]
        assert s.name == "uwrt.DecideStream" and s.context.trace_id == stream_trace
        assert s.parent.span_id == stream_span


def test_unsampled_client_trace_is_not_traced_at_ratio_one(pipe, traffic, rng):
    reqs = relabelled(traffic, "tu", 16)
    calls = [(r, (("traceparent", _traceparent(rng, False)[0]),)) for r in reqs[:6]]
    calls += [(r, (("traceparent", MALFORMED[k % len(MALFORMED)]),)) for k, r in enumerate(reqs[6:12])]
    calls += [(r, None) for r in reqs[12:]]
    exporter = InMemorySpanExporter()
    _serve_with_metadata(pipe, calls, Tracing(1.0, exporter, simple=True))
    roots = [s for s in exporter.get_finished_spans() if s.name.startswith("uwrt.")]
    assert sorted(s.attributes["uwrt.request_id"] for s in roots) == sorted(r.request_id for r in reqs[6:])
    assert all(s.parent is None for s in roots)          # malformed context: a trace of its own


def test_parent_of_reads_only_a_valid_traceparent(rng):
    tr = Tracing(0.5, InMemorySpanExporter(), simple=True)
    tp, trace_id, span_id = _traceparent(rng, True)
    p = tr.parent_of((("user-agent", "x"), ("traceparent", tp), ("bin-bin", b"\x00")))
    sc = tr._trace.get_current_span(p.context).get_span_context()
    assert p.sampled and sc.trace_id == trace_id and sc.span_id == span_id and sc.is_remote
    assert not tr.parent_of((("traceparent", _traceparent(rng, False)[0]),)).sampled
    for bad in MALFORMED:
        assert tr.parent_of((("traceparent", bad),)) is None, bad
    assert tr.parent_of(()) is None and tr.parent_of(None) is None
    tr.shutdown()
