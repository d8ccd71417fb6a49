"""Server CPU, context switches and latency per request under open-loop load, with a profile.

    python -m uwrt.bench.profile_server --bundle bundles/demo --rates 400,1000 --duration 20
    python -m uwrt.bench.profile_server --server base@/tmp/uwrt-base --server lean \\
        --rates 400,1000 --rounds 3 --json bench/results/lean_path.json      # before vs after, one run
    python -m uwrt.bench.profile_server --server 'inline:--batch-inline true' --stream --pyspy 15

Each `--server` is `LABEL[@ROOT][:EXTRA SERVE ARGS]`: ROOT is a checkout to run the server from
(its own `uwrt`, PYTHONPATH=ROOT; default this checkout), so an old commit (`git worktree add
/tmp/uwrt-base <commit>`) and the current code are measured in the same run. For every round,
every server (in turn, started fresh, `taskset -c SERVER_CORE`) and every rate: a warm-up run, then
one measured `uwrt bench` run (`taskset -c GEN_CORE`, Poisson open loop, unary Decide or
`--stream`), with, from /proc around the measured run:

  * server CPU microseconds per completed request (user + system, every thread; the generator's
    own `--server-pid` figure, measured around the step only);
  * context switches per request, voluntary and involuntary, summed over the server's threads
    (/proc/PID/task/*/status), the idle rate measured before the run subtracted;
  * p50 / p99 / p99.9, mean batch size, errors, whether the generator kept its schedule.

Configurations alternate round-robin within one run (the machine is shared: compare only within
a run; report medians and ranges over rounds). `--pyspy S` adds, per server at the highest rate,
an S-second py-spy pass (sampling, so it runs after the measured rounds and never overlaps
them): the top functions by own and by inclusive share of the samples on the server's busy
threads. py-spy is a dev tool (`pip install -r requirements/bench.txt`); without it the profile is
skipped with a message.

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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


class Server:
    def __init__(self, spec: ServerSpec, bundle: str, core: int | None, env_extra: dict[str, str]) -> None:
        self.spec = spec
        env = {**os.environ, "PYTHONPATH": spec.root, "PYTHONUNBUFFERED": "1", **env_extra}
        cmd = [sys.executable, "-m", "uwrt.runtime.cli", "serve", "--bundle", bundle, "--port", "0",
               "--host", "127.0.0.1", *spec.args]
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

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.unlink(self.log.name)


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
    c0, t0 = proc_cpu_s(pid), time.monotonic()
    step = bench(target, rate, args.duration, stream=args.stream, core=args.gen_core, seed=args.seed,
                 server_pid=pid)
    c1, t1 = proc_cpu_s(pid), time.monotonic()
    v2, i2 = ctx_switches(pid)
    n = max(1, step["completed"])
    step_cpu_s = step["server_cpu_pct"] / 100 * step["wall_s"]
    cs = (v2 - v1) + (i2 - i1) - idle_rate * (t1 - t0 - step["wall_s"])
    return dict(server=server.spec.label, rate=rate, stream=args.stream, completed=step["completed"],
                errors=step["errors"], fell_behind=step["fell_behind"],
                cpu_us_per_req=1e6 * step_cpu_s / n, cpu_us_per_req_whole_run=1e6 * (c1 - c0) / n,
                ctx_per_req=cs / n, ctx_vol_per_req=(v2 - v1) / n, ctx_invol_per_req=(i2 - i1) / n,
                idle_ctx_per_s=idle_rate, p50_ms=step["p50_ms"], p99_ms=step["p99_ms"], p999_ms=step["p999_ms"],
                mean_batch_size=step["mean_batch_size"], server_mean_us=step["server_mean_us"],
                achieved_rps=step["achieved_rps"], client_cpu_us_per_req=step["client_cpu_us_per_req"])


# ---------------------------------------------------------------- py-spy


def pyspy_profile(server: Server, rate: float, seconds: float, args) -> dict[str, Any] | None:
    exe = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    if not os.path.exists(exe):
        print("py-spy not installed (pip install -r requirements/bench.txt): profile skipped", file=sys.stderr)
        return None
    target = f"127.0.0.1:{server.port}"
    with tempfile.TemporaryDirectory() as tmp:
        raw = os.path.join(tmp, "stacks.txt")
        spy = subprocess.Popen([exe, "record", "--pid", str(server.pid), "--duration", str(int(seconds) + 2),
                                "--rate", "400", "--format", "raw", "--output", raw, "--threads", "--idle",
                                "--nonblocking"] + (["--gil"] if args.pyspy_gil else []),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)
        bench(target, rate, seconds, stream=args.stream, core=args.gen_core, seed=args.seed + 1, server_pid=None)
        spy.wait(60)
        if not os.path.exists(raw):
            print("py-spy wrote nothing (ptrace not permitted?): profile skipped", file=sys.stderr)
            return None
        with open(raw) as fh:
            return summarize_stacks(fh.read().splitlines(), top=args.top)


_IDLE = ("select (selectors.py", "poll (selectors.py", "_worker (concurrent/futures/thread.py", "wait (threading.py",
         "_run_once (asyncio/base_events.py", "sleep", "epoll")


def summarize_stacks(lines: list[str], top: int = 25) -> dict[str, Any]:
    """py-spy raw (collapsed) stacks -> busy share per thread, top functions by own and inclusive samples.

    A sample whose leaf frame is an idle wait (selector poll, the executor's queue get) counts as idle."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    busy = total = 0
    for line in lines:
        stack, _, n_s = line.rpartition(" ")
        if not stack:
            continue
        n = int(n_s)
        frames = stack.split(";")
        thread, frames = frames[0], frames[1:]
        total += n
        leaf = frames[-1] if frames else ""
        if not frames or any(leaf.startswith(i) for i in _IDLE) or "queue.py" in leaf and leaf.startswith("get "):
            continue
        busy += n
        threads[thread] += n
        own[_fn(leaf)] += n
        for f in {_fn(f) for f in frames}:
            incl[f] += n
    return dict(samples=total, busy_samples=busy,
                threads={k: v / busy for k, v in threads.most_common()} if busy else {},
                own=[(k, v / busy) for k, v in own.most_common(top)] if busy else [],
                inclusive=[(k, v / busy) for k, v in incl.most_common(top)] if busy else [])


def _fn(frame: str) -> str:
    """'name (path/to/file.py:123)' -> 'name (file.py)'."""
    m = re.match(r"(.*?) \((.*?)(?::\d+)?\)$", frame)
    if not m:
        return frame
    path = m.group(2)
    parts = path.split("/")
    short = "/".join(parts[-2:]) if len(parts) > 1 else path
    return f"{m.group(1)} ({short})"


# ---------------------------------------------------------------- driver


def _load() -> dict[str, Any]:
    la = os.getloadavg()
    top = subprocess.run(["top", "-bn1"], capture_output=True, text=True).stdout.splitlines()[:15] \
        if shutil.which("top") else []
    return {"loadavg": la, "top": top}


def main(argv: list[str] | None = None) -> int:
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
    p.add_argument("--pyspy", type=float, default=0.0, help="seconds of py-spy profile per server at the top rate")
    p.add_argument("--pyspy-gil", action="store_true", help="py-spy --gil: only samples holding the GIL")
    p.add_argument("--top", type=int, default=25, help="functions listed per profile")
    p.add_argument("--env", action="append", default=[], metavar="K=V", help="extra environment for the servers")
    p.add_argument("--json", default=None, help="write {meta, rows, profiles} here")
    args = p.parse_args(argv)
    args.server_core = None if args.server_core < 0 else args.server_core
    args.gen_core = None if args.gen_core < 0 else args.gen_core
    specs = [ServerSpec.parse(s) for s in args.server] or [ServerSpec("server", ROOT)]
    rates = [float(r) for r in args.rates.split(",") if r.strip()]
    env_extra = dict(kv.split("=", 1) for kv in args.env)
    meta = dict(date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                servers={s.label: dict(root=s.root, commit=_git_sha(s.root), args=s.args) for s in specs},
                bundle=args.bundle, rates=rates, duration_s=args.duration, rounds=args.rounds, stream=args.stream,
                server_core=args.server_core, gen_core=args.gen_core, cpus=os.cpu_count(), load_before=_load())
    rows: list[dict[str, Any]] = []
    profiles: dict[str, Any] = {}
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
                    print(f"{spec.label:>12} {rate:>6.0f} {r['cpu_us_per_req']:>10.0f} {r['ctx_per_req']:>7.1f} "
                          f"{r['p50_ms']:>7.2f} {r['p99_ms']:>7.2f} {r['p999_ms']:>7.2f} "
                          f"{(r['mean_batch_size'] or 0):>5.2f}  {note}", flush=True)
                if args.pyspy and rnd == args.rounds - 1:
                    prof = pyspy_profile(srv, max(rates), args.pyspy, args)
                    if prof:
                        profiles[spec.label] = prof
                        print(f"\n{spec.label}: py-spy at {max(rates):.0f} rps, busy share by thread "
                              + ", ".join(f"{k} {v:.0%}" for k, v in prof["threads"].items()))
                        for kind in ("own", "inclusive"):
                            print(f"  top by {kind} samples (share of busy samples):")
                            for fn, share in prof[kind]:
                                print(f"    {share:6.1%}  {fn}")
                        print()
            finally:
                srv.stop()
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
            json.dump(dict(meta=meta, rows=rows, profiles=profiles), fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
