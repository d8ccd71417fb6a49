#!/usr/bin/env python3
"""Open-loop load test of a running uwrt server (unary Decide), free of coordinated omission.

    python bench/open_loop.py --target 127.0.0.1:PORT --rates 200,500,1000 --duration-s 30 \
        [--arrivals poisson|constant] [--timeout-ms 1000] [--seed 1] [--json OUT]
    python bench/open_loop.py --start-server [--server-args "--torch-threads 2"] --rates ...

For each rate a seeded schedule of intended send times is drawn (Poisson arrivals by default,
or evenly spaced); a ticker thread (time.sleep, ~0.1 ms precise) hands each request to one
grpc.aio client at its intended time, whatever earlier requests are doing. Latency runs from
the INTENDED send time to the response, so client lag and server queueing are both charged
(no coordinated omission). The deadline (--timeout-ms) also counts from the intended time (a
request whose deadline passed before it could be sent is "unsent"): a step ends within
duration + timeout. A send > 1 ms after its intended time is "late"; a step where > 1% of
sends were late, or some were never sent, is flagged GENERATOR FELL BEHIND (achieved send
rate next to the target). A warm-up (--warmup-s at the first rate) is not reported.

Per step: target / sent / completed rps; latency p50/p90/p99/p99.9/max in ms over every
successful response (failures are counted by gRPC status name instead); send lag; mean
server-side timing (queue/featurize/encode/trees/policy/total us; stage times are per batch,
copied to each member); mean batch size (GetModelInfo stats.requests / stats.batches deltas);
the share of adverse outcomes (DECLINE/COUNTEROFFER, the only ones that compute TreeSHAP
reasons) with mean policy_us for adverse vs other responses, and per batch with vs without an
adverse member (batches regrouped client-side by their identical stage times); CPU use of the
client and of a started server. `--rpc health|info` sends Health/Check or GetModelInfo instead
(cheap RPCs: the generator's own ceiling). --start-server runs `uwrt serve --port 0 ...` as a subprocess,
SIGTERMs it at the end and requires exit code 0.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import datetime
import gc
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
from grpc_health.v1 import health_pb2

from runtime.pb import pb

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("queue_us", "featurize_us", "encode_us", "trees_us", "policy_us", "total_us")
ADVERSE = (pb.DECLINE, pb.COUNTEROFFER)
LATE_S = 0.001
RPCS = {"decide": ("/uwrt.v1.Underwriting/Decide", pb.DecisionResponse),
        "info": ("/uwrt.v1.Underwriting/GetModelInfo", pb.ModelInfo),
        "health": ("/grpc.health.v1.Health/Check", health_pb2.HealthCheckResponse)}


def git_sha() -> str:
    try:
        run = lambda *a: subprocess.run(a, cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        return run("git", "rev-parse", "--short", "HEAD") + (
            "-dirty" if run("git", "status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def schedule(rate: float, duration_s: float, arrivals: str, rng: np.random.Generator) -> np.ndarray:
    """Intended send offsets (s) in [0, duration)."""
    if arrivals == "constant":
        return np.arange(int(rate * duration_s)) / rate
    t = np.cumsum(rng.exponential(1.0 / rate, int(rate * duration_s * 1.2) + 100))
    while t[-1] < duration_s:  # very unlikely: extend the draw
        t = np.concatenate([t, t[-1] + np.cumsum(rng.exponential(1.0 / rate, int(rate * duration_s) + 100))])
    return t[t < duration_s]


def cpu_s(pid: int | None = None) -> float:
    """CPU seconds (user + system) of this process, or of `pid` from /proc."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    try:
        with open(f"/proc/{pid}/stat") as fh:
            f = fh.read().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return float("nan")


class Step:
    """Samples of one step, indexed by request number."""

    def __init__(self, n: int) -> None:
        self.lat = np.full(n, np.nan)      # s, intended send -> response (OK only)
        self.lag = np.full(n, np.nan)      # s, actual send - intended send
        self.timing = np.zeros((n, len(STAGES)), np.int64)
        self.outcome = np.zeros(n, np.int8)
        self.errors: collections.Counter = collections.Counter()


async def one(call, payload, i: int, t_int: float, timeout_s: float, st: Step, info: bool) -> None:
    now = time.perf_counter()
    st.lag[i] = now - t_int
    try:
        resp = await call(payload, timeout=max(t_int + timeout_s - now, 1e-6))
    except (grpc.aio.AioRpcError, asyncio.CancelledError) as e:
        st.errors[e.code().name if isinstance(e, grpc.aio.AioRpcError) else "CLIENT_CANCELLED"] += 1
        return
    st.lat[i] = time.perf_counter() - t_int
    if not info:
        tm = resp.timing
        st.timing[i] = (tm.queue_us, tm.featurize_us, tm.encode_us, tm.trees_us, tm.policy_us, tm.total_us)
        st.outcome[i] = resp.outcome


