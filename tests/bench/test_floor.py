"""The transport floor and connection handling: the echo server answers like the service with no
model, `--connections N` opens N TCP connections and spreads requests over them."""
from __future__ import annotations

import os

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from uwrt.bench import loadgen
from uwrt.bench.echo_server import EchoService
from uwrt.bench.loadgen import StepSpec
from uwrt.bench.loadgen.traffic import RequestSource
from uwrt.runtime.pb import pb, pb_grpc


def test_echo_server_answers_every_rpc(echo_server, traffic):
    with grpc.insecure_channel(echo_server.target) as ch:
        stub = pb_grpc.UnderwritingStub(ch)
        r = stub.Decide(traffic[0], timeout=10)
        assert r.request_id == traffic[0].request_id and r.outcome == pb.DECLINE and len(r.reasons) == 4
        assert r.model.bundle_digest and r.timing.encode_us == 0
        streamed = list(stub.DecideStream(iter(traffic[:5]), timeout=10))
        assert [s.request_id for s in streamed] == [t.request_id for t in traffic[:5]]
        info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5)
        assert info.settings["stats.requests"] == info.settings["stats.batches"]
        assert int(info.settings["stats.requests"]) >= 6 and "echo" in info.settings["server"]
        h = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert h.status == health_pb2.HealthCheckResponse.SERVING


class PeerRecorder(EchoService):
    def __init__(self) -> None:
        super().__init__()
        self.peers: list[str] = []

    async def respond(self, request, context):
        self.peers.append(context.peer())
        return await super().respond(request, context)


@pytest.mark.parametrize("connections", [1, 3])
def test_connections_spread_requests_over_distinct_tcp_connections(echo_factory, own_traffic, connections):
    svc = PeerRecorder()
    e = echo_factory(svc)
    src = RequestSource(list(own_traffic[:20]))
    row = loadgen.run_step(e.target, StepSpec(rate=200, duration_s=0.4, connections=connections, tag="c",
                                                        timeout_s=30.0), src)
    assert row["errors"] == {} and row["completed"] == row["sent"] == len(svc.peers) > 3 * connections
    assert row["connections"] == connections
    assert len(set(svc.peers)) == connections
    counts = [svc.peers.count(p) for p in set(svc.peers)]
    assert max(counts) - min(counts) <= 1                 # round robin


def test_cpu_lists_parse_format_and_read_back():
    from uwrt.bench.loadgen.cpus import format_cpus, parse_cpus, process_cpus
    have = sorted(os.sched_getaffinity(0))
    assert parse_cpus(format_cpus(have)) == have and process_cpus() == have
    assert format_cpus([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8" and format_cpus(None) == ""
    assert parse_cpus(f"{have[0]}") == [have[0]]
    for bad in ("", "x", "3-1", "-1", "100000"):
        with pytest.raises(ValueError):
            parse_cpus(bad)
