"""Servers the benchmarks start as subprocesses: `uwrt serve`, the naive server, the Ray Serve
peer and the echo server (the transport floor), each on port 0, optionally pinned to CPUs.

`server_command(name, bundle, extra)` is the command line; `ServerProcess(name, cmd, timeout,
cpus=None)` starts it in its own session, waits for its "<name> serving on HOST:PORT" line (each
prints it only once warm and answering), keeps the last 60 lines of its output, and `stop()`s
it with SIGTERM (SIGKILL to its whole session after a timeout). With `cpus` the server starts
pinned: the calling thread's CPU mask is set to `cpus` around the fork, so the child and every
thread or process it creates inherit it from the first instruction (no window where a server
thread runs elsewhere); `cpus_used()` reads back what its threads may use.

Thread safety: one ServerProcess per thread of control; `stop()` is idempotent.
"""
from __future__ import annotations

import collections
import os
import re
import shlex
import signal
import subprocess
import sys
import threading

from uwrt.bench.loadgen.cpus import process_cpus

ROOT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
SERVERS = ("uwrt", "naive", "ray", "echo")

__all__ = ["SERVERS", "server_command", "ServerProcess"]


def server_command(name: str, bundle: str, extra: str = "") -> list[str]:
    py = sys.executable
    if name == "uwrt":
        # full GetModelInfo: the sweep reads the batcher's counters (mean batch size) from it
        return [py, "-m", "uwrt.runtime.cli", "serve", "--bundle", bundle, "--port", "0",
                "--model-info-exposure", "full", *shlex.split(extra)]
    if name == "naive":
        return [py, "-m", "uwrt.bench.naive_server", "--bundle", bundle, "--port", "0", *shlex.split(extra)]
    if name == "ray":
        return [py, "-m", "uwrt.bench.ray_peer", "--bundle", bundle, "--port", "0", *shlex.split(extra)]
    if name == "echo":
        return [py, "-m", "uwrt.bench.echo_server", "--port", "0", *shlex.split(extra)]
    raise ValueError(f"unknown server {name!r}")


class ServerProcess:
    """A server subprocess; its output is drained on a thread (kept: the last 60 lines)."""

    READY = re.compile(r"(?:uwrt|naive|ray|echo) serving on (\S+)")

    def __init__(self, name: str, cmd: list[str], start_timeout_s: float, *, cpus: list[int] | None = None) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        self.name, self.cmd = name, cmd
        saved = os.sched_getaffinity(0) if cpus else None
        try:
            if cpus:
                os.sched_setaffinity(0, cpus)        # this thread only (Linux): the child inherits it
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                         text=True, start_new_session=True)
        finally:
            if saved is not None:
                os.sched_setaffinity(0, saved)
        self.tail: collections.deque = collections.deque(maxlen=60)
        self.settings_line = ""
        found: list[str] = []
        ready = threading.Event()

        def pump() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                self.tail.append(line.rstrip())
                if line.startswith("ray settings:"):
                    self.settings_line = line.strip()
                m = self.READY.search(line)
                if m and not found:
                    found.append(m.group(1))
                    ready.set()
            ready.set()

        threading.Thread(target=pump, daemon=True).start()
        if not ready.wait(start_timeout_s) or not found:
            self.stop()
            raise RuntimeError(f"{name} did not start ({shlex.join(cmd)}):\n" + "\n".join(self.tail))
        self.target = found[0]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpus_used(self) -> list[int] | None:
        """The CPUs the server's threads may run on (None once it exited)."""
        return process_cpus(self.proc.pid) if self.proc.poll() is None else None

    def stop(self, timeout_s: float = 60.0) -> int | str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)     # its own session: the server and its children
            self.proc.wait(10)
            return "killed"
