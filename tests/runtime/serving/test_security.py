"""TLS, mutual TLS, token and mTLS-identity authentication, per-caller authorization, priority
and exposure: in-process servers on port 0 with certificates made at test time (tlsutil.py)."""
from __future__ import annotations

import asyncio
import dataclasses
import os
import stat

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.runtime.serving.test_server import CFG, copy, run
from tests.runtime.serving.tlsutil import issue, make_ca, server_cert
from uwrt.runtime.config import RuntimeConfig, SecurityConfig
from uwrt.runtime.pb import pb, pb_grpc
from uwrt.runtime.serving import security
from uwrt.runtime.serving.security import SecurityError, load_callers, token_sha256
from uwrt.runtime.serving.server import Server

TOKENS = {"checkout": "tok-checkout-3f9a", "vip": "tok-vip-77c1", "ops": "tok-ops-0b2e", "reader": "tok-reader-91d0"}
ROLES = {"checkout": ["decide"], "vip": ["decide", "priority"], "ops": ["decide", "introspect", "admin"],
         "reader": ["introspect"]}


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    out = tmp_path_factory.mktemp("pki")
    ca = make_ca(out)
    other = make_ca(out, "other CA")
    callers = out / "callers.toml"
    lines = []
    for name, tok in TOKENS.items():
        lines += ["[[caller]]", f'name = "{name}"', f"roles = {ROLES[name]!r}".replace("'", '"'),
                  f'token_sha256 = "{token_sha256(tok)}"', ""]
    lines += ["[[caller]]", 'name = "svc-mtls"', 'roles = ["decide"]', 'mtls_identity = "svc.clients.uwrt"', ""]
    lines += ["[[caller]]", 'name = "cn-only"', 'roles = ["decide", "introspect"]', 'mtls_identity = "cn-only-client"']
    callers.write_text("\n".join(lines) + "\n")
    os.chmod(callers, 0o640)
    return {"ca": ca, "server": server_cert(ca, out), "callers": callers,
            "client": issue(ca, out, "svc", dns=("svc.clients.uwrt",), client=True),
            "stranger": issue(ca, out, "stranger", dns=("stranger.clients.uwrt",), client=True),
            "cn_only": issue(ca, out, "cn-only-client", client=True),
            "foreign": issue(other, out, "foreign", dns=("svc.clients.uwrt",), client=True)}


def cfg_with(**sec) -> RuntimeConfig:
    return dataclasses.replace(CFG, security=SecurityConfig(**sec))


class Srv:
    """An in-process server; `channel(...)` opens plaintext or TLS channels to it."""

    def __init__(self, pipe, cfg):
        self.server = Server(pipe, cfg)
        self.channels = []

    async def __aenter__(self):
        await self.server.start()
        return self

    def channel(self, **tls):
        ch = security.channel(f"127.0.0.1:{self.server.port}", aio=True, **tls)
        self.channels.append(ch)
        return ch

    async def __aexit__(self, *exc):
        for ch in self.channels:
            await ch.close()
        await self.server.stop(1.0)


def md(name):
    return security.bearer_metadata(TOKENS[name])


async def code_of(coro):
    try:
        await coro
        return grpc.StatusCode.OK
    except grpc.aio.AioRpcError as e:
        return e.code()


def assert_exact(got, want):
    assert got.request_id == want.request_id and got.outcome == want.outcome
    assert got.probability_of_default == want.probability_of_default and got.score == want.score
    assert [(r.code, r.contribution) for r in got.reasons] == [(r.code, r.contribution) for r in want.reasons]


def test_tls_serves_only_tls(pipe, traffic, pki):
    req = traffic[3]
    [want] = pipe.decide([req])

    async def main():
        cfg = cfg_with(tls_cert=str(pki["server"].cert), tls_key=str(pki["server"].key))
        async with Srv(pipe, cfg) as s:
            got = await pb_grpc.UnderwritingStub(s.channel(tls_ca=str(pki["ca"].cert))).Decide(req, timeout=10)
            plain = await code_of(pb_grpc.UnderwritingStub(s.channel()).Decide(req, timeout=3))
            return got, plain

    got, plain = run(main())
    assert_exact(got, want)
    assert plain == grpc.StatusCode.UNAVAILABLE


