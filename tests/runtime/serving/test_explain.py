"""The Explain RPC (runtime/serving/explain.py) on a live in-process server: by request id and by
full request (the same attribution), against Decide's inline reasons and xgboost's own TreeSHAP;
its own low-priority thread, queue bound and deadline; reasons moved out of Decide
(`reasons = "explain"`) with the response saying so."""
from __future__ import annotations

import asyncio
import os
import threading

import grpc
import numpy as np
import pytest

from tests.factories import relabelled
from uwrt.runtime.config import RuntimeConfig
from uwrt.runtime.pb import pb, pb_grpc
from uwrt.runtime.pipeline import Pipeline, sigmoid
from uwrt.runtime.serving.batching import BatchingConfig
from uwrt.runtime.serving.explain import EXPLAIN_NICE
from uwrt.runtime.serving.server import Server
from uwrt.runtime.trees.base import TreeExplainer, load_booster

CFG = RuntimeConfig(port=0, grace_s=5.0, batching=BatchingConfig(max_batch_size=8, max_queue=1024,
                                                                 max_queue_delay_us=60_000_000))


def _run(pipe, cfg, body):
    """Start a server on `pipe`, run `body(stub, server)` (async), stop."""
    async def main():
        server = Server(pipe, cfg)
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
                return await body(pb_grpc.UnderwritingStub(ch), server)
        finally:
            await server.stop(1.0)
    return asyncio.run(main())


def _code(e: BaseException) -> grpc.StatusCode:
    assert isinstance(e, grpc.aio.AioRpcError), e
    return e.code()


def test_explain_by_id_and_by_request_agree_with_decide_and_xgboost(pipe, traffic):
    reqs = relabelled(traffic, "ex", 40)

    async def body(stub, server):
        decided = await asyncio.gather(*(stub.Decide(r, timeout=60) for r in reqs))
        by_id, by_req = [], []
        for s in range(0, len(reqs), 16):          # within explain_max_queue (32) waiting calls
            part = reqs[s:s + 16]
            by_id += await asyncio.gather(*(stub.Explain(pb.ExplainRequest(request_id=r.request_id), timeout=30)
                                            for r in part))
            by_req += await asyncio.gather(*(stub.Explain(pb.ExplainRequest(request=r), timeout=30) for r in part))
        return decided, by_id, by_req, server.rt.explain.info()

    decided, by_id, by_req, info = _run(pipe, CFG, body)
    assert info["explain.explained"] == 2 * len(reqs)
    for d, a, b in zip(decided, by_id, by_req, strict=True):
        assert d.reasons_mode == pb.REASONS_INLINE
        assert a.source == "recent" and b.source == "request" and a.request_id == d.request_id
        assert a.outcome == d.outcome == b.outcome
        assert a.probability_of_default == d.probability_of_default and a.score == d.score
        assert b.probability_of_default == pytest.approx(d.probability_of_default, abs=1e-6)
        # every model column, in schema order; base + contributions = the decision's margin
        assert [f.name for f in a.features] == pipe.schema.names
        contrib = np.array([f.contribution for f in a.features])
        assert a.base_margin + contrib.sum() == pytest.approx(a.margin, abs=1e-9)
        assert float(sigmoid(np.array([a.margin]))[0]) == pytest.approx(d.probability_of_default, abs=1e-5)
        # every reason group (not only the top 4), each the sum of its features
        groups = {g.code: g.contribution for g in a.groups}
        assert set(groups) == set(pipe.schema.reason_codes)
        for code, v in groups.items():
            assert v == pytest.approx(sum(f.contribution for f in a.features if f.reason_code == code), abs=1e-9)
        assert [g.contribution for g in a.groups] == sorted(groups.values(), reverse=True)
        # the same row, recomputed from the request: the same attribution
        assert [f.value for f in b.features] == pytest.approx([f.value for f in a.features], abs=1e-5)
        assert [f.contribution for f in b.features] == pytest.approx(contrib.tolist(), abs=1e-5)
        if d.outcome in (pb.DECLINE, pb.COUNTEROFFER):       # Decide's inline reasons are Explain's top ones
            assert [(r.code, r.text) for r in d.reasons] == [(r.code, r.text) for r in a.reasons]
            assert [r.contribution for r in d.reasons] == pytest.approx([r.contribution for r in a.reasons],
                                                                        abs=1e-6)
    # the reference: xgboost's own pred_contribs on the rows Explain reports
    rows = np.array([[f.value for f in a.features] for a in by_id], np.float32)
    ref = TreeExplainer(load_booster(pipe.bundle.tree_model_bytes())).contributions(rows)
    got = np.array([[f.contribution for f in a.features] + [a.base_margin] for a in by_id])
    np.testing.assert_allclose(got, ref, atol=1e-4)


