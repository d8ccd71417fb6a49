"""Transport and RPC limits (runtime/serving/limits.py): the gRPC options each knob becomes,
and the concurrent-RPC limit refusing with RESOURCE_EXHAUSTED (never CANCELLED) in a server."""
import asyncio
import dataclasses

import grpc

from tests.runtime.serving.test_server import CFG, Harness, run
from uwrt.runtime.config import RuntimeConfig, TransportConfig
from uwrt.runtime.serving import limits


def test_options_follow_the_knobs():
    cfg = RuntimeConfig(max_request_bytes=5000, transport=TransportConfig(
        max_concurrent_rpcs=10, max_concurrent_streams=7, max_connections=3, max_connection_idle_s=1.5,
        max_connection_age_s=2.25, max_connection_age_grace_s=0.5, keepalive_time_s=4, keepalive_timeout_s=2,
        keepalive_min_client_interval_s=3, keepalive_permit_without_calls=False))
    kw = limits.server_kwargs(cfg, reuse_port=False)
    o = dict(kw["options"])
    assert kw["maximum_concurrent_rpcs"] == 10
    assert o["grpc.max_receive_message_length"] == 5000 + limits.HEADROOM_BYTES
    assert o["grpc.so_reuseport"] == 0
    assert o["grpc.max_concurrent_streams"] == 7 and o["grpc.max_allowed_incoming_connections"] == 3
    assert o["grpc.max_connection_idle_ms"] == 1500 and o["grpc.max_connection_age_ms"] == 2250
    assert o["grpc.max_connection_age_grace_ms"] == 500
    assert o["grpc.keepalive_time_ms"] == 4000 and o["grpc.keepalive_timeout_ms"] == 2000
    assert o["grpc.http2.min_ping_interval_without_data_ms"] == 3000
    assert o["grpc.keepalive_permit_without_calls"] == 0
    soft, hard = limits.pending_limits(cfg)
    assert o["grpc.server.max_pending_requests"] == soft >= 4 * 10 and hard == 2 * soft


def test_zero_means_unlimited_or_never():
    cfg = RuntimeConfig(transport=TransportConfig(max_concurrent_rpcs=0, max_concurrent_streams=0, max_connections=0,
                                                  max_connection_idle_s=0, max_connection_age_s=0,
                                                  keepalive_time_s=0))
    kw = limits.server_kwargs(cfg, reuse_port=True)
    o = dict(kw["options"])
    assert kw["maximum_concurrent_rpcs"] is None and o["grpc.so_reuseport"] == 1
    for k in ("grpc.max_concurrent_streams", "grpc.max_allowed_incoming_connections", "grpc.max_connection_idle_ms",
              "grpc.max_connection_age_ms", "grpc.keepalive_time_ms"):
        assert k not in o, k


def test_defaults_are_production_sane():
    t = TransportConfig()
    assert 0 < t.max_concurrent_rpcs and 0 < t.max_connections and 0 < t.max_connection_age_s
    assert 0 < t.keepalive_time_s and 0 < t.stream_max_pending
    assert limits.receive_limit(RuntimeConfig()) == RuntimeConfig().max_request_bytes + limits.HEADROOM_BYTES


def test_concurrent_rpc_limit_refuses_with_resource_exhausted(pipe, traffic):
    """Two open streams hold the limit of 2: a third RPC is refused at once; once they close,
    it is served."""
    cfg = dataclasses.replace(CFG, transport=TransportConfig(max_concurrent_rpcs=2))

    async def main():
        async with Harness(pipe, cfg) as h:
            streams = [h.stub.DecideStream() for _ in range(2)]
            for s in streams:
                await s.write(traffic[0])
                await s.read()                           # each stream is running on the server
            try:
                await h.stub.Decide(traffic[1], timeout=10)
                refused = grpc.StatusCode.OK
            except grpc.aio.AioRpcError as e:
                refused = e.code()
            for s in streams:
                await s.done_writing()
                while await s.read() is not grpc.aio.EOF:
                    pass
            await asyncio.sleep(0.05)
            served = await h.stub.Decide(traffic[1], timeout=10)
            return refused, served

    refused, served = run(main())
    assert refused == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert served.request_id == traffic[1].request_id and not served.HasField("error")
