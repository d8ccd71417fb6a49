"""The transport floor, measured in the same run as the model path: an echo server (no model;
`uwrt.bench.echo_server`) started as a subprocess, and two floor steps at every rate of a sweep,
through the same engine and settings as the model step:

    floor-health   grpc.health.v1 Check against the echo server (the smallest RPC there is)
    floor-echo     Decide (DecideStream with --stream) against the echo server: the request is
                   parsed and a fixed ~490-byte DecisionResponse built and sent, no model

so each rate's rows show what the model path adds on top of what gRPC, Python and the machine
cost. With `--procs K` (Python engine) the floor is sent by K worker processes as well. Rows
carry `series` ("model", "floor-health", "floor-echo"); the echo server's CPU share
and the CPUs it ran on are recorded like the model server's. The echo server is pinned to the
server CPUs when given, so the floor is measured with the same core split as the model path.

Thread safety: a Floor belongs to one sweep; `close()` stops its server.
"""
from __future__ import annotations

import dataclasses

from uwrt.bench.loadgen.accounting import StepSpec
from uwrt.bench.loadgen.pyengine import WorkerPool
from uwrt.bench.loadgen.step import run_step

SERIES = ("floor-health", "floor-echo")

__all__ = ["SERIES", "Floor"]


class Floor:
    """An echo server subprocess and the floor steps run against it (see module docstring)."""

    def __init__(self, cpus: list[int] | None = None, start_timeout_s: float = 60.0, *, procs: int = 1,
                 src_args: dict | None = None) -> None:
        from uwrt.bench.servers import ServerProcess, server_command
        self.server = ServerProcess("echo", server_command("echo", ""), start_timeout_s, cpus=cpus)
        self.target = self.server.target
        self.warm = False
        # with --procs K (Python engine) the floor is sent by K worker processes too: one pool per
        # payload kind (the health RPC has no request body)
        self.procs, self.src_args = procs, src_args or dict(kind="none")
        self.pools: dict[str, WorkerPool] = {}

    def _pool(self, rpc: str, spec: StepSpec) -> WorkerPool | None:
        if self.procs <= 1 or spec.engine != "python":
            return None
        kind = "health" if rpc == "health" else "body"
        if kind not in self.pools:
            src = dict(kind="none") if kind == "health" else self.src_args
            self.pools[kind] = WorkerPool(self.procs, self.target, src)
        return self.pools[kind]

    def steps(self, spec: StepSpec, source, *, progress: bool = False) -> list[dict]:
        """The floor rows at spec's rate (same engine, arrivals, duration, connections, seed)."""
        rows = []
        for series in SERIES:
            rpc = "health" if series == "floor-health" else ("stream" if spec.rpc == "stream" else "decide")
            s = dataclasses.replace(spec, rpc=rpc, tag=f"{spec.tag}{series[6]}")
            src = None if rpc == "health" else source
            pool = self._pool(rpc, s)
            if not self.warm:
                run_step(self.target, dataclasses.replace(s, duration_s=min(1.0, spec.duration_s), tag="fwarm"), src,
                         pool=pool, progress=progress, label="floor warm-up")
                self.warm = True
            row = run_step(self.target, s, src, pool=pool, procs=self.procs if pool else 1,
                           server_pid=self.server.pid, progress=progress, label=f"{series} {spec.rate:.0f} rps")
            row["series"] = series
            rows.append(row)
        return rows

    def close(self) -> int | str:
        for pool in self.pools.values():
            pool.close()
        return self.server.stop()