def test_mtls_requires_a_client_certificate_from_the_ca(pipe, traffic, pki):
    req = traffic[4]
    [want] = pipe.decide([req])

    async def main():
        cfg = cfg_with(tls_cert=str(pki["server"].cert), tls_key=str(pki["server"].key),
                       tls_client_ca=str(pki["ca"].cert))
        ca = str(pki["ca"].cert)
        async with Srv(pipe, cfg) as s:
            ok = await pb_grpc.UnderwritingStub(s.channel(tls_ca=ca, tls_cert=str(pki["client"].cert),
                                                          tls_key=str(pki["client"].key))).Decide(req, timeout=10)
            no_cert = await code_of(pb_grpc.UnderwritingStub(s.channel(tls_ca=ca)).Decide(req, timeout=3))
            foreign = await code_of(pb_grpc.UnderwritingStub(
                s.channel(tls_ca=ca, tls_cert=str(pki["foreign"].cert), tls_key=str(pki["foreign"].key)))
                .Decide(req, timeout=3))
            return ok, no_cert, foreign

    ok, no_cert, foreign = run(main())
    assert_exact(ok, want)
    assert no_cert == grpc.StatusCode.UNAVAILABLE and foreign == grpc.StatusCode.UNAVAILABLE   # handshake refused


def test_mtls_identity_authorizes_listed_callers_only(pipe, traffic, pki):
    req = traffic[5]

    async def main():
        cfg = cfg_with(tls_cert=str(pki["server"].cert), tls_key=str(pki["server"].key),
                       tls_client_ca=str(pki["ca"].cert), auth="mtls", auth_file=str(pki["callers"]))
        ca = str(pki["ca"].cert)
        async with Srv(pipe, cfg) as s:
            def stub(who):
                return pb_grpc.UnderwritingStub(s.channel(tls_ca=ca, tls_cert=str(pki[who].cert),
                                                          tls_key=str(pki[who].key)))
            known = await code_of(stub("client").Decide(req, timeout=10))
            stranger = await code_of(stub("stranger").Decide(req, timeout=10))
            cn_only = await code_of(stub("cn_only").Decide(req, timeout=10))     # no SAN: the subject CN
            info_svc = await stub("client").GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
            info_cn = await stub("cn_only").GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
            return known, stranger, cn_only, info_svc, info_cn

    known, stranger, cn_only, info_svc, info_cn = run(main())
    assert known == grpc.StatusCode.OK and cn_only == grpc.StatusCode.OK
    assert stranger == grpc.StatusCode.UNAUTHENTICATED
    assert not info_svc.settings and info_cn.settings        # "introspect" gets the full answer


def test_token_auth_roles_health_and_exposure(pipe, traffic, pki):
    req = traffic[6]
    [want] = pipe.decide([req])

    async def main():
        cfg = cfg_with(auth="token", auth_file=str(pki["callers"]), reflection=True)
        async with Srv(pipe, cfg) as s:
            ch = s.channel()
            stub, hs = pb_grpc.UnderwritingStub(ch), health_pb2_grpc.HealthStub(ch)
            out = {
                "health": (await hs.Check(health_pb2.HealthCheckRequest(), timeout=5)).status,
                "none": await code_of(stub.Decide(req, timeout=5)),
                "wrong": await code_of(stub.Decide(req, timeout=5, metadata=(("authorization", "Bearer nope"),))),
                "malformed": await code_of(stub.Decide(req, timeout=5,
                                                       metadata=(("authorization", TOKENS["checkout"]),))),
                "reader_decide": await code_of(stub.Decide(req, timeout=5, metadata=md("reader"))),
                "checkout": await stub.Decide(req, timeout=10, metadata=md("checkout")),
                "info_anon": await code_of(stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5)),
                "info_checkout": await stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5, metadata=md("checkout")),
                "info_ops": await stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5, metadata=md("ops")),
            }
            admin = ch.unary_unary("/uwrt.v1.Admin/Reload", request_serializer=lambda b: b,
                                   response_deserializer=lambda b: b)
            out["admin_checkout"] = await code_of(admin(b"", timeout=5, metadata=md("checkout")))
            out["admin_ops"] = await code_of(admin(b"", timeout=5, metadata=md("ops")))
            out["denied"] = dict(s.server.interceptors[0].denied)
            refl = [(await asyncio.to_thread(_reflection_code, s.server.port, who)) for who in ("checkout", "ops")]
            out["refl_checkout"], out["refl_ops"] = refl
            return out

    o = run(main())
    assert o["health"] == health_pb2.HealthCheckResponse.SERVING                   # open, no token
    assert o["none"] == o["wrong"] == o["malformed"] == grpc.StatusCode.UNAUTHENTICATED
    assert o["reader_decide"] == grpc.StatusCode.PERMISSION_DENIED
    assert_exact(o["checkout"], want)
    assert o["info_anon"] == grpc.StatusCode.UNAUTHENTICATED
    assert o["info_checkout"].model.bundle_digest and not o["info_checkout"].settings     # minimal
    assert o["info_ops"].settings["batching.max_batch_size"] and o["info_ops"].features   # full
    # an unknown method (an admin service not registered here) needs "admin", checked before it is not found
    assert o["admin_checkout"] == grpc.StatusCode.PERMISSION_DENIED and o["admin_ops"] == grpc.StatusCode.UNIMPLEMENTED
    assert o["denied"]["unauthenticated"] >= 4 and o["denied"]["permission_denied"] >= 1
    assert o["refl_checkout"] == grpc.StatusCode.PERMISSION_DENIED and o["refl_ops"] == grpc.StatusCode.OK