async def run_step(call, payloads: list, offs: np.ndarray, duration_s: float, timeout_s: float,
                   info: bool) -> tuple[Step, int, float]:
    """Send payloads[i] at t0 + offs[i]; returns (samples, number sent, wall seconds).

    A ticker thread sleeps with time.sleep (~0.1 ms precise; the event loop's own timers go
    through epoll, which rounds waits up to whole ms) and hands each due send to the loop."""
    loop = asyncio.get_running_loop()
    st, tasks, finished = Step(len(offs)), [], asyncio.Event()
    t0 = time.perf_counter() + 0.01

    def fire(i: int) -> None:
        tasks.append(loop.create_task(one(call, payloads[i], i, t0 + offs[i], timeout_s, st, info)))

    def tick() -> None:
        try:
            for i, off in enumerate(offs):
                delay = t0 + off - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                elif -delay >= timeout_s:
                    continue                # its deadline has passed before it could go: "unsent"
                loop.call_soon_threadsafe(fire, i)
        finally:
            loop.call_soon_threadsafe(finished.set)

    threading.Thread(target=tick, daemon=True).start()
    await finished.wait()                   # FIFO: every fire() ran before this
    if tasks:                               # deadlines count from intended times: bounded wait
        _, late = await asyncio.wait(tasks, timeout=max(0.0, t0 + duration_s + timeout_s + 1.0 - time.perf_counter()))
        for t in late:
            t.cancel()
        await asyncio.gather(*late, return_exceptions=True)
    return st, len(tasks), time.perf_counter() - t0


async def batch_stats(info_call) -> tuple[int, int]:
    s = (await info_call(pb.GetModelInfoRequest(), timeout=5.0)).settings
    return int(float(s.get("stats.requests", "0"))), int(float(s.get("stats.batches", "0")))


def summarize(rate: float, st: Step, sent: int, n_sched: int, duration_s: float, wall_s: float,
              batches: tuple[int, int], cpu: tuple[float, float], info: bool) -> dict:
    ok = ~np.isnan(st.lat)
    lat_ms = st.lat[ok] * 1e3
    lag = st.lag[~np.isnan(st.lag)]
    pct = (lambda q: float(np.percentile(lat_ms, q))) if lat_ms.size else (lambda q: float("nan"))
    row = dict(target_rps=rate, scheduled=n_sched, sent=sent, achieved_rps=sent / duration_s,
               completed=int(ok.sum()), completed_rps=float(ok.sum()) / duration_s, wall_s=round(wall_s, 3),
               unsent=n_sched - sent, late_sends=int((lag > LATE_S).sum()),
               **{f"lag_ms_{k}": float(np.percentile(lag, q) * 1e3) if lag.size else None
                  for k, q in (("p50", 50), ("p99", 99), ("max", 100))},
               p50_ms=pct(50), p90_ms=pct(90), p99_ms=pct(99), p999_ms=pct(99.9),
               max_ms=float(lat_ms.max()) if lat_ms.size else float("nan"),
               errors=dict(st.errors), client_cpu_pct=100 * cpu[0] / wall_s, server_cpu_pct=100 * cpu[1] / wall_s,
               client_cpu_us_per_req=1e6 * cpu[0] / max(sent, 1))
    row["fell_behind"] = bool(row["unsent"] or row["late_sends"] > 0.01 * max(sent, 1))
    if info:
        return row
    dreq, dbat = batches
    row["mean_batch_size"] = dreq / dbat if dbat else None
    tm, oc = st.timing[ok], st.outcome[ok]
    row["server_mean_us"] = {k: float(tm[:, j].mean()) if len(tm) else None for j, k in enumerate(STAGES)}
    adv = np.isin(oc, ADVERSE)
    pol = tm[:, STAGES.index("policy_us")]
    mean = lambda a: float(a.mean()) if a.size else None
    row["adverse_share"] = float(adv.mean()) if adv.size else None
    row["policy_us_adverse"], row["policy_us_other"] = mean(pol[adv]), mean(pol[~adv])
    # Batch members share identical stage times: regroup to see the per-batch policy cost.
    groups: dict[tuple, list] = {}
    for key, a in zip(map(tuple, tm[:, 1:5].tolist()), adv.tolist()):
        groups.setdefault(key, []).append(a)
    bpol = np.array([k[3] for k in groups]) if groups else np.zeros(0)
    badv = np.array([any(v) for v in groups.values()], bool)
    row["batches_seen"] = len(groups)
    row["batch_policy_us_with_adverse"], row["batch_policy_us_without"] = mean(bpol[badv]), mean(bpol[~badv])
    return row


