"""Server CPU, context switches and latency per request under open-loop load, with a profile.

    python -m uwrt.bench.profile_server --bundle bundles/demo --rates 400,1000 --duration 20
    python -m uwrt.bench.profile_server --server base@/tmp/uwrt-base --server lean \\
        --rates 400,1000 --rounds 3 --json bench/results/lean_path.json      # before vs after, one run
    python -m uwrt.bench.profile_server --server 'thread:--batch-runner thread' --stream --cprofile 15

Each `--server` is `LABEL[@ROOT][:EXTRA SERVE ARGS]`: ROOT is a checkout to run the server from
(its own `uwrt`, PYTHONPATH=ROOT; default this checkout), so an old commit (`git archive <commit>
| tar -x -C /tmp/uwrt-base`, plus a COMMIT file holding the commit for the JSON's meta) and the
current code are measured in the same run. For every round,
every server (in turn, started fresh, `taskset -c SERVER_CORE`) and every rate: a warm-up run, then
one measured `uwrt bench` run (`taskset -c GEN_CORE`, Poisson open loop, unary Decide or
`--stream`), with, from /proc around the measured run:

  * server CPU microseconds per completed request (user + system, every thread; the generator's
    own `--server-pid` figure, measured around the step only);
  * context switches per request, voluntary and involuntary, summed over the server's threads
    (/proc/PID/task/*/status), the idle rate measured before the run subtracted;
  * p50 / p99 / p99.9, mean batch size, errors, whether the generator kept its schedule;
  * server CPU per request by thread name (/proc/PID/task/*/stat), and, per server, the GC
    collections while serving (the server's "gc while serving" log line at shutdown; servers
    older than that line print none).

Configurations alternate round-robin within one run (the machine is shared: compare only within
a run; report medians and ranges over rounds). `--cprofile S` adds, per server at the highest rate,
a server started under cProfile (after the measured rounds, never overlapping them) driven
for S seconds at the highest rate: the event loop thread's top functions by own and inclusive
time (cProfile sees only the thread that starts it: with batch_runner "inline" that is every
Python frame of the request path; gRPC's poller thread and native time inside the GIL-free calls
show as the calling frame). cProfile's overhead inflates Python-heavy frames: read the ranking,
not the absolute times. (py-spy would see every thread but cannot attach to this machine's
pyenv interpreter: "Failed to find python version".)

Output: one line per measurement on stdout, a summary (medians, ranges) at the end, and `--json`
with every raw row, the profiles, and meta (date, commit per server root, machine load).
Linux only (/proc, taskset). Loopback only.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))    # uwrt/bench is a symlink in a checkout


@dataclass
class ServerSpec:
    label: str
    root: str
    args: list[str] = field(default_factory=list)

    @staticmethod
    def parse(text: str) -> ServerSpec:
        head, _, extra = text.partition(":")
        label, _, root = head.partition("@")
        return ServerSpec(label or "server", os.path.abspath(root) if root else ROOT, extra.split())


def _git_sha(root: str) -> str:
    """Short commit of a checkout ("-dirty" with tracked changes); a `git archive` export may carry
    its commit in a COMMIT file."""
    if os.path.exists(os.path.join(root, "COMMIT")) and not os.path.exists(os.path.join(root, ".git")):
        with open(os.path.join(root, "COMMIT")) as fh:
            return fh.read().strip()
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def proc_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        f = fh.read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu_s(pid: int) -> dict[str, float]:
    """CPU seconds per thread name (comm; threads of one name summed), for the live threads."""
    out: dict[str, float] = collections.defaultdict(float)
    tck = os.sysconf("SC_CLK_TCK")
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as fh:
                raw = fh.read()
        except OSError:
            continue
        name = raw[raw.index("(") + 1:raw.rindex(")")]
        f = raw.rsplit(")", 1)[1].split()
        out[name] += (int(f[11]) + int(f[12])) / tck
    return dict(out)


def ctx_switches(pid: int) -> tuple[int, int]:
    """(voluntary, involuntary) context switches summed over the process's live threads."""
    vol = inv = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as fh:
                for line in fh:
                    if line.startswith("voluntary_ctxt_switches"):
                        vol += int(line.split()[1])
                    elif line.startswith("nonvoluntary_ctxt_switches"):
                        inv += int(line.split()[1])
        except OSError:
            continue        # a thread that just ended
    return vol, inv