def _reflection_code(port, who):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        try:
            for _ in stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                               timeout=5, metadata=md(who)):
                pass
            return grpc.StatusCode.OK
        except grpc.RpcError as e:
            return e.code()


def test_admin_role_reaches_registered_admin_methods(pipe, pki):
    """A service added later (the records engineer's admin service): "admin" by default."""
    from uwrt.runtime.serving.security import role_for
    assert role_for("/uwrt.v1.Admin/Reload") == "admin" and role_for("/grpc.health.v1.Health/Check") is None
    assert role_for("/uwrt.v1.Underwriting/Decide") == "decide"
    assert role_for("/uwrt.v1.Underwriting/SomethingNew") == "admin"      # fail closed


def test_priority_is_honoured_only_for_callers_with_the_role(pipe, traffic, pki):
    reqs = [copy(traffic[10]), copy(traffic[11])]
    for r in reqs:
        r.priority = 5

    async def main():
        cfg = cfg_with(auth="token", auth_file=str(pki["callers"]), model_info_exposure="full")
        async with Srv(pipe, cfg) as s:
            stub = pb_grpc.UnderwritingStub(s.channel())
            await stub.Decide(reqs[0], timeout=10, metadata=md("checkout"))
            after_checkout = s.server.rt.priority_ignored
            await stub.Decide(reqs[1], timeout=10, metadata=md("vip"))
            await stub.DecideStream(iter([reqs[0]]), timeout=10, metadata=md("checkout")).read()
            info = await stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5, metadata=md("ops"))
            return after_checkout, s.server.rt.priority_ignored, info

    after_checkout, total, info = run(main())
    assert after_checkout == 1 and total == 2        # checkout's unary and stream requests; vip's honoured
    assert info.settings["security.priority_ignored"] == "2"


def test_priority_reaches_the_batcher_only_when_allowed(pipe, traffic):
    seen = []

    async def main():
        server = Server(pipe, dataclasses.replace(CFG, batch_runner="thread"))
        real = server.rt.batcher.enqueue

        def spy(item, *, priority=0, deadline_us=None):
            seen.append(priority)
            return real(item, priority=priority, deadline_us=deadline_us)

        await server.rt.batcher.start()
        server.rt.batcher.enqueue = spy
        r = copy(traffic[12])
        r.priority = 3
        await server.rt.decide(r, time_remaining_s=10, priority_allowed=True)
        await server.rt.decide(r, time_remaining_s=10, priority_allowed=False)
        await server.rt.batcher.drain(5)
        server.rt.executor.shutdown()

    run(main())
    assert seen == [3, 0]


