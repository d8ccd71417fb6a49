"""deploy/raw_health_check.py: the hand-built grpc.health.v1 Check (what HAProxy sends) against grpcio's
own health client on a real gRPC server, and the HAProxy match rules against real responses."""
from __future__ import annotations

import re
import socket

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from deploy import raw_health_check as gh


def test_hpack_integers_match_rfc7541_examples():
    assert gh._hpack_int(10, 5) == bytes([0x0A])                   # C.1.1
    assert gh._hpack_int(1337, 5) == bytes([0x1F, 0x9A, 0x0A])     # C.1.2
    assert gh._hpack_int(42, 8) == bytes([0x2A])                   # C.1.3
    assert gh._hpack_int(31, 4) == bytes([0x0F, 0x10])             # content-type's static index


@pytest.mark.parametrize("service", ["", "uwrt.v1.Underwriting", "x" * 127])
def test_check_request_is_one_well_formed_flight(service):
    raw = gh.check_request(service)
    assert raw.startswith(gh.PREFACE)
    frames = gh.parse_frames(raw[len(gh.PREFACE):])
    assert [(t, f, s) for t, f, s, _ in frames] == [(gh.SETTINGS, 0, 0), (gh.HEADERS, gh.END_HEADERS, 1),
                                                    (gh.DATA, gh.END_STREAM, 1)]
    data = frames[2][3]
    assert data[0] == 0 and int.from_bytes(data[1:5], "big") == len(data) - 5
    assert health_pb2.HealthCheckRequest.FromString(data[5:]).service == service
    block = frames[1][3]
    for part in (b"/grpc.health.v1.Health/Check", b"application/grpc", b"te", b"trailers"):
        assert part in block


def test_service_names_over_127_bytes_are_refused():
    with pytest.raises(ValueError):
        gh.check_request("x" * 128)


def _grpcio_check(target: str, service: str) -> int | None:
    """The reference: grpcio's health client. None for an error status (e.g. NOT_FOUND)."""
    with grpc.insecure_channel(target) as ch:
        try:
            stub = health_pb2_grpc.HealthStub(ch)
            return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
        except grpc.RpcError:
            return None


def _raw_reply(port: int, service: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(gh.check_request(service))
        data = b""
        while b"grpc-status" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return data


@pytest.mark.parametrize("status", ["SERVING", "NOT_SERVING", "SERVICE_UNKNOWN"])
def test_probe_agrees_with_the_grpcio_health_client(fakes, status):
    f = fakes[0]
    f.set(status)
    for service in ("", "uwrt.v1.Underwriting", "no.such.Service"):
        want = _grpcio_check(f.target, service)
        assert gh.probe("127.0.0.1", f.port, service) == want, (status, service)
    assert gh.probe("127.0.0.1", f.port, "no.such.Service") is None      # NOT_FOUND: an error status


def test_probe_of_a_closed_port_is_none():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert gh.probe("127.0.0.1", port, "", timeout_s=0.5) is None


def test_haproxy_rules_match_serving_only(fakes):
    """The two `tcp-check expect` patterns, applied (as HAProxy's rbinary does: to the upper-case
    hex of the reply) to real replies: 'complete' matches every reply, 'SERVING' only SERVING."""
    lines = gh.haproxy_tcp_check("uwrt.v1.Underwriting")
    complete = re.search(r"rbinary (\S+)$", lines[3]).group(1)
    serving = re.search(r"rbinary (\S+)$", lines[4]).group(1)
    assert "min-recv 0" in lines[4]                              # decided at once, no wait for a timeout
    f = fakes[0]
    cases = [("SERVING", "uwrt.v1.Underwriting", True), ("NOT_SERVING", "uwrt.v1.Underwriting", False),
             ("SERVING", "no.such.Service", False), ("SERVICE_UNKNOWN", "", False)]
    for status, service, ok in cases:
        f.set(status)
        reply = _raw_reply(f.port, "no.such.Service" if service == "no.such.Service" else "")
        hexed = reply.hex().upper()
        assert re.search(complete, hexed), status
        assert bool(re.search(serving, hexed)) is ok, (status, service)
    # the alignment guard: the SERVING bytes starting at an odd hex offset do not count
    shifted = "0" + gh.serving_frame_regex()[len("^(..)*"):].replace("..", "00")
    assert not re.search(serving, shifted)