def _has_knob(root: str, name: str) -> bool:
    """Does the checkout at `root` know the configuration knob `name` (older ones lack newer knobs)?"""
    try:
        with open(os.path.join(root, "runtime", "config.py"), encoding="utf-8") as fh:
            return f"    {name}:" in fh.read()
    except OSError:
        return False


class Server:
    def __init__(self, spec: ServerSpec, bundle: str, core: int | None, env_extra: dict[str, str],
                 cprofile: str | None = None) -> None:
        self.spec = spec
        env = {**os.environ, "PYTHONPATH": spec.root, "PYTHONUNBUFFERED": "1", **env_extra}
        cli = (["-m", "uwrt.runtime.cli"] if cprofile is None
               else [os.path.realpath(__file__), "--serve-profiled", cprofile])
        cmd = [sys.executable, *cli, "serve", "--bundle", bundle, "--port", "0", "--host", "127.0.0.1", *spec.args]
        if _has_knob(spec.root, "model_info_exposure"):     # the batch counters come from the full GetModelInfo
            cmd[cmd.index("serve") + 1:cmd.index("serve") + 1] = ["--model-info-exposure", "full"]
        if core is not None:
            cmd = ["taskset", "-c", str(core), *cmd]
        self.log = tempfile.NamedTemporaryFile("w+", prefix=f"uwrt-{spec.label}-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env, cwd=spec.root)
        self.port = 0
        assert self.proc.stdout is not None
        for line in self.proc.stdout:          # bounded: printed once SERVING (or the process exits)
            m = re.search(r"uwrt serving on [\d.]+:(\d+)", line)
            if m:
                self.port = int(m.group(1))
                break
        if not self.port:
            self.proc.wait(10)
            self.log.seek(0)
            raise RuntimeError(f"server {spec.label} did not start:\n{self.log.read()[-3000:]}")

    @property
    def pid(self) -> int:
        return self.proc.pid          # taskset execs the server in place: same pid

    def stop(self) -> str:
        """Stop (SIGTERM: drain) and return the server's "gc while serving" log line, if any."""
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.seek(0)
        m = re.search(r"gc while serving: (.*)", self.log.read())
        os.unlink(self.log.name)
        return m.group(1) if m else ""


def bench(target: str, rate: float, duration: float, *, stream: bool, core: int | None, seed: int,
          server_pid: int | None, warmup: float = 0.0) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "step.json")
        cmd = [sys.executable, "-m", "uwrt.runtime.cli", "bench", "--target", target, "--rate", str(rate),
               "--duration", str(duration), "--warmup", str(warmup), "--seed", str(seed), "--json", out, "--quiet"]
        if stream:
            cmd.append("--stream")
        if server_pid:
            cmd += ["--server-pid", str(server_pid)]
        if core is not None:
            cmd = ["taskset", "-c", str(core), *cmd]
        subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": ROOT}, stdout=subprocess.DEVNULL)
        with open(out) as fh:
            return json.load(fh)["steps"][0]


def measure(server: Server, rate: float, args) -> dict[str, Any]:
    target = f"127.0.0.1:{server.port}"
    pid = server.pid
    bench(target, rate, args.warmup, stream=args.stream, core=args.gen_core, seed=99, server_pid=None)
    idle_s = 1.0
    v0, i0 = ctx_switches(pid)
    time.sleep(idle_s)
    v1, i1 = ctx_switches(pid)
    idle_rate = ((v1 - v0) + (i1 - i0)) / idle_s
    th0 = thread_cpu_s(pid)
    c0, t0 = proc_cpu_s(pid), time.monotonic()
    step = bench(target, rate, args.duration, stream=args.stream, core=args.gen_core, seed=args.seed,
                 server_pid=pid)
    c1, t1 = proc_cpu_s(pid), time.monotonic()
    v2, i2 = ctx_switches(pid)
    th1 = thread_cpu_s(pid)
    n = max(1, step["completed"])
    by_thread = {k: 1e6 * (v - th0.get(k, 0.0)) / n for k, v in th1.items() if v - th0.get(k, 0.0) > 0}
    step_cpu_s = step["server_cpu_pct"] / 100 * step["wall_s"]
    cs = (v2 - v1) + (i2 - i1) - idle_rate * (t1 - t0 - step["wall_s"])
    return dict(server=server.spec.label, rate=rate, stream=args.stream, completed=step["completed"],
                errors=step["errors"], fell_behind=step["fell_behind"],
                cpu_us_per_req=1e6 * step_cpu_s / n, cpu_us_per_req_whole_run=1e6 * (c1 - c0) / n,
                ctx_per_req=cs / n, ctx_vol_per_req=(v2 - v1) / n, ctx_invol_per_req=(i2 - i1) / n,
                idle_ctx_per_s=idle_rate, cpu_us_per_req_by_thread=by_thread, p50_ms=step["p50_ms"],
                p99_ms=step["p99_ms"], p999_ms=step["p999_ms"],
                mean_batch_size=step["mean_batch_size"], server_mean_us=step["server_mean_us"],
                achieved_rps=step["achieved_rps"], client_cpu_us_per_req=step["client_cpu_us_per_req"])