def print_row(r: dict, info: bool) -> None:
    err = ",".join(f"{k}:{v}" for k, v in sorted(r["errors"].items())) or "-"
    line = (f"{r['target_rps']:>6.0f} {r['achieved_rps']:>7.1f} {r['completed_rps']:>7.1f} {r['late_sends'] / max(r['sent'], 1):>5.1%} "
            f"{r['p50_ms']:>7.3f} {r['p90_ms']:>7.3f} {r['p99_ms']:>7.3f} {r['p999_ms']:>8.3f} {r['max_ms']:>8.3f} "
            f"{r['client_cpu_pct']:>4.0f}% {r['server_cpu_pct']:>4.0f}%")
    if not info:
        s = r["server_mean_us"]
        fmt = lambda v, f: "-" if v is None else format(v, f)
        line += (f" {fmt(r['mean_batch_size'], '5.2f')} " + " ".join(fmt(s[k], '6.0f') for k in STAGES)
                 + f" {fmt(r['adverse_share'], '5.1%')} {fmt(r['policy_us_adverse'], '6.0f')}"
                 f" {fmt(r['policy_us_other'], '6.0f')}")
    behind = (f"  [GENERATOR FELL BEHIND: {r['late_sends'] / max(r['sent'], 1):.1%} of sends > 1 ms late, lag p99 "
              f"{r['lag_ms_p99']:.1f} ms, {r['unsent']} unsent]") if r["fell_behind"] else ""
    print(line + f"  {err}" + behind, flush=True)


HEADER = (f"{'target':>6} {'sent/s':>7} {'done/s':>7} {'late':>5} {'p50':>7} {'p90':>7} {'p99':>7} {'p99.9':>8} "
          f"{'max':>8} {'cli':>5} {'srv':>5}")
HEADER_DECIDE = (f" {'batch':>5} {'queue':>6} {'feat':>6} {'enc':>6} {'trees':>6} {'policy':>6} {'total':>6}"
                 f" {'adv':>5} {'pol+':>6} {'pol-':>6}")


async def run_all(args, server_pid: int | None) -> tuple[list[dict], dict]:
    rates = [float(r) for r in args.rates.split(",")]
    info = args.rpc != "decide"
    rng = np.random.default_rng(args.seed)
    scheds = [schedule(r, args.duration_s, args.arrivals, rng) for r in rates]
    warm = schedule(rates[0], args.warmup_s, args.arrivals, rng)
    pool: list = []
    if not info:
        from uwrt_demo.synth import generate
        pool = generate(min(args.pool, max(len(s) for s in scheds + [warm])), args.seed, id_prefix="ol-").requests

    def payloads(n: int, tag: str) -> list:        # pre-serialized, unique request ids
        if info:
            return [b""] * n                          # empty GetModelInfoRequest / HealthCheckRequest
        out = []
        for i in range(n):
            r = pool[i % len(pool)]
            r.request_id = f"ol-{tag}-{i}"
            out.append(r.SerializeToString())
        return out

    steps = []
    async with grpc.aio.insecure_channel(args.target) as ch:
        await asyncio.wait_for(ch.channel_ready(), 30)
        method, resp_type = RPCS[args.rpc]
        call = ch.unary_unary(method, request_serializer=None, response_deserializer=resp_type.FromString)
        info_call = ch.unary_unary("/uwrt.v1.Underwriting/GetModelInfo", request_serializer=pb.GetModelInfoRequest.SerializeToString,
                                   response_deserializer=pb.ModelInfo.FromString)
        settings = {k: v for k, v in (await info_call(pb.GetModelInfoRequest(), timeout=5.0)).settings.items()
                    if not k.startswith("stats.")}
        print(f"warm-up: {args.warmup_s:.0f}s at {rates[0]:.0f} rps", flush=True)
        await run_step(call, payloads(len(warm), "warm"), warm, args.warmup_s, args.timeout_ms / 1e3, info)
        print(HEADER + ("" if info else HEADER_DECIDE) + "  errors")
        for k, (rate, offs) in enumerate(zip(rates, scheds)):
            pl = payloads(len(offs), str(k))
            gc.collect()
            gc.freeze()
            b0, c0, s0 = await batch_stats(info_call), cpu_s(), cpu_s(server_pid) if server_pid else float("nan")
            st, sent, wall = await run_step(call, pl, offs, args.duration_s, args.timeout_ms / 1e3, info)
            b1, c1, s1 = await batch_stats(info_call), cpu_s(), cpu_s(server_pid) if server_pid else float("nan")
            del pl
            gc.unfreeze()
            row = summarize(rate, st, sent, len(offs), args.duration_s, wall, (b1[0] - b0[0], b1[1] - b0[1]),
                            (c1 - c0, s1 - s0), info)
            print_row(row, info)
            steps.append(row)
    return steps, settings


