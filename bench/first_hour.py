"""What a new user waits for: `uwrt --help`, `uwrt decide --n 1`, and the demo builds to SERVING.

    python bench/first_hour.py [--repeat 5] [--builds default,full] [--json OUT]
    python bench/first_hour.py --cli-only --checkout OTHER_TREE    # the same CLI timings for another checkout

Every command runs as a fresh process (`python -m uwrt.runtime.cli` with PYTHONPATH set to the
checkout, so two checkouts can be compared in one run): wall time from start to exit for `--help`
and `decide --n 1` (against a server this script starts on a free port, with the small demo
bundle); for each build preset, the wall time of `uwrt build-demo` and then of `uwrt serve` from
start to its SERVING line. Prints medians and ranges, the machine's load average before and after,
and writes everything as JSON with `--json`.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
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


def timed(cmd: list[str], env: dict[str, str], cwd: pathlib.Path) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-2000:]}")
    return dt


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
                build_s = timed(_cli(checkout, "build-demo", "--out", str(d), "--preset", preset), env, checkout)
                srv = Server(checkout, d, work / f"serve-{preset}.log")
                srv.stop()
                out[f"build_{preset}"] = {"build_s": build_s, "serve_to_serving_s": srv.started_s,
                                          "total_s": build_s + srv.started_s}
                print(f"build-demo --preset {preset}: build {build_s:.1f} s + serve to SERVING "
                      f"{srv.started_s:.1f} s = {build_s + srv.started_s:.1f} s")
    out["loadavg_after"] = os.getloadavg()
    print(f"load average before {out['loadavg_before']}, after {out['loadavg_after']}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
