"""The client side without a proxy (deploy/client/service_config.json through grpcio): round_robin
over an `ipv4:` address list, client-side grpc.health.v1 checking, and the retry policy
(UNAVAILABLE only, within the deadline). Stand-in replicas; loopback; every wait bounded."""
from __future__ import annotations

import collections
import json
import re
import time

import grpc
import pytest

from deploy import client
from tests.deploy.conftest import wait_until
from uwrt.runtime.pb import pb, pb_grpc

DECIDE = {"service": "uwrt.v1.Underwriting", "method": "Decide"}


def _stub(target: str, cfg=None):
    ch = client.channel(target, cfg, aio=False)
    grpc.channel_ready_future(ch).result(timeout=10)
    return ch, pb_grpc.UnderwritingStub(ch)


def _decide(stub, rid: str, timeout_s: float = 10.0) -> str:
    return stub.Decide(pb.DecisionRequest(request_id=rid), timeout=timeout_s).model.bundle_id


def _ipv4(fakes) -> str:
    return "ipv4:" + ",".join(f.target for f in fakes)


def test_service_config_file_is_what_the_readme_shows():
    from tests.factories import ROOT
    cfg = client.service_config()
    assert cfg["loadBalancingConfig"] == [{"round_robin": {}}]
    assert cfg["healthCheckConfig"]["serviceName"] == "uwrt.v1.Underwriting"
    decide = next(m for m in cfg["methodConfig"] if DECIDE in m["name"])
    assert decide["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    readme = (ROOT / "README.md").read_text()
    shown = re.search(r"`deploy/client/service_config\.json`:\n\n```json\n(.*?)```", readme, re.S)
    assert shown, "README shows deploy/client/service_config.json in a json block after its name"
    assert json.loads(shown.group(1)) == cfg


def _spread_until_all_ready(stub, names: set[str], timeout_s: float = 20.0) -> None:
    """round_robin adds a replica once its connection is READY and its health says SERVING."""
    deadline = time.monotonic() + timeout_s
    seen: set[str] = set()
    i = 0
    while seen != names:
        assert time.monotonic() < deadline, f"only {seen} of {names} in rotation"
        seen.add(_decide(stub, f"warm{i}"))
        i += 1


def test_round_robin_spreads_requests_over_every_replica(fakes):
    ch, stub = _stub(_ipv4(fakes))
    with ch:
        _spread_until_all_ready(stub, {"f1", "f2", "f3"})
        served = collections.Counter(_decide(stub, f"q{i}") for i in range(90))
    assert served == {"f1": 30, "f2": 30, "f3": 30}


def test_without_round_robin_one_connection_takes_everything(fakes):
    """The failure mode the issue names: the default (pick_first) pins the channel to one replica."""
    ch, stub = _stub(_ipv4(fakes), client.service_config(round_robin=False))
    with ch:
        served = collections.Counter(_decide(stub, f"q{i}") for i in range(30))
    assert len(served) == 1


def test_client_health_checking_skips_not_serving_replicas(fakes):
    f1, f2, f3 = fakes
    ch, stub = _stub(_ipv4(fakes))
    with ch:
        _spread_until_all_ready(stub, {"f1", "f2", "f3"})
        f2.set("NOT_SERVING")                       # pushed to the client over Health.Watch
        wait_until(lambda: "f2" not in {_decide(stub, f"p{i}") for i in range(6)}, 10, "f2 out of rotation")
        before = f2.count()
        served = collections.Counter(_decide(stub, f"q{i}") for i in range(40))
        assert set(served) == {"f1", "f3"} and f2.count() == before
        f2.set("SERVING")
        wait_until(lambda: "f2" in {_decide(stub, f"s{i}") for i in range(6)}, 10, "f2 back in rotation")


@pytest.mark.parametrize("code,retried", [(grpc.StatusCode.UNAVAILABLE, True),
                                          (grpc.StatusCode.RESOURCE_EXHAUSTED, False),
                                          (grpc.StatusCode.DEADLINE_EXCEEDED, False),
                                          (grpc.StatusCode.INTERNAL, False)])
def test_retry_policy_retries_unavailable_only(fakes, code, retried):
    """UNAVAILABLE is retried (on another replica: round_robin); overload, deadline and bugs are not:
    retrying them would add load to a saturated service or repeat a failure."""
    ch, stub = _stub(_ipv4(fakes))
    with ch:
        _spread_until_all_ready(stub, {"f1", "f2", "f3"})
        for f in fakes:
            f.fail_first = code
        attempts_before = sum(f.count() for f in fakes)
        if retried:
            assert _decide(stub, "once") in {"f1", "f2", "f3"}
            assert sum(f.count() for f in fakes) - attempts_before == 2
        else:
            with pytest.raises(grpc.RpcError) as e:
                _decide(stub, "once")
            assert e.value.code() == code
            assert sum(f.count() for f in fakes) - attempts_before == 1


def test_without_the_retry_policy_unavailable_reaches_the_caller(fakes):
    fakes[0].fail_first = grpc.StatusCode.UNAVAILABLE
    ch, stub = _stub(fakes[0].target, client.service_config(retries=False))
    with ch, pytest.raises(grpc.RpcError) as e:
        _decide(stub, "once")
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE and fakes[0].count() == 1


def test_retries_stop_at_max_attempts_and_inside_the_deadline(fakes):
    ch, stub = _stub(_ipv4(fakes))
    with ch:
        _spread_until_all_ready(stub, {"f1", "f2", "f3"})
        for f in fakes:
            f.fail_always = grpc.StatusCode.UNAVAILABLE
        before = sum(f.count() for f in fakes)
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as e:
            _decide(stub, "doomed", timeout_s=5.0)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert sum(f.count() for f in fakes) - before == 3   # maxAttempts
        assert time.monotonic() - t0 < 5.0