def test_callers_file_checks(tmp_path):
    good = tmp_path / "c.toml"
    good.write_text(f'[[caller]]\nname = "a"\nroles = ["decide"]\ntoken_sha256 = "{token_sha256("t")}"\n')
    os.chmod(good, 0o600)
    assert load_callers(str(good)).by_token_sha256[token_sha256("t")].roles == frozenset({"decide"})
    cases = {
        'name = "a"\nroles = ["decide"]\ntoken = "plaintext"\n': "plaintext token is never accepted",
        'name = "a"\nroles = ["root"]\ntoken_sha256 = "' + "0" * 64 + '"\n': "roles must be",
        'name = "a"\nroles = ["decide"]\ntoken_sha256 = "abc"\n': "64 lowercase hex",
        'name = "a"\nroles = ["decide"]\n': "needs token_sha256 and/or mtls_identity",
    }
    for body, msg in cases.items():
        f = tmp_path / "bad.toml"
        f.write_text("[[caller]]\n" + body)
        os.chmod(f, 0o600)
        with pytest.raises(SecurityError, match=msg):
            load_callers(str(f))
    os.chmod(good, 0o666)
    with pytest.raises(SecurityError, match="writable by group or others"):
        load_callers(str(good))
    with pytest.raises(SecurityError, match="cannot be read"):
        load_callers(str(tmp_path / "absent.toml"))


def test_config_refuses_unsafe_combinations():
    with pytest.raises(ValueError, match="bearer tokens in the clear"):
        RuntimeConfig(host="0.0.0.0", security=SecurityConfig(auth="token", auth_file="x"))
    RuntimeConfig(host="127.0.0.1", security=SecurityConfig(auth="token", auth_file="x"))     # loopback: allowed
    with pytest.raises(ValueError, match="tls_client_ca"):
        SecurityConfig(auth="mtls", auth_file="x")
    with pytest.raises(ValueError, match="go together"):
        SecurityConfig(tls_cert="a")
    with pytest.raises(ValueError, match="needs auth_file"):
        SecurityConfig(auth="token")


def test_server_refuses_unreadable_or_writable_tls_files(pipe, pki, tmp_path):
    with pytest.raises(SecurityError, match="cannot be read"):
        Server(pipe, cfg_with(tls_cert=str(tmp_path / "nope.pem"), tls_key=str(pki["server"].key)))
    loose = tmp_path / "loose.pem"
    loose.write_bytes(pki["server"].cert.read_bytes())
    os.chmod(loose, stat.S_IRUSR | stat.S_IWUSR | stat.S_IWOTH)
    with pytest.raises(SecurityError, match="writable by group or others"):
        Server(pipe, cfg_with(tls_cert=str(loose), tls_key=str(pki["server"].key)))


def test_token_tool_prints_an_entry_the_server_accepts(tmp_path, capsys):
    assert security.main(["token", "--name", "checkout", "--roles", "decide,priority"]) == 0
    out = capsys.readouterr()
    token = out.err.strip().rsplit(" ", 1)[-1]
    f = tmp_path / "callers.toml"
    f.write_text(out.out)
    os.chmod(f, 0o600)
    c = load_callers(str(f)).by_token_sha256[token_sha256(token)]
    assert c.name == "checkout" and c.roles == frozenset({"decide", "priority"})
    assert token not in out.out                         # the file gets the hash only


def test_admin_service_needs_the_admin_role_and_refuses_undecodable_requests(pipe, pki):
    """The Admin service (admin_enabled): role "admin" with auth on; its request parsed by
    runtime/serving/wire.py, so undecodable bytes are INVALID_ARGUMENT before Reload runs."""
    async def main():
        cfg = dataclasses.replace(cfg_with(auth="token", auth_file=str(pki["callers"])), admin_enabled=True)
        async with Srv(pipe, cfg) as s:
            reload_ = s.channel().unary_unary("/uwrt.v1.Admin/Reload", request_serializer=lambda b: b,
                                              response_deserializer=lambda b: b)
            out = {who: await code_of(reload_(b"", timeout=5, metadata=md(who) if who else ()))
                   for who in ("", "checkout")}
            try:
                await reload_(b"\x0a\xff\xff", timeout=5, metadata=md("ops"))
            except grpc.aio.AioRpcError as e:
                out["ops_garbage"] = (e.code(), e.details())
            out["reloads"] = s.server.reloader.stats()
            return out

    o = run(main())
    assert o[""] == grpc.StatusCode.UNAUTHENTICATED and o["checkout"] == grpc.StatusCode.PERMISSION_DENIED
    code, details = o["ops_garbage"]
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("request: not a valid uwrt.v1.")
    assert o["reloads"]["reloads"] == 0 and o["reloads"]["refused"] == 0          # Reload never ran