def test_explain_errors_name_the_field(pipe, traffic):
    bad = relabelled(traffic, "bad", 1)[0]
    bad.purchase.amount_minor = 0

    async def body(stub, server):
        out = []
        for req in (pb.ExplainRequest(), pb.ExplainRequest(request_id=""), pb.ExplainRequest(request_id="nope"),
                    pb.ExplainRequest(request=bad)):
            try:
                await stub.Explain(req, timeout=30)
                out.append(None)
            except grpc.aio.AioRpcError as e:
                out.append((e.code(), e.details()))
        return out

    empty, blank, unknown, invalid = _run(pipe, CFG, body)
    assert empty[0] == grpc.StatusCode.INVALID_ARGUMENT and "target" in empty[1]
    # an empty oneof string is "not set" on the wire: the same answer as no target
    assert blank[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert unknown[0] == grpc.StatusCode.NOT_FOUND and "'nope'" in unknown[1]
    assert invalid[0] == grpc.StatusCode.INVALID_ARGUMENT and "amount_minor" in invalid[1]


def test_explain_runs_on_its_own_low_priority_thread_with_its_own_queue_and_deadline(pipe, traffic):
    """The explain thread blocked: Decide still decides (not on that thread), queued Explain calls
    beyond explain_max_queue are refused, the queued ones expire at explain_timeout_s."""
    cfg = RuntimeConfig(port=0, grace_s=5.0, explain_max_queue=3, explain_timeout_s=0.5,
                        batching=CFG.batching)
    reqs = relabelled(traffic, "busy", 6)

    async def body(stub, server):
        await asyncio.gather(*(stub.Decide(r, timeout=60) for r in reqs))
        svc = server.rt.explain
        # its thread: named uwrt-explain, niced below the process
        await stub.Explain(pb.ExplainRequest(request_id=reqs[0].request_id), timeout=30)
        (t,) = [t for t in threading.enumerate() if t.name.startswith("uwrt-explain")]
        nice = os.getpriority(os.PRIO_PROCESS, t.native_id) - os.getpriority(os.PRIO_PROCESS, 0)
        release = threading.Event()
        svc.executor.submit(release.wait, 30)               # hold the explain thread
        try:
            calls = [asyncio.ensure_future(stub.Explain(pb.ExplainRequest(request_id=r.request_id), timeout=30))
                     for r in reqs[:4]]
            await asyncio.sleep(0.2)
            decided = await stub.Decide(relabelled(traffic, "meanwhile", 1)[0], timeout=10)
            results = await asyncio.gather(*calls, return_exceptions=True)
        finally:
            release.set()
        after = await stub.Explain(pb.ExplainRequest(request_id=reqs[1].request_id), timeout=30)
        return nice, decided, results, after, dict(svc.stats)

    nice, decided, results, after, stats = _run(pipe, cfg, body)
    base = os.getpriority(os.PRIO_PROCESS, 0)
    assert nice == min(19, base + EXPLAIN_NICE) - base and (nice > 0 or base == 19)
    assert decided.request_id == "meanwhile-0"
    codes = sorted(_code(r).name for r in results)
    assert codes == ["DEADLINE_EXCEEDED"] * 3 + ["RESOURCE_EXHAUSTED"], codes
    assert stats["busy"] == 1 and stats["timeouts"] == 3
    assert after.source == "recent" and after.request_id == reqs[1].request_id


def test_reasons_out_of_decide(small_bundle, pipe, traffic):
    """reasons = "explain": Decide computes no reasons and says so; Explain gives the reasons an
    inline server would have returned; everything else in the decision is unchanged."""
    deferred = Pipeline.from_dir(small_bundle, config=RuntimeConfig(reasons="explain"))
    reqs = relabelled(traffic, "rm", 60)

    async def decide_all(stub, server):
        return await asyncio.gather(*(stub.Decide(r, timeout=60) for r in reqs))

    async def decide_and_explain(stub, server):
        got = await asyncio.gather(*(stub.Decide(r, timeout=60) for r in reqs))
        ex = []
        for s in range(0, len(reqs), 16):
            ex += await asyncio.gather(*(stub.Explain(pb.ExplainRequest(request_id=r.request_id), timeout=30)
                                         for r in reqs[s:s + 16]))
        info = await stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
        return got, ex, info

    inline = _run(pipe, CFG, decide_all)
    got, ex, _ = _run(deferred, RuntimeConfig(port=0, grace_s=5.0, reasons="explain", batching=CFG.batching),
                      decide_and_explain)
    adverse = 0
    for i, d, e in zip(inline, got, ex, strict=True):
        assert d.reasons_mode == pb.REASONS_DEFERRED and i.reasons_mode == pb.REASONS_INLINE
        assert len(d.reasons) == 0
        assert (d.outcome, d.probability_of_default, d.score) == (i.outcome, i.probability_of_default, i.score)
        if i.outcome in (pb.DECLINE, pb.COUNTEROFFER):
            adverse += 1
            assert [r.code for r in e.reasons] == [r.code for r in i.reasons]
    assert adverse > 0, "traffic without an adverse decision tests nothing here"
