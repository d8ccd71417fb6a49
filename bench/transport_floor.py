"""Server CPU per request of the transport floor next to uwrt's, in one round-robin run.

    python -m uwrt.bench.transport_floor [--bundle bundles/demo] [--servers bare,echo,uwrt]
        [--rates 400,1000] [--duration 8] [--warmup 2] [--rounds 3] [--server-core 1] [--gen-core 0]
        [--h2load] [--json bench/results/transport_floor.json]

Answers "how much of uwrt's CPU per request is the model path, and how much would any grpc.aio
server spend on this machine?", the question behind issue 12's 0.6 ms target. Servers:

  * `bare`: the smallest grpc.aio server there is (this module, `--serve-bare`): one generic
    unary handler that returns fixed bytes (480, the size of an adverse DecisionResponse), no
    protobuf, no health service, no options;
  * `echo`: `uwrt.bench.echo_server` (protobuf parse, a DecisionResponse built per request);
  * `uwrt`: `uwrt serve --workers 1` with the bundle (its pinned-worker configuration);
  * `cxx` (optional): the same fixed bytes from a gRPC C++ server (bench/native/cxx_echo.cc, the
    callback API's generic service over Debian's libgrpc++; built on first use into
    build/bench/cxx_echo by bench/native/build_cxx_echo.sh, which installs libgrpc++-dev as root):
    what a native front end would cost on the same core.

For every round, every server (started fresh, pinned to `--server-core` from its first
instruction) and every rate: a warm-up step, then a measured step of the native open-loop engine
(`--engine native`, Poisson, unary Decide, pinned to `--gen-core`), with the server's CPU (user +
system, all threads, /proc) over the step divided by the requests it completed. With `--h2load`
the bare (and cxx) server is also driven by Debian's h2load at 1000/s (`-c 10 --rps 100`), an independent
generator, so a floor that only our generator saw would show. Prints one line per step and a table
of medians [min..max]; `--json` keeps every step.

Thread safety: a command-line program; one server at a time.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

# 480 bytes (an adverse DecisionResponse's size): field 1 (request_id), a 477-byte string, length varint 0xdd 0x03
BARE_RESPONSE = b"\x0a\xdd\x03" + b"bare-" + b"x" * 472


def serve_bare() -> None:
    import grpc

    async def decide(request: bytes, context: object) -> bytes:
        return BARE_RESPONSE

    async def main() -> None:
        server = grpc.aio.server()
        handler = grpc.method_handlers_generic_handler("uwrt.v1.Underwriting", {
            "Decide": grpc.unary_unary_rpc_method_handler(decide)})
        server.add_generic_rpc_handlers((handler,))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        print(f"echo serving on 127.0.0.1:{port}", flush=True)     # the line ServerProcess waits for
        await server.wait_for_termination()

    asyncio.run(main())


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CXX_ECHO = os.path.join(ROOT, "build", "bench", "cxx_echo")


def _cxx_echo() -> str:
    """The cxx_echo binary, built first when absent (raises SystemExit naming what is missing)."""
    if not os.path.exists(CXX_ECHO):
        proc = subprocess.run(["sh", os.path.join(ROOT, "bench", "native", "build_cxx_echo.sh")], text=True,
                              capture_output=True)
        if proc.returncode != 0:
            raise SystemExit(f"--servers cxx: cannot build bench/native/cxx_echo.cc:\n{proc.stderr.strip()}")
    return CXX_ECHO


def _command(name: str, bundle: str) -> list[str]:
    from uwrt.bench.servers import server_command
    if name == "cxx":
        return [_cxx_echo()]
    if name == "bare":
        return [sys.executable, "-m", "uwrt.bench.transport_floor", "--serve-bare"]
    if name == "uwrt":
        return server_command("uwrt", bundle, "--workers 1")
    return server_command(name, bundle)


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _h2load(target: str, pid: int, duration: float, gen_core: int) -> dict:
    body = tempfile.NamedTemporaryFile(suffix=".bin", delete=False)
    msg = b"\x0a\x03abc"
    body.write(b"\x00" + len(msg).to_bytes(4, "big") + msg)
    body.close()
    try:
        c0, t0 = _cpu_s(pid), time.monotonic()
        out = subprocess.run(["taskset", "-c", str(gen_core), "h2load", "-c", "10", "--rps", "100", "-D",
                              str(int(duration)), "-d", body.name, "-H", "te: trailers", "-H",
                              "content-type: application/grpc", f"http://{target}/uwrt.v1.Underwriting/Decide"],
                             capture_output=True, text=True, timeout=duration + 60)
        cpu, wall = _cpu_s(pid) - c0, time.monotonic() - t0
    finally:
        os.unlink(body.name)
    done = 0
    for line in out.stdout.splitlines():
        if line.startswith("requests:"):
            done = int(line.split("succeeded")[0].split(",")[-1].split()[0])
    return {"generator": "h2load", "rate": 1000.0, "completed": done, "wall_s": wall, "server_cpu_s": cpu,
            "server_cpu_us_per_req": cpu / done * 1e6 if done else None, "p99_ms": None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--serve-bare", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--bundle", default="bundles/demo")
    ap.add_argument("--servers", default="bare,echo,uwrt", help="comma-separated: bare, echo, uwrt, cxx")
    ap.add_argument("--rates", default="400,1000", help="comma-separated requests/s")
    ap.add_argument("--duration", type=float, default=8.0, help="measured seconds per step")
    ap.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds per step first")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--server-core", type=int, default=1)
    ap.add_argument("--gen-core", type=int, default=0)
    ap.add_argument("--connections", type=int, default=4)
    ap.add_argument("--h2load", action="store_true", help="also drive the bare and cxx servers with h2load at 1000/s")
    ap.add_argument("--json", help="write {meta, rows} here")
    args = ap.parse_args(argv)
    if args.serve_bare:
        serve_bare()
        return 0

    from uwrt.bench import loadgen
    from uwrt.bench.loadgen import StepSpec
    from uwrt.bench.loadgen.cpus import pin_process
    from uwrt.bench.loadgen.native import choose_engine
    from uwrt.bench.loadgen.traffic import RequestSource
    from uwrt.bench.meta import git_sha
    from uwrt.bench.servers import ServerProcess

    names = [s.strip() for s in args.servers.split(",") if s.strip()]
    bad = [n for n in names if n not in ("bare", "echo", "uwrt", "cxx")]
    if bad:
        ap.error(f"--servers: unknown {bad} (bare, echo, uwrt, cxx)")
    if "cxx" in names:
        _cxx_echo()
    if "uwrt" in names and not os.path.isdir(args.bundle):
        ap.error(f"--bundle {args.bundle}: no such bundle (make demo builds bundles/demo)")
    engine, why = choose_engine("native", rpc="decide", closed=False, procs=1)
    if engine != "native":
        ap.error(f"the native engine is needed: {why}")
    if args.h2load and shutil.which("h2load") is None:
        ap.error("--h2load: h2load not found (apt-get install nghttp2-client)")
    rates = [float(r) for r in args.rates.split(",")]
    pin_process(0, [args.gen_core])
    source = RequestSource.generated(2000, 1)
    t_start, load_before = time.time(), os.getloadavg()
    print(f"load average before: {load_before[0]:.2f}", flush=True)
    rows: list[dict] = []
    for rnd in range(args.rounds):
        order = names if rnd % 2 == 0 else names[::-1]
        for name in order:
            srv = ServerProcess(name, _command(name, args.bundle), 600, cpus=[args.server_core])
            try:
                for rate in rates:
                    base = dict(rate=rate, arrivals="poisson", connections=args.connections, engine="native",
                                timeout_s=1.0)
                    loadgen.run_step(srv.target, StepSpec(**base, duration_s=args.warmup, tag=f"w{rnd}{name}"),
                                     source)
                    c0 = _cpu_s(srv.pid)
                    r = loadgen.run_step(srv.target, StepSpec(**base, duration_s=args.duration, seed=rnd + 1,
                                                              tag=f"m{rnd}{name}"), source)
                    cpu = _cpu_s(srv.pid) - c0
                    row = {"server": name, "round": rnd, "rate": rate, "generator": "native",
                           "completed": r["completed"], "errors": r["errors"], "server_cpu_s": cpu,
                           "server_cpu_us_per_req": cpu / r["completed"] * 1e6 if r["completed"] else None,
                           "p50_ms": r["p50_ms"], "p99_ms": r["p99_ms"], "mean_batch": r.get("mean_batch_size"),
                           "fell_behind": r.get("fell_behind")}
                    rows.append(row)
                    print(f"round {rnd} {name:5s} {rate:6.0f}/s  server {row['server_cpu_us_per_req'] or 0:7.0f} us/req"
                          f"  p50 {r['p50_ms']:.2f} p99 {r['p99_ms']:.2f} ms  errors {r['errors'] or '-'}", flush=True)
                if args.h2load and name in ("bare", "cxx"):
                    row = {"server": name, "round": rnd, **_h2load(srv.target, srv.pid, args.duration, args.gen_core)}
                    rows.append(row)
                    print(f"round {rnd} {name:5s} h2load 1000/s  server {row['server_cpu_us_per_req'] or 0:7.0f} us/req"
                          f"  ({row['completed']} completed)", flush=True)
            finally:
                srv.stop()
    print("\n| server | generator | rate | server CPU us/req median [min..max] | p99 ms median |")
    print("|---|---|---|---|---|")
    keys = sorted({(r["server"], r["generator"], r["rate"]) for r in rows},
                  key=lambda k: (names.index(k[0]), k[1], k[2]))
    for key in keys:
        sel = [r for r in rows if (r["server"], r["generator"], r["rate"]) == key and r["server_cpu_us_per_req"]]
        us = [r["server_cpu_us_per_req"] for r in sel]
        p99 = [r["p99_ms"] for r in sel if r["p99_ms"] is not None]
        if us:
            p99_text = f"{statistics.median(p99):.1f}" if p99 else "-"
            print(f"| {key[0]} | {key[1]} | {key[2]:.0f} | {statistics.median(us):.0f} "
                  f"[{min(us):.0f}..{max(us):.0f}] | {p99_text} |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            meta = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t_start)), "commit": git_sha(),
                    "load_before": load_before, "load_after": os.getloadavg(), "cpus": os.cpu_count(),
                    "args": {k: v for k, v in vars(args).items() if k != "serve_bare"}}
            json.dump({"meta": meta, "rows": rows}, fh, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
