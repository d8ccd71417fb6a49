"""The gRPC server end to end: an in-process server on port 0, real grpc.aio clients."""
import asyncio
import dataclasses

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from uwrt.runtime.config import RuntimeConfig
from uwrt.runtime.pb import pb, pb_grpc
from uwrt.runtime.serving.batching import BatchingConfig, CostModel
from uwrt.runtime.serving.server import SERVICE_NAME, Server

# max_queue above the 500-request burst below (the production default, 256, sheds part of such a burst)
CFG = RuntimeConfig(port=0, grace_s=5.0, batching=BatchingConfig(max_batch_size=16, max_wait_us=2000, max_queue=1024,
                                                                        max_queue_delay_us=60_000_000))


def run(coro):
    return asyncio.run(coro)


class Harness:
    def __init__(self, pipe, cfg=CFG):
        self.server = Server(pipe, cfg)

    async def __aenter__(self):
        await self.server.start()
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.server.port}")
        self.stub = pb_grpc.UnderwritingStub(self.channel)
        return self

    async def __aexit__(self, *exc):
        await self.channel.close()
        if not self.server._stopped.is_set():
            await self.server.stop(1.0)


async def until(cond, timeout_s: float = 30.0):
    """Poll `cond` on the event loop until it holds (bounded: fails the test after timeout_s)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while not cond():
        assert loop.time() < end, "condition not reached in time"
        await asyncio.sleep(0.002)


def copy(req):
    r = pb.DecisionRequest()
    r.CopyFrom(req)
    return r


@pytest.mark.parametrize("runner", ["inline", "thread"])
def test_500_concurrent_requests_match_offline_scores(pipe, traffic, runner):
    reqs = [copy(traffic[i % len(traffic)]) for i in range(500)]
    for i, r in enumerate(reqs):
        r.request_id = f"c-{i}"
    offline = {r.request_id: res for r, res in zip(reqs, pipe.decide(reqs), strict=True)}

    async def main():
        async with Harness(pipe, dataclasses.replace(CFG, batch_runner=runner)) as h:
            before = len(h.server.rt.batch_sizes)
            got = await asyncio.gather(*(h.stub.Decide(r, timeout=30) for r in reqs))
            return got, h.server.rt.batch_sizes[before:]

    got, sizes = run(main())
    assert len(got) == 500
    for g in got:
        o = offline[g.request_id]
        assert g.outcome == o.outcome and abs(g.probability_of_default - o.probability_of_default) <= 1e-6
        assert [x.code for x in g.reasons] == [x.code for x in o.reasons]
        assert g.timing.total_us >= g.timing.queue_us and g.timing.encode_us > 0
    assert sum(sizes) == 500 and max(sizes) > 1, sizes        # real batches formed under concurrency


def test_health_transitions(pipe):
    async def main():
        server = Server(pipe, CFG)
        ch = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
        hs = health_pb2_grpc.HealthStub(ch)
        seen = []
        start = asyncio.create_task(server.start())
        # poll until the server answers health at all, recording what it says while warming
        while not start.done():
            try:
                r = await hs.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=1)
                seen.append(r.status)
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.01)
        r = await hs.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=1)
        seen.append(r.status)
        await server.health.enter_graceful_shutdown()
        after = (await hs.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)).status
        await server.stop(1.0)
        await ch.close()
        return seen, after

    seen, after = run(main())
    S = health_pb2.HealthCheckResponse
    assert seen[-1] == S.SERVING
    assert S.NOT_SERVING in seen and seen.index(S.NOT_SERVING) < seen.index(S.SERVING)
    assert after == S.NOT_SERVING


def test_reflection_lists_the_service(pipe):
    async def main():
        async with Harness(pipe) as h:
            port = h.server.port
            return await asyncio.to_thread(_reflect, port)

    services, method = run(main())
    assert SERVICE_NAME in services and "grpc.health.v1.Health" in services
    assert method == "Decide"


def _reflect(port):
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        db = ProtoReflectionDescriptorDatabase(ch)
        services = list(db.get_services())
        from google.protobuf.descriptor_pool import DescriptorPool
        svc = DescriptorPool(db).FindServiceByName(SERVICE_NAME)
        return services, svc.methods_by_name["Decide"].name


@pytest.mark.parametrize("mutate,field", [
    (lambda r: r.history.type.__setitem__(0, 99), "history.type[0]"),
    (lambda r: r.features.__setitem__("debt_to_income", float("nan")), 'features["debt_to_income"]'),
    (lambda r: r.purchase.__setattr__("amount_minor", -3), "purchase.amount_minor"),
    (lambda r: r.history.timestamp_unix_s.__setitem__(0, r.as_of.seconds + 3600), "history.timestamp_unix_s[0]"),
    (lambda r: r.ClearField("as_of"), "as_of"),
    (lambda r: r.ClearField("request_id"), "request_id"),
    (lambda r: r.history.days_past_due.__setitem__(0, -1), "history.days_past_due[0]"),
])
def test_bad_input_is_invalid_argument_and_does_not_poison_the_batch(pipe, traffic, mutate, field):
    good = [copy(r) for r in traffic[:20]]
    bad = copy(traffic[25])
    mutate(bad)

    async def main():
        async with Harness(pipe) as h:
            calls = [h.stub.Decide(r, timeout=30) for r in good[:10]] + [h.stub.Decide(bad, timeout=30)] + \
                    [h.stub.Decide(r, timeout=30) for r in good[10:]]
            return await asyncio.gather(*calls, return_exceptions=True)

    res = run(main())
    err = res[10]
    assert isinstance(err, grpc.aio.AioRpcError) and err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in err.details()
    offline = pipe.decide(good)
    ok = res[:10] + res[11:]
    assert ([r.probability_of_default for r in ok]
            == pytest.approx([o.probability_of_default for o in offline], abs=1e-6))


def test_too_many_events_and_oversized_message(pipe, traffic):
    big = copy(traffic[0])
    n = 600
    h = big.history
    for col in ("timestamp_unix_s", "type", "amount_minor", "mcc", "days_past_due", "installment_index"):
        getattr(h, col)[:] = [getattr(h, col)[0]] * n
    huge = copy(traffic[1])
    huge.purchase.merchant_id = "x" * (2 << 20)

    async def main():
        async with Harness(pipe) as hs:
            return await asyncio.gather(hs.stub.Decide(big, timeout=10), hs.stub.Decide(huge, timeout=10),
                                        return_exceptions=True)

    a, b = run(main())
    assert a.code() == grpc.StatusCode.INVALID_ARGUMENT and "history" in a.details() and "512" in a.details()
    assert b.code() == grpc.StatusCode.INVALID_ARGUMENT and "request" in b.details() and "bytes" in b.details()


def test_expired_deadline_fails_early(pipe, traffic):
    async def main():
        async with Harness(pipe) as h:
            b = h.server.rt.batcher
            b.cost = CostModel(fixed_us=200_000, per_request_us=0, per_token_us=0)  # every batch "takes" 200 ms
            before = b.stats()
            try:
                await h.stub.Decide(traffic[0], timeout=0.1)       # cannot make it: failed on arrival
                code = None
            except grpc.aio.AioRpcError as e:
                code = e.code()
            mid = b.stats()
            ok = await h.stub.Decide(traffic[0], timeout=10)      # can: computed
            return code, before, mid, ok

    code, before, mid, ok = run(main())
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert mid["expired"] == before["expired"] + 1 and mid["requests"] == before["requests"]   # never computed
    assert ok.request_id == traffic[0].request_id


@pytest.mark.parametrize("runner", ["inline", "thread"])
def test_streaming_out_of_order_with_inband_errors(pipe, traffic, runner):
    reqs = [copy(r) for r in traffic[:60]]
    reqs[7].history.type[0] = 77

    async def main():
        async with Harness(pipe, dataclasses.replace(CFG, batch_runner=runner)) as h:
            call = h.stub.DecideStream(iter(reqs), timeout=60)
            return [r async for r in call]

    out = run(main())
    assert sorted(r.request_id for r in out) == sorted(r.request_id for r in reqs)
    by_id = {r.request_id: r for r in out}
    bad = by_id[reqs[7].request_id]
    assert bad.error.code == "INVALID_ARGUMENT" and bad.error.field == "history.type[0]"
    offline = {r.request_id: o for r, o in zip(reqs, pipe.decide(reqs), strict=True)
               if not isinstance(o, Exception)}
    for rid, o in offline.items():
        assert by_id[rid].probability_of_default == pytest.approx(o.probability_of_default, abs=1e-6)


def test_model_info(pipe):
    async def main():
        async with Harness(pipe) as h:
            return await h.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5)

    info = run(main())
    assert info.model.bundle_digest == pipe.bundle.bundle_digest
    assert len(info.features) == len(pipe.schema.features) and info.profile == "cpu"
    assert info.settings["batching.max_batch_size"] == "16" and info.encoder_backend == "onnx" and not info.degraded


def test_shutdown_drains_accepted_requests(pipe, traffic):
    """Every request the server accepted before SIGTERM-style shutdown is answered; later ones are refused."""
    reqs = [copy(traffic[i % 300]) for i in range(120)]

    async def main():
        # thread runner: the backlog builds while the worker computes (inline drains are in test_batcher)
        cfg = dataclasses.replace(CFG, grace_s=30.0, batch_runner="thread",
                                  batching=BatchingConfig(max_batch_size=4, max_wait_us=0,
                                                          max_queue_delay_us=60_000_000))
        async with Harness(pipe, cfg) as h:
            calls = [asyncio.ensure_future(h.stub.Decide(r, timeout=60)) for r in reqs]
            b = h.server.rt.batcher
            await until(lambda: b.stats()["requests"] + b.stats()["queued"] >= len(reqs))  # all accepted
            assert b.stats()["queued"] > 0                                  # shutdown starts with a backlog
            await h.server.stop()
            res = await asyncio.gather(*calls, return_exceptions=True)
            late = None
            try:
                await h.stub.Decide(reqs[0], timeout=2)
            except grpc.aio.AioRpcError as e:
                late = e.code()
            return res, late

    res, late = run(main())
    not_responses = [r for r in res if not isinstance(r, pb.DecisionResponse)]
    assert not not_responses, not_responses[:3]
    assert late == grpc.StatusCode.UNAVAILABLE


def test_drain_delay_serves_while_not_serving_then_calls_sent_at_shutdown_are_decided(pipe, traffic):
    """During drain_delay_s health is NOT_SERVING but Decide still answers (a balancer has time to
    notice); calls racing the moment gRPC stops accepting are decided or refused with UNAVAILABLE
    (retryable), never CANCELLED or another code, and the drain reports success."""
    async def main():
        cfg = dataclasses.replace(CFG, grace_s=30.0, drain_delay_s=0.5)
        async with Harness(pipe, cfg) as h:
            health = health_pb2_grpc.HealthStub(h.channel)
            stop = asyncio.ensure_future(h.server.stop())
            await until(lambda: h.server.health._server_status.get(SERVICE_NAME)
                        == health_pb2.HealthCheckResponse.NOT_SERVING)
            status = (await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))).status
            during = await h.stub.Decide(copy(traffic[0]), timeout=10)       # within the delay: served
            # a burst racing the moment gRPC stops accepting
            racing = [asyncio.ensure_future(h.stub.Decide(copy(traffic[i]), timeout=30)) for i in range(1, 60)]
            await stop
            res = await asyncio.gather(*racing, return_exceptions=True)
            return status, during, res, stop.result()

    status, during, res, ok = run(main())
    assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert isinstance(during, pb.DecisionResponse) and during.request_id == traffic[0].request_id
    codes = {r.code() for r in res if isinstance(r, grpc.aio.AioRpcError)}
    assert codes <= {grpc.StatusCode.UNAVAILABLE}, codes
    assert ok


def test_client_cancellation_removes_queued_request(pipe, traffic):
    async def main():
        cfg = dataclasses.replace(CFG, batch_runner="thread", batching=BatchingConfig(max_batch_size=1, max_wait_us=0,
                                                                                      max_queue_delay_us=60_000_000))
        async with Harness(pipe, cfg) as h:
            calls = [h.stub.Decide(copy(traffic[i]), timeout=60) for i in range(40)]
            futs = [asyncio.ensure_future(c) for c in calls]
            b = h.server.rt.batcher
            await until(lambda: b.stats()["requests"] + b.stats()["queued"] >= 40)
            for c in calls[-10:]:
                c.cancel()
            res = await asyncio.gather(*futs, return_exceptions=True)
            for _ in range(100):
                if b.stats()["queued"] == 0:
                    break
                await asyncio.sleep(0.01)
            return res, b.stats()

    res, stats = run(main())
    assert all(isinstance(r, pb.DecisionResponse) for r in res[:30])
    assert stats["cancelled"] >= 1 and stats["requests"] + stats["cancelled"] == 40


def test_uwrt_serve_process_decide_and_sigterm(small_bundle, tmp_path, capsys):
    """The real command: `uwrt serve` in its own process, `uwrt decide` against it, SIGTERM -> exit 0."""
    import os
    import re
    import signal
    import subprocess
    import sys

    from uwrt.runtime.cli.main import main

    proc = subprocess.Popen([sys.executable, "-m", "uwrt.runtime.cli", "serve", "--bundle", str(small_bundle),
                             "--port", "0", "--workers", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        port = None
        lines = []
        for line in proc.stdout:                       # bounded: the process prints this once SERVING
            lines.append(line)
            m = re.search(r"uwrt serving on [\d.]+:(\d+)", line)
            if m:
                port = int(m.group(1))
                break
        assert port, "".join(lines)
        start = "".join(lines)        # the start-up log: clean (issue 14)
        assert "\x1b[" not in start and "onnxruntime" not in start.replace("uwrt.encoder.onnx", ""), start
        assert sum("profile cpu (" in line for line in lines) == 1, start
        assert main(["decide", "--target", f"127.0.0.1:{port}", "--n", "12", "--seed", "3"]) == 0
        out = capsys.readouterr()
        assert "12 of 12 decided" in out.err and "outcome" in out.out
        assert main(["decide", "--target", f"127.0.0.1:{port}", "--n", "5", "--stream", "--json"]) == 0
        assert len(capsys.readouterr().out.strip().splitlines()) == 5
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_full_queue_is_resource_exhausted(pipe, traffic):
    import threading
    gate = threading.Event()

    async def main():
        # thread runner: the test holds the worker thread (inline would hold the event loop itself)
        cfg = dataclasses.replace(CFG, batch_runner="thread",
                                  batching=BatchingConfig(max_batch_size=1, max_wait_us=0, max_queue=2))
        async with Harness(pipe, cfg) as h:
            real = h.server.rt.pipeline.decide

            def held(reqs, times=None):          # the worker blocks until the test lets it go
                gate.wait(30)
                return real(reqs, times)
            h.server.rt.pipeline.decide = held
            calls = [asyncio.ensure_future(h.stub.Decide(copy(traffic[i]), timeout=60)) for i in range(8)]
            b = h.server.rt.batcher
            await until(lambda: b.stats()["rejected"] >= 5)
            gate.set()
            res = await asyncio.gather(*calls, return_exceptions=True)
            h.server.rt.pipeline.decide = real
            return res

    res = run(main())
    ok = [r for r in res if isinstance(r, pb.DecisionResponse)]
    shed = [r for r in res if isinstance(r, grpc.aio.AioRpcError) and r.code() == grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert len(ok) == 3 and len(shed) == 5            # one running + two queued answered; the rest shed


def test_stream_cancelled_by_client_removes_its_queued_requests(pipe, traffic):
    """A client that abandons a DecideStream: its requests still queued are removed, never run."""
    import threading
    gate = threading.Event()

    async def main():
        cfg = dataclasses.replace(CFG, batch_runner="thread", batching=BatchingConfig(
            max_batch_size=1, max_wait_us=0, max_queue=64, max_queue_delay_us=60_000_000))
        async with Harness(pipe, cfg) as h:
            real = h.server.rt.pipeline.decide

            def held(reqs, times=None):
                gate.wait(30)
                return real(reqs, times)
            h.server.rt.pipeline.decide = held
            b = h.server.rt.batcher
            call = h.stub.DecideStream(iter([copy(traffic[i]) for i in range(10)]), timeout=60)
            await until(lambda: b.stats()["requests"] + b.stats()["queued"] >= 10)
            call.cancel()
            await until(lambda: b.stats()["queued"] == 0)
            gate.set()
            await until(lambda: h.server.rt.batcher._inflight is None)
            h.server.rt.pipeline.decide = real
            return b.stats()

    stats = run(main())
    assert stats["cancelled"] == 9 and stats["requests"] == 1      # one was running; the other nine never ran
