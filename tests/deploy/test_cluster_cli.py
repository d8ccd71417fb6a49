"""`python deploy/cluster.py up` (what `make cluster` runs) as a user runs it: it starts, serves
through the balancer, reports status, restarts a replica that dies, and drains everything on
SIGTERM. Slow (its own 2-replica start-up); loopback; every wait bounded."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

import pytest

from deploy import cluster as dc
from tests.deploy.conftest import needs_haproxy, wait_until
from tests.factories import ROOT

pytestmark = [pytest.mark.slow, needs_haproxy]


class Output:
    """Collects a process's output lines on a thread."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.lines: list[str] = []
        self.thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self.thread.start()

    def _read(self, proc) -> None:
        for line in proc.stdout:
            self.lines.append(line)

    def has(self, text: str) -> bool:
        return any(text in line for line in self.lines)

    def text(self) -> str:
        return "".join(self.lines)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not open(f"/proc/{pid}/stat").read().split(") ", 1)[1].startswith("Z")


def test_cluster_up_serves_supervises_and_stops(small_bundle, tmp_path, capsys):
    from uwrt.runtime.cli.main import main as uwrt
    port, workdir = dc.free_port(), tmp_path / "cluster"
    cmd = [sys.executable, "deploy/cluster.py", "up", "--replicas", "2", "--bundle", str(small_bundle),
           "--port", str(port), "--workdir", str(workdir)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env=dc._env(), start_new_session=True)
    out = Output(proc)
    pids: list[int] = []
    try:
        wait_until(lambda: out.has("uwrt cluster serving on") or proc.poll() is not None, 300, "cluster up", 0.1)
        assert proc.poll() is None, out.text()
        state = json.loads((workdir / "cluster.json").read_text())
        pids = [r["pid"] for r in state["replicas"]]
        assert state["target"] == f"127.0.0.1:{port}" and len(pids) == 2

        assert uwrt(["decide", "--target", f"127.0.0.1:{port}", "--n", "6", "--seed", "4"]) == 0
        assert "6 of 6 decided" in capsys.readouterr().err

        status = subprocess.run([sys.executable, "deploy/cluster.py", "status", "--port", str(port), "--workdir",
                                 str(workdir)], capture_output=True, text=True, cwd=ROOT, env=dc._env(), timeout=60)
        assert status.returncode == 0, status.stderr
        rows = [line.split() for line in status.stdout.splitlines()[1:]]
        assert [(r[0], r[3]) for r in rows] == [("r1", "UP"), ("r2", "UP")], status.stdout

        os.kill(pids[1], signal.SIGKILL)             # a crash: the supervisor restarts it
        wait_until(lambda: out.has("r2 exited"), 30, "the supervisor noticing", 0.1)
        wait_until(lambda: json.loads((workdir / "cluster.json").read_text())["replicas"][1]["pid"] != pids[1],
                   300, "r2 restarted and UP", 0.2)
        pids = [r["pid"] for r in json.loads((workdir / "cluster.json").read_text())["replicas"]]
        assert uwrt(["decide", "--target", f"127.0.0.1:{port}", "--n", "4", "--seed", "5"]) == 0

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, out.text()
        out.thread.join(10)
        assert out.has("stopping: draining every replica")
        wait_until(lambda: not any(_alive(p) for p in pids), 30, "replicas gone")
        assert not (workdir / "cluster.json").exists()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for p in pids:
            if _alive(p):
                os.killpg(p, signal.SIGKILL)
