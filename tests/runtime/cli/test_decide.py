"""`uwrt decide` against a fake Underwriting server: unary calls spread round-robin over
`--connections` connections (a multi-process server sharing a port balances connections, not
requests), the table and --json outputs, unreachable servers."""
from __future__ import annotations

import collections
import concurrent.futures
import json
import threading

import grpc
import pytest

from uwrt.runtime.cli.main import main
from uwrt.runtime.pb import pb, pb_grpc


class PeerRecorder(pb_grpc.UnderwritingServicer):
    """Answers every Decide with an APPROVE and records the client connection (peer address)."""

    def __init__(self) -> None:
        self.peers: collections.Counter[str] = collections.Counter()
        self.lock = threading.Lock()

    def Decide(self, request, context):
        with self.lock:
            self.peers[context.peer()] += 1
        r = pb.DecisionResponse(request_id=request.request_id, outcome=pb.APPROVE, probability_of_default=0.01)
        r.warnings.add(code=pb.FEATURE_IMPUTED, detail="income")
        return r


@pytest.fixture
def fake_server():
    rec = PeerRecorder()
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_UnderwritingServicer_to_server(rec, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", rec
    finally:
        server.stop(None)


@pytest.mark.parametrize("connections,n", [(3, 9), (1, 5), (4, 2)])
def test_unary_calls_go_round_robin_over_the_connections(fake_server, capsys, connections, n):
    target, rec = fake_server
    assert main(["decide", "--target", target, "--n", str(n), "--connections", str(connections)]) == 0
    used = min(connections, n)                           # never more connections than requests
    assert len(rec.peers) == used, rec.peers
    assert sorted(rec.peers.values()) == sorted(n // used + (k < n % used) for k in range(used))
    out = capsys.readouterr()
    assert f"{n} of {n} decided" in out.err
    lines = out.out.strip().splitlines()
    assert lines[0].startswith("request_id") and len(lines) == n + 1
    assert all(line.endswith("FEATURE_IMPUTED(income)") for line in lines[1:])


def test_json_output_and_the_default_connections(fake_server, capsys):
    target, rec = fake_server
    assert main(["decide", "--target", target, "--n", "8", "--json"]) == 0
    assert len(rec.peers) == 4                            # the default
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [r["requestId"] for r in rows] == [f"cli-0-{i}" for i in range(8)]


def test_unreachable_server_and_bad_options(capsys):
    assert main(["decide", "--target", "127.0.0.1:9", "--n", "1", "--connect-timeout-s", "0.2"]) == 2
    assert "cannot reach a server" in capsys.readouterr().err
    assert main(["decide", "--target", "127.0.0.1:9", "--n", "1", "--connections", "0"]) == 2
