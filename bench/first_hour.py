"""What a new user waits for: `uwrt --help`, `uwrt decide --n 1`, and the demo builds to SERVING.

    python bench/first_hour.py [--repeat 5] [--builds default,full] [--json OUT]
    python bench/first_hour.py --cli-only --checkout OTHER_TREE    # the same CLI timings for another checkout

Every command runs as a fresh process (`python -m uwrt.runtime.cli` with PYTHONPATH set to the
checkout, so two checkouts can be compared in one run): wall time from start to exit for `--help`
and `decide --n 1` (against a server this script starts on a free port, with the small demo
bundle); for each build preset, the wall and CPU time of `uwrt build-demo` and then of `uwrt
serve` from start to its SERVING line. CPU seconds say what a busy machine's wall time cannot:
a build whose CPU time is under a minute takes under a minute on a quiet machine however its
threads are spread. Prints medians and ranges, the machine's load average before and after,
and writes everything as JSON with `--json`.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _env(checkout: pathlib.Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(checkout), "PYTHONUNBUFFERED": "1"}


def _cli(checkout: pathlib.Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "uwrt.runtime.cli", *args]


def _children_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def timed_cpu(cmd: list[str], env: dict[str, str], cwd: pathlib.Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one run of `cmd` to its exit (CPU: the process and its children)."""
    c0, t0 = _children_cpu_s(), time.perf_counter()
    r = subprocess.run(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    dt, cpu = time.perf_counter() - t0, _children_cpu_s() - c0
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-2000:]}")
    return dt, cpu


def timed(cmd: list[str], env: dict[str, str], cwd: pathlib.Path) -> float:
    return timed_cpu(cmd, env, cwd)[0]


def _proc_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")     # utime + stime


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`uwrt serve` on a free port; `started_s` is the time from start to its SERVING line."""

    def __init__(self, checkout: pathlib.Path, bundle: pathlib.Path, log: pathlib.Path) -> None:
        self.port = _free_port()
        self.log = log
        t0 = time.perf_counter()
        with open(log, "w") as f:
            self.proc = subprocess.Popen(_cli(checkout, "serve", "--bundle", str(bundle), "--port", str(self.port),
                                              "--workers", "1"),
                                         env=_env(checkout), cwd=checkout, stdout=f, stderr=subprocess.STDOUT)
        while not re.search(r"\bSERVING\b", log.read_text()):
            if self.proc.poll() is not None:
                raise SystemExit(f"uwrt serve exited ({self.proc.returncode}):\n{log.read_text()[-2000:]}")
            if time.perf_counter() - t0 > 600:
                self.stop()
                raise SystemExit("uwrt serve did not reach SERVING within 600 s")
            time.sleep(0.05)
        self.started_s = time.perf_counter() - t0
        self.started_cpu_s = _proc_cpu_s(self.proc.pid)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def summary(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def fmt(s: dict[str, float]) -> str:
    return f"{s['median']:.2f} s (range {s['min']:.2f}-{s['max']:.2f}, n={int(s['n'])})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkout", type=pathlib.Path, default=ROOT, help="the source tree to time (default: this one)")
    ap.add_argument("--repeat", type=int, default=5, help="runs of each CLI command (default 5)")
    ap.add_argument("--builds", default="default,full",
                    help="comma-separated build-demo presets to time to SERVING (default 'default,full')")
    ap.add_argument("--cli-only", action="store_true", help="only the CLI timings (a small bundle for decide)")
    ap.add_argument("--json", type=pathlib.Path, help="write the results here")
    args = ap.parse_args(argv)
    checkout = args.checkout.resolve()
    env = _env(checkout)
    out: dict = {"checkout": str(checkout), "loadavg_before": os.getloadavg(),
                 "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with tempfile.TemporaryDirectory(prefix="uwrt-first-hour-") as tmp:
        work = pathlib.Path(tmp)
        small = work / "small"
        print("building the small bundle for decide ...", file=sys.stderr, flush=True)
        timed(_cli(checkout, "build-demo", "--out", str(small), "--preset", "small"), env, checkout)
        srv = Server(checkout, small, work / "serve-small.log")
        try:
            helps, decides = [], []
            for _ in range(args.repeat):          # round-robin, so a load change hits both alike
                helps.append(timed(_cli(checkout, "--help"), env, checkout))
                decides.append(timed(_cli(checkout, "decide", "--target", f"127.0.0.1:{srv.port}", "--n", "1"),
                                     env, checkout))
        finally:
            srv.stop()
        out["help_s"], out["decide_s"] = summary(helps), summary(decides)
        print(f"uwrt --help        {fmt(out['help_s'])}")
        print(f"uwrt decide --n 1  {fmt(out['decide_s'])}")
        if not args.cli_only:
            for preset in [p for p in args.builds.split(",") if p]:
                d = work / preset
                print(f"building the {preset} bundle ...", file=sys.stderr, flush=True)
                build_s, build_cpu = timed_cpu(_cli(checkout, "build-demo", "--out", str(d), "--preset", preset),
                                               env, checkout)
                srv = Server(checkout, d, work / f"serve-{preset}.log")
                srv.stop()
                out[f"build_{preset}"] = {"build_s": build_s, "build_cpu_s": build_cpu,
                                          "serve_to_serving_s": srv.started_s, "serve_cpu_s": srv.started_cpu_s,
                                          "total_s": build_s + srv.started_s,
                                          "total_cpu_s": build_cpu + srv.started_cpu_s}
                print(f"build-demo --preset {preset}: build {build_s:.1f} s ({build_cpu:.1f} s CPU) + serve to "
                      f"SERVING {srv.started_s:.1f} s ({srv.started_cpu_s:.1f} s CPU) = "
                      f"{build_s + srv.started_s:.1f} s wall, {build_cpu + srv.started_cpu_s:.1f} s CPU")
    out["loadavg_after"] = os.getloadavg()
    print(f"load average before {out['loadavg_before']}, after {out['loadavg_after']}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