# ---------------------------------------------------------------- cProfile


def _serve_profiled(out: str, argv: list[str]) -> int:
    """`uwrt serve` (of whichever checkout PYTHONPATH names) with cProfile on the loop thread from
    the end of warm-up (ServingRuntime.start) to exit; the stats go to `out`."""
    import cProfile

    from uwrt.runtime.cli.main import main as cli_main
    from uwrt.runtime.serving import server as server_mod
    prof = cProfile.Profile()
    orig = server_mod.ServingRuntime.start

    async def start(self, *a: Any, **kw: Any) -> Any:
        r = await orig(self, *a, **kw)
        prof.enable()
        return r
    server_mod.ServingRuntime.start = start      # type: ignore[method-assign]
    try:
        return cli_main(argv)
    finally:
        prof.disable()
        prof.dump_stats(out)


def cprofile_run(spec: ServerSpec, rate: float, seconds: float, args, env_extra: dict[str, str]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "serve.prof")
        srv = Server(spec, args.bundle, args.server_core, env_extra, cprofile=out)
        try:
            target = f"127.0.0.1:{srv.port}"
            bench(target, rate, seconds, stream=args.stream, core=args.gen_core, seed=args.seed + 1, server_pid=None)
        finally:
            srv.stop()
        return cprofile_top(out, args.top)


def cprofile_top(path: str, top: int) -> dict[str, Any]:
    """The event loop thread's profile (cProfile sees the thread that started it: the loop, and in
    inline mode the whole pipeline): top functions by own and by inclusive time, as shares."""
    import pstats
    st = pstats.Stats(path)
    rows = []
    idle = 0.0
    for (file, line, name), (_cc, nc, tt, ct, _callers) in st.stats.items():      # type: ignore[attr-defined]
        short = "/".join(file.split("/")[-2:]) if "/" in file else file
        if "select.epoll" in name:      # the loop waiting for I/O: idle, not the request path's time
            idle += tt
            continue
        rows.append((f"{name} ({short}:{line})", nc, tt, ct))
    total = max(1e-9, st.total_tt - idle)      # type: ignore[attr-defined]
    own = sorted(rows, key=lambda r: -r[2])[:top]
    incl = sorted(rows, key=lambda r: -r[3])[:top]
    return dict(total_s=total, idle_s=idle, own=[(n, tt / total, nc) for n, nc, tt, _ in own],
                inclusive=[(n, ct / total, nc) for n, nc, _, ct in incl])


# ---------------------------------------------------------------- driver


