"""The native engine (bench/native/h2gen.c, driven by uwrt.bench.loadgen.native) against real
grpc.aio servers on port 0: the schedule it used is Python's, every request is accounted for
(sent == completed + errors, unsent otherwise), errors are counted by gRPC status name from the
trailers, transport failures by name, latency runs from the intended send time through a server
stall, request ids are unique although bodies rotate, and the accounting of its records equals
the Python engine's Recorder.

The binary is built once per session into a temporary directory (bench/native/build.sh, never
installing anything); without libnghttp2's headers the tests skip, naming the package."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib

import grpc
import numpy as np
import pytest

from uwrt.bench import loadgen
from uwrt.bench.echo_server import EchoService
from uwrt.bench.loadgen import StepSpec
from uwrt.bench.loadgen import native as nat
from uwrt.bench.loadgen.accounting import Recorder, StepRaw, record_arrays
from uwrt.bench.loadgen.traffic import RequestSource, schedule
from uwrt.runtime.pb import pb

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LONG = 30.0      # deadline (s) in tests that expect no failure: no request misses it on a loaded machine
TRANSPORT_NAMES = {"UNAVAILABLE_CONNECT", "UNAVAILABLE_CONN_LOST", "UNAVAILABLE_GOAWAY", "RST_STREAM_CANCEL",
                   "RST_STREAM_REFUSED_STREAM", "RST_STREAM_NO_ERROR", "RST_STREAM_INTERNAL_ERROR",
                   "INTERNAL_NO_GRPC_STATUS", "UNAVAILABLE", "CANCELLED"}


def build_or_skip(script: str, out) -> str:
    """Build with bench/native/<script> (never installing anything); skips with the script's own
    message, which names the missing compiler or Debian package, when a prerequisite is absent."""
    proc = subprocess.run(["sh", os.path.join(ROOT, "bench", "native", script), str(out), "--no-install"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        if "headers are missing" in proc.stderr or "compiler (" in proc.stderr:
            pytest.skip(f"{script}: " + " ".join(proc.stderr.split()))
        pytest.fail(f"bench/native/{script} failed:\n{proc.stderr}")
    return str(out)


@pytest.fixture(scope="session")
def h2gen(tmp_path_factory):
    """A freshly built h2gen (skips, naming the missing package, when it cannot be built)."""
    return build_or_skip("build.sh", tmp_path_factory.mktemp("h2gen") / "h2gen")


@pytest.fixture
def native_bin(h2gen, monkeypatch):
    monkeypatch.setenv("UWRT_H2GEN", h2gen)
    return h2gen


def _absolute(details: dict, recs_ns: np.ndarray) -> np.ndarray:
    return details["t0_ns"] + recs_ns


# ---- accounting: the records' arrays count exactly as the Recorder does ------------------------------

def test_record_arrays_equal_the_recorder(rng):
    n = int(rng.integers(50, 400))
    intended = np.sort(rng.integers(0, 5_000_000, n)) * 1000              # us-aligned ns: exact in both
    lag = rng.choice([0, 1, 2, 900, 1000, 1001, 5000, 40000], n) * 1000 + 250
    sent = np.where(rng.random(n) < 0.1, -1, intended + lag)
    done = sent + rng.integers(10, 50_000, n) * 1000 + 100                 # latency x.35 us: no rounding tie
    status = rng.choice([0, 0, 0, 8, 3, 102], n).astype(np.uint16)
    names = {0: "OK", 3: "INVALID_ARGUMENT", 8: "RESOURCE_EXHAUSTED", 102: "UNAVAILABLE_CONN_LOST"}
    timing = rng.integers(0, 10_000, (n, 6))
    has_timing = rng.random(n) < 0.8
    adverse = rng.random(n) < 0.3
    a = StepRaw()
    record_arrays(a, intended, sent, done, status, names, timing=timing, has_timing=has_timing, adverse=adverse)
    rec = Recorder()
    for i in range(n):
        if sent[i] < 0:
            rec.on_unsent()
            continue
        rec.on_send(intended[i] / 1e9, sent[i] / 1e9)
        t = tuple(int(x) for x in timing[i]) + (bool(adverse[i]),) if has_timing[i] else None
        rec.on_done(intended[i] / 1e9, done[i] / 1e9, names[int(status[i])], t)
    b = rec.raw
    assert (a.sent, a.unsent, a.ok, a.late, dict(a.errors)) == (b.sent, b.unsent, b.ok, b.late, dict(b.errors))
    assert (a.adverse, a.policy_us_adverse, a.policy_us_other) == (b.adverse, b.policy_us_adverse, b.policy_us_other)
    for ha, hb in [(a.lat, b.lat), (a.lag, b.lag)] + [(a.stages[k], b.stages[k]) for k in a.stages]:
        assert np.array_equal(ha.counts, hb.counts) and (ha.count, ha.total, ha.min, ha.max) == (
            hb.count, hb.total, hb.min, hb.max)


def test_bodies_file_frames_grpc_and_marks_the_id_digits(own_traffic):
    src = RequestSource(list(own_traffic[:5]), id_prefix="p-")
    ids = [r.request_id for r in src.pool]
    blob = nat.encode_bodies(src, 3, "t9")
    assert [r.request_id for r in src.pool] == ids                # the pool is left as it was
    assert int.from_bytes(blob[:4], "little") == 3                 # no more bodies than requests
    off = 4
    for k in range(3):
        ln, id_off, width = (int.from_bytes(blob[off + 4 * j: off + 4 * j + 4], "little") for j in range(3))
        body = blob[off + 12: off + 12 + ln]
        assert body[0] == 0 and int.from_bytes(body[1:5], "big") == ln - 5
        msg = pb.DecisionRequest.FromString(body[5:])
        assert msg.request_id == nat.native_request_id(src, "t9", 0) and msg.history == own_traffic[k].history
        patched = body[:id_off] + b"%0*d" % (width, 1234567) + body[id_off + width:]
        assert pb.DecisionRequest.FromString(patched[5:]).request_id == nat.native_request_id(src, "t9", 1234567)
        off += 12 + ln
    assert off == len(blob)
    health = nat.encode_bodies(None, 10, "h")
    assert health == (1).to_bytes(4, "little") + (5).to_bytes(4, "little") + (0xFFFFFFFF).to_bytes(4, "little") + \
        (0).to_bytes(4, "little") + b"\x00\x00\x00\x00\x00"


def test_engine_choice(monkeypatch, tmp_path):
    monkeypatch.setenv("UWRT_H2GEN", str(tmp_path / "absent"))
    monkeypatch.setattr(nat, "BINARY", str(tmp_path / "absent"))
    eng, why = nat.choose_engine("auto", rpc="decide", closed=False, procs=1)
    assert eng == "python" and "make bench-native" in why and "libnghttp2-dev" in why
    eng, why = nat.choose_engine("native", rpc="decide", closed=False, procs=1)
    assert eng is None and "make bench-native" in why
    assert nat.choose_engine("python", rpc="stream", closed=True, procs=4) == ("python", None)
    exe = tmp_path / "h2gen"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    monkeypatch.setenv("UWRT_H2GEN", str(exe))
    assert nat.choose_engine("auto", rpc="health", closed=False, procs=1) == ("native", None)
    eng, why = nat.choose_engine("auto", rpc="stream", closed=False, procs=1)
    assert eng == "python" and "--stream" in why
    eng, why = nat.choose_engine("native", rpc="decide", closed=True, procs=1)
    assert eng is None and "closed loop" in why


# ---- against real servers ------------------------------------------------------------------------------

class Recording(EchoService):
    """Records every request's id and history length; fails or stalls on purpose when told."""

    def __init__(self, fail=None, stall_at: int | None = None, stall_s: float = 0.0) -> None:
        super().__init__()
        self.ids: list[str] = []
        self.events: list[int] = []
        self.fail = fail                  # index -> grpc.StatusCode | None
        self.stall_at, self.stall_s = stall_at, stall_s
        self.stall: tuple[float, float] | None = None

    async def respond(self, request, context):
        i = len(self.ids)
        self.ids.append(request.request_id)
        self.events.append(len(request.history.type))
        if self.stall_at is not None and i == self.stall_at:
            t = time.monotonic()
            time.sleep(self.stall_s)      # blocks the server's event loop: nothing is answered meanwhile
            self.stall = (t, time.monotonic())
        code = self.fail(request.request_id) if self.fail else None
        if code is not None:
            await context.abort(code, "failing on purpose")
        return await super().respond(request, context)


