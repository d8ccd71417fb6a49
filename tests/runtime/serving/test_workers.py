"""Worker plan, port checks and GetModelInfo's worker settings, in process (no worker processes:
those are tests/runtime/serving/test_supervisor.py)."""
import asyncio
import os
import socket

import grpc
import pytest
from grpc_health.v1 import health, health_pb2_grpc

from uwrt.runtime.config import RuntimeConfig
from uwrt.runtime.serving import ports
from uwrt.runtime.serving.server import Server
from uwrt.runtime.serving.workers import (
    digest_matches,
    pinned_config,
    plan_workers,
    usable_cpus,
    worker_settings,
    write_status,
)


@pytest.mark.parametrize("workers,pin,device,cpus,count,cores", [
    ("auto", "auto", "cpu", [0, 1], 2, (0, 1)),            # one per usable cpu, pinned
    ("auto", "auto", "cpu", [3, 5, 7], 3, (3, 5, 7)),      # the affinity set's cpus, not 0..n-1
    ("auto", "auto", "cuda", [0, 1, 2, 3], 1, (None,)),    # gpu profile: one process owns the GPU
    ("auto", "auto", "cpu", [4], 1, (None,)),              # one cpu: single process, not pinned
    ("1", "auto", "cpu", [0, 1], 1, (None,)),
    ("1", "on", "cpu", [2, 3], 1, (2,)),                   # explicit: pin even one process
    ("3", "auto", "cpu", [0, 1], 3, (None, None, None)),   # more workers than cpus: not pinned
    ("3", "on", "cpu", [0, 1], 3, (0, 1, 0)),              # ... unless asked: round robin
    ("2", "off", "cpu", [0, 1], 2, (None, None)),
])
def test_plan_workers(workers, pin, device, cpus, count, cores):
    cfg = RuntimeConfig(workers=workers, pin_workers=pin, encoder_device=device)
    plan = plan_workers(cfg, cpus)
    assert plan.count == count and plan.cpus == cores
    assert plan.pinned == any(c is not None for c in cores)
    assert str(count) in plan.describe()


def test_plan_uses_this_process_affinity():
    assert plan_workers(RuntimeConfig()).count == len(os.sched_getaffinity(0)) == len(usable_cpus())


def test_workers_knob_validation_and_toml_integer(tmp_path):
    for bad in ("0", "-1", "two", ""):
        with pytest.raises(ValueError, match="workers"):
            RuntimeConfig(workers=bad)
    with pytest.raises(ValueError, match="pin_workers"):
        RuntimeConfig(pin_workers="yes")
    with pytest.raises(ValueError, match="bundle_digest"):
        RuntimeConfig(bundle_digest="abc")             # shorter than the 12 digits the logs print
    f = tmp_path / "c.toml"
    f.write_text("workers = 3\npin_workers = 'off'\n")
    c = RuntimeConfig.load(str(f), env={"UWRT_RESTART_BACKOFF_S": "0.5"})
    assert c.workers == "3" and c.pin_workers == "off" and c.restart_backoff_s == 0.5


def test_config_dict_round_trip():
    c = RuntimeConfig.load(env={}, workers="4", max_wait_us=123, length_buckets=(4, 16), grace_s=2)
    assert RuntimeConfig.from_dict(c.to_dict()) == c
    import json
    assert RuntimeConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c   # as a worker receives it


def test_pinned_config_one_thread_each():
    cfg, changed = pinned_config(RuntimeConfig(tree_threads=2, onnx_intra_op_threads=0))
    assert (cfg.tree_threads, cfg.onnx_intra_op_threads, cfg.torch_threads, cfg.onnx_inter_op_threads) == (1, 1, 1, 1)
    assert set(changed) == {"tree_threads", "onnx_intra_op_threads"}


def test_digest_matches():
    d = "f903d3d0efa9" + "0" * 52
    assert digest_matches(d, d) and digest_matches(d[:12], d)
    assert not digest_matches(d[:11], d) and not digest_matches("a" * 12, d) and not digest_matches("", d)


