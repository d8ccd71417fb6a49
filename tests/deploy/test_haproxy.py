"""The HAProxy configuration (deploy/haproxy/uwrt.cfg.in) in front of stand-in replicas: it is
valid, it balances per request (not per connection), it follows each replica's grpc.health.v1
status, draining waits for in-flight requests, and a replica whose port is closed costs no request.
Needs the haproxy package (`make ops-install`); loopback only, every wait bounded."""
from __future__ import annotations

import collections
import dataclasses
import subprocess
import threading

import grpc
import pytest

from deploy import cluster as dc
from tests.deploy.conftest import needs_haproxy, wait_until
from tests.factories import ROOT
from uwrt.runtime.pb import pb, pb_grpc

pytestmark = needs_haproxy
EXAMPLE = ROOT / "deploy" / "haproxy" / "example.cfg"
EXAMPLE_SERVERS = [("r1", "127.0.0.1:50061"), ("r2", "127.0.0.1:50062"), ("r3", "127.0.0.1:50063")]
EXAMPLE_ARGS = dict(listen="127.0.0.1:50050", servers=EXAMPLE_SERVERS, stats_socket="/run/uwrt/haproxy.sock")


@pytest.mark.parametrize("balance", ["roundrobin", "leastconn"])
def test_rendered_configuration_is_valid(tmp_path, balance):
    cfg = tmp_path / "h.cfg"
    cfg.write_text(dc.render_config(**EXAMPLE_ARGS, settings=dc.HAProxySettings(balance=balance)))
    res = subprocess.run([dc.find_haproxy(), "-c", "-f", str(cfg)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_checked_in_example_is_the_template_rendered():
    """deploy/haproxy/example.cfg is what people read: it must be what the code renders."""
    assert EXAMPLE.read_text() == dc.render_config(**EXAMPLE_ARGS), (
        "regenerate: python -c 'from tests.deploy.test_haproxy import write_example; write_example()'")


def write_example() -> None:
    EXAMPLE.write_text(dc.render_config(**EXAMPLE_ARGS))


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="balance"):
        dc.render_config(**EXAMPLE_ARGS, settings=dc.HAProxySettings(balance="random"))


def _decide(stub, i: int, timeout_s: float = 10.0) -> str:
    return stub.Decide(pb.DecisionRequest(request_id=f"q{i}"), timeout=timeout_s).model.bundle_id


def _balancer(fakes, **kw) -> dc.Balancer:
    return dc.Balancer([(f.name, f.target) for f in fakes], settings=dataclasses.replace(dc.HAProxySettings(), **kw))


def test_one_connection_is_balanced_per_request(fakes):
    """One client channel is one HTTP/2 connection; round robin still spreads its requests evenly."""
    with _balancer(fakes) as lb, grpc.insecure_channel(lb.target) as ch:
        stub = pb_grpc.UnderwritingStub(ch)
        served = collections.Counter(_decide(stub, i) for i in range(60))
    assert served == {"f1": 20, "f2": 20, "f3": 20}


def test_balancer_follows_grpc_health(fakes):
    f1, f2, f3 = fakes
    with _balancer(fakes) as lb, grpc.insecure_channel(lb.target) as ch:
        stub = pb_grpc.UnderwritingStub(ch)
        f1.set("NOT_SERVING")                       # a drain or a reload: the port still answers
        lb.wait_status("f1", "DOWN", 10)
        row = lb.servers()["f1"]
        assert row["check_status"] == "L7RSP", row  # the SERVING rule failed: not a timeout, not TCP
        before = f1.count()
        assert {_decide(stub, i) for i in range(30)} == {"f2", "f3"}
        assert f1.count() == before
        f1.set("SERVING")
        lb.wait_status("f1", "UP", 10)
        assert "f1" in {_decide(stub, i) for i in range(30)}
        f3.stop()                                   # gone: the port refuses connections
        lb.wait_status("f3", "DOWN", 10)
        assert lb.servers()["f3"]["check_status"] == "L4CON"
        assert {_decide(stub, i) for i in range(20)} == {"f1", "f2"}


def test_wrong_health_service_is_never_up(fakes):
    """Checks ask for the configured service: one the replica does not report (NOT_FOUND) fails."""
    lb = _balancer(fakes[:1], health_service="no.such.Service")
    try:
        with pytest.raises(TimeoutError):
            lb.start(wait_up_s=2)
        assert lb.servers()["f1"]["status"] == "DOWN"
    finally:
        lb.stop()


def test_drain_waits_for_in_flight_requests_and_routes_nothing_new(fakes):
    f1, f2, _ = fakes
    with _balancer(fakes[:2]) as lb, grpc.insecure_channel(lb.target) as ch:
        stub = pb_grpc.UnderwritingStub(ch)
        f1.hold = threading.Event()
        held = []
        t = threading.Thread(target=lambda: held.append(_decide(stub, 0)))
        t.start()
        wait_until(lambda: f1.count() == 1 or f2.count() == 1, 10, "the first request reached a replica")
        assert f1.count() == 1, "round robin sends the first request to the first server"
        done = threading.Event()
        d = threading.Thread(target=lambda: (lb.drain("f1", timeout_s=20), done.set()))
        d.start()
        wait_until(lambda: lb.status("f1") == "DRAIN", 10, "f1 in DRAIN")
        assert not done.is_set()                    # f1 still holds a request: drain() waits
        assert {_decide(stub, i) for i in range(1, 11)} == {"f2"}
        f1.hold.set()
        t.join(10)
        d.join(10)
        assert held == ["f1"] and done.is_set()
        assert f1.count() == 1
        lb.ready("f1")
        lb.wait_status("f1", "UP", 10)


def test_closed_port_is_retried_on_another_replica(fakes):
    """A replica gone before the checks notice (its checks are switched off here, so the balancer
    keeps it UP): connecting fails, so the request was never sent, and HAProxy redispatches it; the
    client sees no error."""
    f1, f2, _ = fakes
    with _balancer(fakes[:2]) as lb, grpc.insecure_channel(lb.target) as ch:
        stub = pb_grpc.UnderwritingStub(ch)
        assert {_decide(stub, i) for i in range(4)} == {"f1", "f2"}
        lb.api("disable health replicas/f1")
        f1.stop()
        served = [_decide(stub, i) for i in range(4, 24)]
        assert set(served) == {"f2"} and len(served) == 20
        row = lb.servers()["f1"]
        assert row["status"] == "no check", row     # still in rotation, unchecked: the retry did the work
        assert int(row["wredis"]) >= 1, row         # redispatched away from f1