def test_native_step_counts_every_request_on_pythons_schedule(native_bin, echo_factory, own_traffic, rng):
    svc = Recording()
    e = echo_factory(svc)
    pool = list(own_traffic[: int(rng.integers(3, 30))])
    src = RequestSource(pool, id_prefix="n-")
    seed, arrivals = int(rng.integers(0, 2**31)), str(rng.choice(["poisson", "constant"]))
    spec = StepSpec(rate=float(rng.integers(100, 400)), duration_s=0.6, arrivals=arrivals, seed=seed, timeout_s=LONG,
                    connections=int(rng.integers(1, 5)), engine="native", tag="sch")
    raw, d = nat.run_native_step(e.target, spec, src)
    # the schedule it used is the one Python computes for this spec (the Python engine's, too)
    offs = schedule(spec.rate, spec.duration_s, arrivals, np.random.default_rng([seed, 0, zlib.crc32(b"sch")]))
    assert np.array_equal(d["offsets_ns"], np.round(offs * 1e9).astype(np.int64))
    assert raw.scheduled == len(offs) == raw.sent + raw.unsent
    assert raw.sent == raw.ok + sum(raw.errors.values()) and raw.errors == {} and raw.ok == len(svc.ids)
    assert d["connects"] == spec.connections and raw.stages["total_us"].count == raw.ok
    # bodies rotate through the pool, ids never repeat: request i carries pool[i % len(pool)] and id i
    expect = [nat.native_request_id(src, "schw0", i) for i in range(raw.sent)]
    assert sorted(svc.ids) == sorted(expect)
    by_id = dict(zip(svc.ids, svc.events, strict=True))
    assert all(by_id[expect[i]] == len(pool[i % len(pool)].history.type) for i in range(raw.sent))


