"""Worker processes behind one port: the plan (how many, which core each), the supervisor's
status file, and what GetModelInfo says about workers.

`plan_workers(cfg)` turns the `workers` / `pin_workers` knobs into a `WorkerPlan`: `auto` is one
worker per CPU in the process's affinity set with the cpu profile, and 1 with the gpu profile
(every process would hold its own CUDA context, memory pool and CUDA graphs, and the contexts
time-slice one GPU; one process batching for the whole GPU is the better use of it). Pinned
workers (`pin_workers = auto` pins when there are at least as many cores as workers) run
every thread pool with one thread: the measured gain of several processes (README: Serving) came
from one pinned process per core, and two unpinned processes were worse than one pinned.

The supervisor (runtime/serving/supervisor.py) rewrites a small JSON status file atomically in
its private temporary directory on every worker state change; each worker reads it when it
answers GetModelInfo (`worker_settings`), so any connection shows the whole picture.

Light on purpose: stdlib and config only. The supervisor and the first lines of a worker process
import it before anything heavy (a worker pins itself before torch, ONNX Runtime or gRPC start
threads). Thread safety: pure functions; the status file is replaced atomically (os.replace).
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from uwrt.runtime.config import RuntimeConfig

__all__ = ["WorkerPlan", "plan_workers", "usable_cpus", "pinned_config", "digest_matches", "write_status",
           "read_status", "worker_settings", "THREAD_ENV"]

#: thread-pool sizes a pinned worker's environment gets unless the operator set them (OpenMP,
#: MKL, OpenBLAS: anything torch, xgboost or numpy may start)
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
#: knobs a pinned worker runs with one thread (one core: more threads only contend)
_ONE_THREAD = ("torch_threads", "tree_threads", "onnx_intra_op_threads", "onnx_inter_op_threads")


@dataclass(frozen=True)
class WorkerPlan:
    """How many server processes and the core each is pinned to (None: not pinned)."""
    count: int
    cpus: tuple[int | None, ...]
    reason: str

    @property
    def pinned(self) -> bool:
        return any(c is not None for c in self.cpus)

    def describe(self) -> str:
        where = ("pinned to cpus " + ",".join(str(c) for c in self.cpus)) if self.pinned else "not pinned"
        return f"{self.count} worker{'s' if self.count > 1 else ''} ({self.reason}; {where})"


def usable_cpus() -> list[int]:
    """The CPUs this process may run on (its affinity set, e.g. narrowed by taskset or a cgroup's cpuset)."""
    return sorted(os.sched_getaffinity(0))


def plan_workers(cfg: RuntimeConfig, cpus: Iterable[int] | None = None) -> WorkerPlan:
    """The worker count and pinning for `cfg` on `cpus` (default: this process's usable CPUs)."""
    cpu_list = sorted(cpus) if cpus is not None else usable_cpus()
    if cfg.workers == "auto":
        if cfg.encoder_device != "cpu":
            n, why = 1, f"auto: 1 with the encoder on {cfg.encoder_device}"
        else:
            n, why = max(1, len(cpu_list)), f"auto: one per usable cpu ({len(cpu_list)})"
    else:
        n, why = int(cfg.workers), f"workers = {cfg.workers}"
    if cfg.pin_workers == "on":
        pin = True
    elif cfg.pin_workers == "auto":
        pin = 1 < n <= len(cpu_list)
        if n > len(cpu_list):
            why += f"; not pinned: more workers than usable cpus ({len(cpu_list)})"
    else:
        pin = False
    cores: tuple[int | None, ...] = tuple(cpu_list[i % len(cpu_list)] for i in range(n)) if pin and cpu_list \
        else (None,) * n
    return WorkerPlan(n, cores, why)


def pinned_config(cfg: RuntimeConfig) -> tuple[RuntimeConfig, list[str]]:
    """`cfg` with one thread per pool (for a worker pinned to one core) and the knobs that changed."""
    changed = [k for k in _ONE_THREAD if getattr(cfg, k) != 1]
    return dataclasses.replace(cfg, torch_threads=1, tree_threads=1, onnx_intra_op_threads=1,
                               onnx_inter_op_threads=1), changed


def digest_matches(expected: str, actual: str) -> bool:
    """True when `actual` (a full hex digest) is `expected` or starts with it (>= 12 hex digits)."""
    return len(expected) >= 12 and actual.startswith(expected)


def write_status(path: str | os.PathLike, doc: Mapping[str, Any]) -> None:
    """Replace the status file atomically (readers never see a partial file)."""
    p = pathlib.Path(path)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(doc, sort_keys=True))
    os.replace(tmp, p)


def read_status(path: str | os.PathLike) -> dict[str, Any]:
    return json.loads(pathlib.Path(path).read_text())


def worker_settings(*, index: int, count: int, cpu: int | None,
                    status_file: str | os.PathLike | None = None) -> dict[str, Any]:
    """GetModelInfo `settings` entries about the answering process (`workers.this.*`) and, under a
    supervisor, every worker as the supervisor last saw it (`workers.<i>.pid|cpu|state|restarts|
    last_exit`, `workers.restarts` in all, `workers.refused` digest refusals). Values are plain
    JSON-ready values (GetModelInfo sends each as JSON text; an unknown pid or cpu is null)."""
    out: dict[str, Any] = {"workers.count": count, "workers.mode": "supervised" if status_file else "single",
                           "workers.this.index": index, "workers.this.pid": os.getpid(), "workers.this.cpu": cpu}
    if status_file is None:
        return out
    try:
        st = read_status(status_file)
    except (OSError, ValueError) as e:
        out["workers.status_error"] = f"{type(e).__name__}: {e}"
        return out
    for k in ("supervisor_pid", "restarts", "refused", "address"):
        out[f"workers.{k}"] = st[k]
    out["workers.bundle"] = st.get("bundle", "")
    out["workers.digest"] = st.get("digest", "")
    out["workers.reloads"] = st.get("reloads", 0)
    out["workers.reload_last"] = st.get("reload_last", "")
    for w in st["workers"]:
        i = w["index"]
        for k in ("pid", "cpu", "state", "restarts", "last_exit"):
            out[f"workers.{i}.{k}"] = w.get(k)
    return out