def start_server(server_args: str) -> tuple[subprocess.Popen, str, collections.deque, collections.Counter]:
    exe = os.path.join(os.path.dirname(sys.executable), "uwrt")
    cmd = [exe if os.path.exists(exe) else "uwrt", "serve", "--port", "0", *shlex.split(server_args)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail: collections.deque = collections.deque(maxlen=40)
    counts: collections.Counter = collections.Counter()   # server output lines by log level
    found: list[str] = []
    ready = threading.Event()

    def pump() -> None:                 # keep draining the pipe so the server never blocks on it
        for line in proc.stdout:
            tail.append(line.rstrip())
            lvl = re.search(r" (DEBUG|INFO|WARNING|ERROR|CRITICAL) ", line)
            counts[lvl.group(1) if lvl else "other"] += 1
            m = re.search(r"uwrt serving on (\S+)", line)
            if m and not found:
                found.append(m.group(1))
                ready.set()
        ready.set()

    threading.Thread(target=pump, daemon=True).start()
    if not ready.wait(300) or not found:
        proc.kill()
        raise SystemExit("server did not start:\n" + "\n".join(tail))
    print(f"started: {shlex.join(cmd)} -> {found[0]} (pid {proc.pid})", flush=True)
    return proc, found[0], tail, counts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", help="HOST:PORT of a running server (loopback)")
    ap.add_argument("--rates", default="200,500,1000", help="comma-separated target requests/s")
    ap.add_argument("--duration-s", type=float, default=30.0)
    ap.add_argument("--warmup-s", type=float, default=2.0)
    ap.add_argument("--arrivals", choices=["poisson", "constant"], default="poisson")
    ap.add_argument("--timeout-ms", type=float, default=1000.0, help="deadline, from the intended send time")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--pool", type=int, default=4000, help="distinct generated applicants (re-id'd per send)")
    ap.add_argument("--rpc", choices=sorted(RPCS), default="decide",
                    help="info (GetModelInfo) or health (Health/Check): cheap RPCs, for the generator's ceiling")
    ap.add_argument("--json", default=None, help="write {meta, steps} here")
    ap.add_argument("--start-server", action="store_true", help="run `uwrt serve --port 0` as a subprocess")
    ap.add_argument("--server-args", default="", help="extra `uwrt serve` flags (recorded in meta either way)")
    args = ap.parse_args()
    if not args.start_server and not args.target:
        ap.error("--target or --start-server is required")
    proc = None
    if args.start_server:
        proc, args.target, tail, counts = start_server(args.server_args)
    host = args.target.rsplit(":", 1)[0]
    if host not in ("127.0.0.1", "localhost", "[::1]"):
        ap.error("only loopback targets are allowed")
    exit_code = None
    try:
        steps, settings = asyncio.run(run_all(args, proc.pid if proc else None))
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                exit_code = proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                exit_code = "killed after 60s"
            print(f"server exit code: {exit_code}", flush=True)
            if exit_code != 0:
                print("\n".join(tail), file=sys.stderr)
    if any(s["fell_behind"] for s in steps):
        print("WARNING: the generator fell behind its schedule (late sends / unsent): see achieved vs target")
    if args.json:
        meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), git=git_sha(),
                    platform=platform.platform(), cpu_count=os.cpu_count(), python=platform.python_version(),
                    grpc=grpc.__version__, target=args.target, rpc=args.rpc, arrivals=args.arrivals,
                    duration_s=args.duration_s, warmup_s=args.warmup_s, timeout_ms=args.timeout_ms, seed=args.seed,
                    server_args=args.server_args, started_server=args.start_server, server_exit_code=exit_code,
                    server_settings=settings, late_threshold_ms=LATE_S * 1e3,
                    server_log_lines=dict(counts) if proc else None)
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump(dict(meta=meta, steps=steps), fh, indent=1)
    return 0 if exit_code in (None, 0) else 1


if __name__ == "__main__":
    sys.exit(main())