def test_worker_settings_single_and_supervised(tmp_path):
    s = worker_settings(index=0, count=1, cpu=None)
    assert s == {"workers.count": 1, "workers.mode": "single", "workers.this.index": 0,
                 "workers.this.pid": os.getpid(), "workers.this.cpu": None}
    f = tmp_path / "workers.json"
    write_status(f, {"supervisor_pid": 7, "address": "127.0.0.1:1", "count": 2, "restarts": 3, "refused": 1,
                     "workers": [{"index": 0, "pid": 11, "cpu": 0, "state": "serving", "restarts": 3,
                                  "last_exit": "killed by SIGKILL"},
                                 {"index": 1, "pid": None, "cpu": 1, "state": "backoff", "restarts": 0,
                                  "last_exit": None}]})
    s = worker_settings(index=1, count=2, cpu=1, status_file=f)
    assert s["workers.mode"] == "supervised" and s["workers.this.cpu"] == 1 and s["workers.restarts"] == 3
    assert s["workers.0.last_exit"] == "killed by SIGKILL" and s["workers.1.pid"] is None
    assert s["workers.1.state"] == "backoff" and s["workers.supervisor_pid"] == 7
    f.unlink()
    assert "workers.status_error" in worker_settings(index=1, count=2, cpu=1, status_file=f)


# ---------------------------------------------------------------- ports


def _listener(reuseport: bool) -> socket.socket:
    s = socket.socket()
    if reuseport:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


@pytest.mark.parametrize("reuseport", [False, True])
def test_check_free_refuses_any_listener(reuseport):
    with _listener(reuseport) as s:
        port = s.getsockname()[1]
        with pytest.raises(ports.PortUnavailable, match=rf"listen on 127\.0\.0\.1:{port}: the address is in use"):
            ports.check_free("127.0.0.1", port)
        with pytest.raises(ports.PortUnavailable, match="in use"):
            ports.reserve("127.0.0.1", port)
    assert ports.check_free("127.0.0.1", port) == port


async def _grpc_bind(port: int, reuseport: int) -> int:
    srv = grpc.aio.server(options=[("grpc.so_reuseport", reuseport)])
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), srv)
    try:
        got = srv.add_insecure_port(f"127.0.0.1:{port}")
    except RuntimeError:
        return 0
    await srv.start()
    await srv.stop(None)
    return got


def test_reservation_admits_only_reuseport_listeners():
    res = ports.reserve("127.0.0.1", 0)          # port 0 -> a concrete port, held
    try:
        assert res.port > 0 and res.address == f"127.0.0.1:{res.port}"
        with pytest.raises(ports.PortUnavailable):
            ports.check_free("127.0.0.1", res.port)              # a plain bind (another uwrt serve's check)
        assert asyncio.run(_grpc_bind(res.port, 0)) == 0         # a server with SO_REUSEPORT off
        assert asyncio.run(_grpc_bind(res.port, 1)) == res.port  # a worker joins
    finally:
        res.close()
    assert ports.check_free("127.0.0.1", res.port) == res.port


def test_single_process_server_refuses_an_occupied_port(pipe):
    with _listener(reuseport=True) as s:     # even a listener that would share: SO_REUSEPORT is off on ours
        port = s.getsockname()[1]

        async def main():
            Server(pipe, RuntimeConfig(port=port))
        with pytest.raises(ports.PortUnavailable, match=rf"127\.0\.0\.1:{port}.*in use"):
            asyncio.run(main())


def test_late_bind_server_warms_before_listening(pipe):
    """bind=False (a worker): nothing listens until start(), which warms first, then binds."""
    async def main():
        server = Server(pipe, RuntimeConfig(port=0), reuse_port=True, bind=False)
        assert server.port == 0
        await server.warm_up()
        assert server.port == 0 and server._warm
        await server.start(warm=False)
        port = server.port
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            from uwrt.runtime.pb import pb, pb_grpc
            info = await pb_grpc.UnderwritingStub(ch).GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
        ok = await server.stop(1.0)
        return port, info, ok

    port, info, ok = asyncio.run(main())
    assert port > 0 and ok
    assert info.settings["stats.batches"] == "0"       # warm-up batches ran before serving, not through the batcher


def test_single_process_refuses_another_bundle_digest(small_bundle, capsys):
    """`bundle_digest` in one-process mode: the loaded bundle's digest must match, else exit 2."""
    import json

    from uwrt.runtime.cli.main import main
    digest = json.loads((small_bundle / "manifest.json").read_text())["bundle_digest"]
    wrong = "0123456789ab" if not digest.startswith("0123456789ab") else "ba9876543210"
    rc = main(["serve", "--profile", "cpu", "--bundle", str(small_bundle), "--port", "0", "--workers", "1",
               "--bundle-digest", wrong])
    err = capsys.readouterr().err
    assert rc == 2 and f"has bundle digest {digest[:12]}, but bundle_digest = {wrong} is required" in err
