"""Hostile input against `uwrt serve` (issue 13, server half), this checkout against a baseline
checkout in the same run:

1. **Huge requests**: four 63 MB Decide requests at once; the server's RSS before and its peak
   (VmHWM) after, the status codes.
2. **Valid traffic under that attack**: ~100 requests/s of valid Decide requests (open loop,
   200 ms deadline) for `--seconds`, with two 63 MB requests every 2 s from another thread;
   valid requests answered / failed (by code), latency p50 / p99 / max.
3. **Cost of TLS and auth per request** (this checkout only): one server each with plaintext,
   token auth, TLS, and mutual TLS + identity auth; sequential unary Decide in blocks of
   `--block` requests, round-robin over the servers, `--rounds` times; per block the server's
   CPU per request (utime + stime from /proc) and the median latency; medians and ranges over
   the blocks.

    python -m uwrt.bench.attack_bench --bundle bundles/demo --baseline-root /tmp/base \
        --out bench/results/attack_bench.json

`--baseline-root`: a checkout of the commit to compare with (e.g. `git archive main | tar -x -C
/tmp/base`); omitted: only this checkout. Servers run with --workers 1 on port 0. The machine's
load (uptime) is recorded before and after. Loopback only; bounded in count and time.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import selectors
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import grpc

from uwrt.bench.meta import git_sha
from uwrt.runtime.pb import pb, pb_grpc

#: this checkout (uwrt/bench is a symlink to bench/: resolve it)
ROOT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
DECIDE = "/uwrt.v1.Underwriting/Decide"
FRESH = [("grpc.use_local_subchannel_pool", 1), ("grpc.max_send_message_length", -1)]


class Serve:
    """`uwrt serve --workers 1 --port 0` from checkout `root`."""

    def __init__(self, root: str, bundle: str, extra: list[str] = (), label: str = "") -> None:
        self.label = label
        env = {**os.environ, "PYTHONPATH": root, "PYTHONUNBUFFERED": "1"}
        self.log = tempfile.NamedTemporaryFile("w+", prefix=f"attack-{label}-", suffix=".log", delete=False)
        cmd = [sys.executable, "-m", "uwrt.runtime.cli", "serve", "--bundle", os.path.abspath(bundle), "--port", "0",
               "--workers", "1", "--profile", "cpu", *extra]
        self.proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=self.log, text=True)
        assert self.proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        end = time.monotonic() + 300
        self.port = 0
        while time.monotonic() < end and sel.select(max(0.0, end - time.monotonic())):
            line = self.proc.stdout.readline()
            if not line:
                break
            m = re.search(r"uwrt serving on [\d.]+:(\d+)", line)
            if m:
                self.port = int(m.group(1))
                break
        if not self.port:
            self.stop()
            raise RuntimeError(f"{label}: uwrt serve did not start:\n{open(self.log.name).read()[-3000:]}")
        self.target = f"127.0.0.1:{self.port}"
        threading.Thread(target=lambda: [None for _ in self.proc.stdout], daemon=True).start()

    def status(self) -> dict[str, int]:
        out = {}
        with open(f"/proc/{self.proc.pid}/status") as fh:
            for line in fh:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "VmHWM"):
                    out[k] = int(v.split()[0]) // 1024     # MiB
        return out

    def cpu_s(self) -> float:
        with open(f"/proc/{self.proc.pid}/stat") as fh:
            f = fh.read().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def huge_request(req: pb.DecisionRequest, mb: int = 63) -> bytes:
    r = pb.DecisionRequest()
    r.CopyFrom(req)
    r.purchase.merchant_id = "x" * (mb << 20)
    return r.SerializeToString()


def code_of(fut) -> str:
    try:
        fut.result()
        return "OK"
    except grpc.RpcError as e:
        return e.code().name


def send_huge(target: str, data: bytes, n: int = 4) -> list[str]:
    with grpc.insecure_channel(target, options=FRESH) as ch:
        call = ch.unary_unary(DECIDE, request_serializer=lambda b: b, response_deserializer=lambda b: b)
        futs = [call.future(data, timeout=60) for _ in range(n)]
        return [code_of(f) for f in futs]


def memory(srv: Serve, data: bytes) -> dict:
    before = srv.status()
    codes = send_huge(srv.target, data)
    time.sleep(0.5)
    return {"rss_before_mib": before["VmRSS"], "hwm_before_mib": before["VmHWM"], **{
        f"{k.lower()}_after_mib": v for k, v in srv.status().items()}, "codes": codes}


def under_attack(srv: Serve, reqs: list[pb.DecisionRequest], data: bytes, seconds: float, rps: float) -> dict:
    stop = threading.Event()
    attack_codes: list[str] = []

    def attacker() -> None:
        while not stop.is_set():
            attack_codes.extend(send_huge(srv.target, data, 2))
            stop.wait(2.0)

    lat_ms: list[float] = []
    codes: dict[str, int] = {}
    lock = threading.Lock()
    with grpc.insecure_channel(srv.target, options=FRESH) as ch:
        stub = pb_grpc.UnderwritingStub(ch)
        grpc.channel_ready_future(ch).result(timeout=10)

        def done(t0: float, fut) -> None:
            c = code_of(fut)
            with lock:
                codes[c] = codes.get(c, 0) + 1
                if c == "OK":
                    lat_ms.append((time.perf_counter() - t0) * 1e3)

        hog = threading.Thread(target=attacker, daemon=True)
        hog.start()
        t_start = time.perf_counter()
        n = 0
        while (now := time.perf_counter()) - t_start < seconds:
            due = t_start + n / rps
            if due > now:
                time.sleep(due - now)
            t0 = time.perf_counter()
            fut = stub.Decide.future(reqs[n % len(reqs)], timeout=0.2)
            fut.add_done_callback(lambda f, t0=t0: done(t0, f))
            n += 1
        stop.set()
        hog.join(120)
        end = time.monotonic() + 30
        while sum(codes.values()) < n and time.monotonic() < end:
            time.sleep(0.05)
    lat_ms.sort()
    q = (lambda p: round(lat_ms[min(len(lat_ms) - 1, int(p * len(lat_ms)))], 2)) if lat_ms else (lambda p: None)
    return {"sent": n, "codes": codes, "p50_ms": q(0.5), "p99_ms": q(0.99), "max_ms": q(1.0),
            "attack_requests": len(attack_codes), "attack_codes": sorted(set(attack_codes)),
            "peak_rss_mib": srv.status()["VmHWM"]}


def auth_cost(root: str, bundle: str, reqs: list[pb.DecisionRequest], block: int, rounds: int) -> dict:
    import pathlib

    from tests.runtime.serving.tlsutil import issue, make_ca, server_cert  # test certificates, made now
    from uwrt.runtime.serving import security
    out = pathlib.Path(tempfile.mkdtemp(prefix="attack-pki-"))
    ca = make_ca(out)
    srv_cert = server_cert(ca, out)
    client = issue(ca, out, "bench", dns=("bench.clients.uwrt",), client=True)
    token = "bench-token-" + os.urandom(8).hex()
    callers = out / "callers.toml"
    callers.write_text(f'[[caller]]\nname = "bench"\nroles = ["decide"]\n'
                       f'token_sha256 = "{security.token_sha256(token)}"\nmtls_identity = "bench.clients.uwrt"\n')
    os.chmod(callers, 0o600)
    tls = ["--tls-cert", str(srv_cert.cert), "--tls-key", str(srv_cert.key)]
    configs = {
        "plaintext": ([], {}, ()),
        "token": (["--auth", "token", "--auth-file", str(callers)], {}, security.bearer_metadata(token)),
        "tls": (tls, {"tls_ca": str(ca.cert)}, ()),
        "mtls+auth": (tls + ["--tls-client-ca", str(ca.cert), "--auth", "mtls", "--auth-file", str(callers)],
                      {"tls_ca": str(ca.cert), "tls_cert": str(client.cert), "tls_key": str(client.key)}, ()),
    }
    servers = {k: Serve(root, bundle, v[0], label=k) for k, v in configs.items()}
    try:
        chans = {k: security.channel(servers[k].target, options=FRESH, **configs[k][1]) for k in configs}
        stubs = {k: pb_grpc.UnderwritingStub(c) for k, c in chans.items()}
        per: dict[str, dict[str, list[float]]] = {k: {"cpu_us": [], "p50_us": []} for k in configs}
        for k in configs:                                   # warm each connection
            for r in reqs[:50]:
                stubs[k].Decide(r, timeout=10, metadata=configs[k][2])
        for _ in range(rounds):
            for k in configs:
                srv, stub, md = servers[k], stubs[k], configs[k][2]
                lat = []
                c0 = srv.cpu_s()
                for i in range(block):
                    t0 = time.perf_counter_ns()
                    stub.Decide(reqs[i % len(reqs)], timeout=10, metadata=md)
                    lat.append(time.perf_counter_ns() - t0)
                per[k]["cpu_us"].append((srv.cpu_s() - c0) / block * 1e6)
                per[k]["p50_us"].append(statistics.median(lat) / 1e3)
        for c in chans.values():
            c.close()
    finally:
        for s in servers.values():
            s.stop()
    return {k: {m: {"median": round(statistics.median(v), 1), "min": round(min(v), 1), "max": round(max(v), 1)}
                for m, v in per[k].items()} for k in configs}


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", default="bundles/demo")
    ap.add_argument("--baseline-root", default="", help="checkout to compare with (omitted: this one only)")
    ap.add_argument("--seconds", type=float, default=10.0, help="valid traffic under attack, per server")
    ap.add_argument("--rps", type=float, default=100.0)
    ap.add_argument("--block", type=int, default=200, help="requests per block (auth cost)")
    ap.add_argument("--rounds", type=int, default=5, help="round-robin rounds (auth cost)")
    ap.add_argument("--skip-auth", action="store_true")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    from uwrt.demo.synth import generate
    reqs = generate(300, 11, id_prefix="a-").requests
    data = huge_request(reqs[0])
    res: dict = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "commit": git_sha(),
                 "cpus": os.cpu_count(), "load_before": uptime(), "runs": {}}
    roots = {"this": ROOT}
    if args.baseline_root:
        base_sha = subprocess.run(["cat", os.path.join(args.baseline_root, ".commit")], capture_output=True,
                                  text=True).stdout.strip()
        res["baseline_commit"] = base_sha or "unknown"
        roots = {"baseline": args.baseline_root, "this": ROOT}
    for label, root in roots.items():        # one server at a time: the RSS numbers are per process
        srv = Serve(root, args.bundle, label=label)
        try:
            run = {"memory": memory(srv, data)}
            print(label, "memory", run["memory"], flush=True)
            run["under_attack"] = under_attack(srv, reqs, data, args.seconds, args.rps)
            print(label, "under attack", run["under_attack"], flush=True)
            run["alive"] = srv.proc.poll() is None
        finally:
            srv.stop()
        res["runs"][label] = run
    if not args.skip_auth:
        res["auth_cost"] = auth_cost(ROOT, args.bundle, reqs, args.block, args.rounds)
        print("auth cost", json.dumps(res["auth_cost"]), flush=True)
    res["load_after"] = uptime()
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(res, fh, indent=1)
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