def _load() -> dict[str, Any]:
    la = os.getloadavg()
    top = subprocess.run(["top", "-bn1"], capture_output=True, text=True).stdout.splitlines()[:15] \
        if shutil.which("top") else []
    return {"loadavg": la, "top": top}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--serve-profiled"]:
        return _serve_profiled(argv[1], argv[2:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--bundle", default=os.path.join(ROOT, "bundles", "demo"))
    p.add_argument("--server", action="append", default=[],
                   help="LABEL[@ROOT][:EXTRA SERVE ARGS]; repeat to compare (default: this checkout)")
    p.add_argument("--rates", default="400,1000", help="comma-separated requests/s")
    p.add_argument("--duration", type=float, default=20.0, help="measured seconds per step")
    p.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds at the step's rate first")
    p.add_argument("--rounds", type=int, default=1, help="round-robin repetitions of every (server, rate)")
    p.add_argument("--stream", action="store_true", help="DecideStream instead of unary Decide")
    p.add_argument("--server-core", type=int, default=1, help="core for the server (-1: unpinned)")
    p.add_argument("--gen-core", type=int, default=0, help="core for the load generator (-1: unpinned)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--cprofile", type=float, default=0.0,
                   help="seconds of a cProfile'd server per server spec at the top rate (after the rounds)")
    p.add_argument("--top", type=int, default=25, help="functions listed per profile")
    p.add_argument("--env", action="append", default=[], metavar="K=V", help="extra environment for the servers")
    p.add_argument("--json", default=None, help="write {meta, rows, profiles} here")
    args = p.parse_args(argv)
    args.server_core = None if args.server_core < 0 else args.server_core
    args.gen_core = None if args.gen_core < 0 else args.gen_core
    args.bundle = os.path.abspath(args.bundle)
    specs = [ServerSpec.parse(s) for s in args.server] or [ServerSpec("server", ROOT)]
    rates = [float(r) for r in args.rates.split(",") if r.strip()]
    env_extra = dict(kv.split("=", 1) for kv in args.env)
    meta = dict(date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                servers={s.label: dict(root=s.root, commit=_git_sha(s.root), args=s.args) for s in specs},
                bundle=args.bundle, rates=rates, duration_s=args.duration, rounds=args.rounds, stream=args.stream,
                server_core=args.server_core, gen_core=args.gen_core, cpus=os.cpu_count(), load_before=_load())
    rows: list[dict[str, Any]] = []
    profiles: dict[str, Any] = {}
    gc_lines: list[dict[str, Any]] = []
    print(f"{'server':>12} {'rate':>6} {'cpu us/req':>10} {'ctx/req':>7} {'p50 ms':>7} {'p99 ms':>7} "
          f"{'p99.9':>7} {'batch':>5}  notes", flush=True)
    for rnd in range(args.rounds):
        for spec in (specs if rnd % 2 == 0 else specs[::-1]):     # alternate the order between rounds
            srv = Server(spec, args.bundle, args.server_core, env_extra)
            try:
                for rate in rates:
                    r = measure(srv, rate, args)
                    r["round"] = rnd
                    rows.append(r)
                    note = ("FELL BEHIND " if r["fell_behind"] else "") + (json.dumps(r["errors"]) * bool(r["errors"]))
                    threads = ", ".join(f"{k} {v:.0f}" for k, v in sorted(r["cpu_us_per_req_by_thread"].items(),
                                                                           key=lambda kv: -kv[1]))
                    print(f"{spec.label:>12} {rate:>6.0f} {r['cpu_us_per_req']:>10.0f} {r['ctx_per_req']:>7.1f} "
                          f"{r['p50_ms']:>7.2f} {r['p99_ms']:>7.2f} {r['p999_ms']:>7.2f} "
                          f"{(r['mean_batch_size'] or 0):>5.2f}  {note}[us/req by thread: {threads}]", flush=True)
            finally:
                line = srv.stop()
                if line:
                    gc_lines.append(dict(server=spec.label, round=rnd, gc=line))
                    print(f"{spec.label:>12} gc while serving (all steps and warm-ups): {line}", flush=True)
    if args.cprofile:
        for spec in specs:
            prof = cprofile_run(spec, max(rates), args.cprofile, args, env_extra)
            profiles[spec.label] = prof
            print(f"\n{spec.label}: cProfile of the loop thread at {max(rates):.0f} rps, {args.cprofile:.0f} s "
                  f"({prof['total_s']:.2f} s busy, {prof['idle_s']:.2f} s waiting in epoll)")
            for kind in ("own", "inclusive"):
                print(f"  top by {kind} time (share of the loop's busy time, calls):")
                for fn, share, calls in prof[kind]:
                    print(f"    {share:6.1%} {calls:>8}  {fn}")
    print("\nmedians over rounds [min..max]:")
    for spec in specs:
        for rate in rates:
            rs = [r for r in rows if r["server"] == spec.label and r["rate"] == rate]
            if not rs:
                continue
            parts = []
            for k in ("cpu_us_per_req", "ctx_per_req", "p50_ms", "p99_ms"):
                vs = [r[k] for r in rs]
                parts.append(f"{k} {statistics.median(vs):.2f} [{min(vs):.2f}..{max(vs):.2f}]")
            print(f"  {spec.label:>12} {rate:>6.0f}: " + "; ".join(parts))
    meta["load_after"] = _load()
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(meta=meta, rows=rows, profiles=profiles, gc=gc_lines), fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