def test_native_errors_are_counted_by_grpc_status_name(native_bin, echo_factory, own_traffic):
    def fail(rid: str):
        i = int(rid.rsplit("-", 1)[1])
        return {1: grpc.StatusCode.RESOURCE_EXHAUSTED, 2: grpc.StatusCode.INVALID_ARGUMENT}.get(i % 3)

    svc = Recording(fail=fail)
    e = echo_factory(svc)
    spec = StepSpec(rate=300, duration_s=0.5, arrivals="constant", engine="native", connections=2, tag="err",
                    timeout_s=LONG)
    row = loadgen.run_step(e.target, spec, RequestSource(list(own_traffic[:10])))
    n = row["sent"]
    assert n == row["scheduled"] > 10 and row["engine"] == "native"
    assert row["errors"] == {"RESOURCE_EXHAUSTED": (n + 1) // 3, "INVALID_ARGUMENT": n // 3}
    assert row["completed"] == n - (n + 1) // 3 - n // 3 and row["completed"] + row["error_count"] == n
    assert row["p99_all_ms"] == float("inf")


def _run_keeping_records(target, spec, source, tmp_path):
    """run_native_step, also returning h2gen's per-request records."""
    raw, d = nat.run_native_step(target, spec, source, keep_dir=str(tmp_path / spec.tag))
    return raw, d, np.fromfile(tmp_path / spec.tag / "records.bin", dtype=nat.RECORD)


def test_native_latency_runs_from_the_intended_time_through_a_server_stall(native_bin, echo_factory, own_traffic,
                                                                            tmp_path):
    svc = Recording(stall_at=20, stall_s=0.3)
    e = echo_factory(svc)
    spec = StepSpec(rate=200, duration_s=1.0, arrivals="constant", timeout_s=LONG, engine="native", tag="stall")
    raw, d, recs = _run_keeping_records(e.target, spec, RequestSource(list(own_traffic[:10])), tmp_path)
    assert raw.errors == {} and raw.ok == raw.scheduled and svc.stall is not None
    s0, s1 = (int(t * 1e9) for t in svc.stall)            # time.monotonic: h2gen's CLOCK_MONOTONIC
    t_int, t_sent, t_done = (_absolute(d, recs[k]) for k in ("intended_ns", "sent_ns", "done_ns"))
    during = (t_int > s0) & (t_int < s1)
    assert during.sum() > 0
    # open loop: the generator kept sending during the stall (no coordinated omission) ...
    assert np.any(t_sent[during] < s1)
    # ... and those requests' latency, from their intended time, includes the rest of the stall
    assert np.all(t_done[during] >= s1)
    lat_us = np.rint((t_done - t_int) / 1e3).astype(np.int64)
    assert np.all(lat_us[during] >= (s1 - t_int[during]) // 1000)
    assert raw.lat.max == lat_us.max()                   # the step's histogram holds exactly these latencies


def test_native_transport_failures_are_named(native_bin, echo_factory, own_traffic, tmp_path):
    # nothing listens on a bound, non-listening socket's port: every request fails to connect
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        target = f"127.0.0.1:{s.getsockname()[1]}"
        raw, d = nat.run_native_step(target, StepSpec(rate=200, duration_s=0.2, rpc="health", engine="native",
                                                      tag="nc"), None)
    assert raw.sent == raw.scheduled > 0 and raw.ok == 0
    assert dict(raw.errors) == {"UNAVAILABLE_CONNECT": raw.sent} and d["connect_failures"] >= 1
    # a server that stops mid-step: everything sent after it stopped fails, under a transport name
    e = echo_factory(Recording())
    stopped: list[int] = []

    def stop_later():
        time.sleep(0.3)
        e.lt.run(e.server.stop(0))
        stopped.append(time.monotonic_ns())

    th = threading.Thread(target=stop_later)
    th.start()
    spec = StepSpec(rate=200, duration_s=0.8, arrivals="constant", engine="native", connections=2, tag="stop",
                    timeout_s=LONG)
    raw, d, recs = _run_keeping_records(e.target, spec, RequestSource(list(own_traffic[:5])), tmp_path)
    th.join()
    assert raw.sent == raw.ok + sum(raw.errors.values()) and raw.ok > 0 and raw.errors
    assert set(raw.errors) <= TRANSPORT_NAMES, raw.errors
    after = _absolute(d, recs["sent_ns"]) > stopped[0]
    assert after.sum() > 0 and np.all(recs["status"][after] != 0)


def test_native_sigstop_makes_sends_late_and_latency_counts_it(native_bin, echo_server, tmp_path, monkeypatch):
    """The generator itself paused (SIGSTOP) for 0.2 s: requests intended meanwhile go out late,
    are flagged late, and their latency includes the lateness (intended -> done, not sent -> done)."""
    spec = StepSpec(rate=200, duration_s=2.0, rpc="health", arrivals="constant", engine="native", tag="stop2",
                    timeout_s=LONG)
    def run_with_pause(cmd, **kw):
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(0.5)
        p.send_signal(signal.SIGSTOP)
        time.sleep(0.2)
        p.send_signal(signal.SIGCONT)
        out, err = p.communicate(timeout=60)
        return subprocess.CompletedProcess(cmd, p.returncode, out, err)

    monkeypatch.setattr(nat.subprocess, "run", run_with_pause)
    raw, d, recs = _run_keeping_records(echo_server.target, spec, None, tmp_path)
    monkeypatch.undo()
    assert raw.errors == {} and raw.ok == raw.sent == raw.scheduled
    lag = recs["sent_ns"] - recs["intended_ns"]
    assert raw.late == int((lag > 1_000_000).sum()) > 0
    lat_us = np.maximum(0, np.rint((recs["done_ns"] - recs["intended_ns"]) / 1e3))
    assert raw.lat.max >= lat_us.max() >= lag.max() / 1e3
    row = loadgen.summarize(spec, raw)
    assert row["fell_behind"] and row["late_sends"] == raw.late


def test_cli_native_engine_with_floor_and_pinning(native_bin, echo_server, tmp_path):
    out = tmp_path / "run.json"
    cpus = sorted(os.sched_getaffinity(0))
    client, server = str(cpus[0]), str(cpus[-1])
    rc = loadgen.main(["--target", echo_server.target, "--rates", "100,200", "--duration", "0.4", "--warmup", "0",
                       "--pool", "20", "--engine", "native", "--floor", "--client-cpus", client,
                       "--server-cpus", server, "--connections", "3", "--timeout-ms", str(LONG * 1e3),
                       "--json", str(out), "--quiet"])
    os.sched_setaffinity(0, cpus)                     # the CLI pinned this (the test) process
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["meta"]["engine"] == "native" and doc["meta"]["floor_target"]
    series = [(r["target_rps"], r["series"]) for r in doc["steps"]]
    assert series == [(100.0, "model"), (100.0, "floor-health"), (100.0, "floor-echo"),
                      (200.0, "model"), (200.0, "floor-health"), (200.0, "floor-echo")]
    for r in doc["steps"]:
        assert r["engine"] == "native" and r["client_cpus"] == client and r["errors"] == {}
        assert r["completed"] == r["sent"] > 0 and r["connections"] == 3
        if r["series"] != "model":
            assert r["server_cpus"] == server                 # the echo server started pinned
        health = r["series"] == "floor-health"
        assert (r["server_mean_us"]["total_us"] is None) == health   # absent where there is none, never 0


def test_native_health_rows_have_no_server_timing(native_bin, echo_server):
    row = loadgen.run_step(echo_server.target, StepSpec(rate=100, duration_s=0.3, rpc="health", engine="native",
                                                        tag="h", timeout_s=LONG))
    assert row["errors"] == {} and row["completed"] == row["sent"] > 0
    assert all(np.isnan(v) for v in row["server_mean_us"].values()) and row["adverse_share"] is None



def test_native_fifo_option(native_bin, echo_server):
    if os.geteuid() != 0:
        pytest.skip("SCHED_FIFO needs root")
    row = loadgen.run_step(echo_server.target, StepSpec(rate=100, duration_s=0.3, rpc="health", engine="native",
                                                        fifo=True, tag="fifo", timeout_s=LONG))
    assert row["client_fifo"] and row["errors"] == {} and row["completed"] == row["sent"] > 0


# ---- bench/transport_floor.py: the floor's CPU per request next to uwrt's ---------------------------

def test_transport_floor_measures_bare_and_echo_servers(native_bin, tmp_path):
    """A short real run (in a subprocess: it pins itself): every step completes its requests with
    no error, server CPU is read from /proc (> 0), and the bare server's fixed bytes are a
    DecisionResponse (the generator parses what it gets back)."""
    from uwrt.bench.transport_floor import BARE_RESPONSE
    assert pb.DecisionResponse.FromString(BARE_RESPONSE).request_id.startswith("bare-")
    out = tmp_path / "floor.json"
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-m", "uwrt.bench.transport_floor", "--servers", "bare,echo",
                           "--rates", "150", "--duration", "1", "--warmup", "0.5", "--rounds", "1",
                           "--json", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())["rows"]
    assert sorted(r["server"] for r in rows) == ["bare", "echo"]
    for r in rows:
        assert r["completed"] > 50 and not r["errors"] and r["server_cpu_s"] > 0, r
    assert "| bare | native | 150 |" in proc.stdout and "| echo | native | 150 |" in proc.stdout


def test_cxx_echo_answers_the_bare_bytes_and_stops_on_sigterm(tmp_path):
    """bench/native/cxx_echo.cc (the C++ transport floor): built with the system compiler, it answers
    any unary call with exactly the bare Python server's bytes, and SIGTERM stops it (exit 0)."""
    from uwrt.bench.transport_floor import BARE_RESPONSE
    exe = build_or_skip("build_cxx_echo.sh", tmp_path / "cxx_echo")
    srv = subprocess.Popen([exe], stdout=subprocess.PIPE, text=True)
    try:
        line = srv.stdout.readline()
        assert line.startswith("echo serving on 127.0.0.1:"), line
        target = line.split()[-1]
        with grpc.insecure_channel(target) as ch:
            call = ch.unary_unary("/uwrt.v1.Underwriting/Decide", request_serializer=lambda b: b,
                                  response_deserializer=lambda b: b)
            body = os.urandom(int(np.random.default_rng().integers(1, 2000)))
            assert call(body, timeout=LONG) == BARE_RESPONSE
            assert pb.DecisionResponse.FromString(call(b"\x0a\x01x", timeout=LONG)).request_id.startswith("bare-")
        srv.send_signal(signal.SIGTERM)
        assert srv.wait(timeout=LONG) == 0
    finally:
        if srv.poll() is None:
            srv.kill()
            srv.wait()
