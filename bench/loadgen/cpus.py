"""CPU accounting and pinning for the generator and the servers it measures.

* `cpu_s()`: this process's CPU seconds (user + system); `proc_cpu_s(pid)`: another process's,
  from /proc (all its threads; children that exited and were waited for included).
* `parse_cpus("0", "0-1,3")`: a CPU list as taskset writes it -> sorted ints.
* `pin_process(pid, cpus)`: set the affinity of every thread of a process (sched_setaffinity
  acts on one thread; threads created later inherit their creator's mask). `pin_self(cpus)`
  does it for this process before it starts any threads of its own.
* `process_cpus(pid)`: the CPUs a process may run on, the union over its threads, as a list;
  every result row records it for the generator and, when known, the server.

Thread safety: stateless.
"""
from __future__ import annotations

import os

__all__ = ["cpu_s", "proc_cpu_s", "parse_cpus", "format_cpus", "pin_process", "process_cpus"]


def cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def proc_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of another process, from /proc (NaN if unavailable)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            f = fh.read().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def parse_cpus(spec: str) -> list[int]:
    """'0-2,5' -> [0, 1, 2, 5]; ValueError for anything else (or CPUs this machine lacks)."""
    out: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        lo, _, hi = part.partition("-")
        a, b = int(lo), int(hi or lo)
        if a < 0 or b < a:
            raise ValueError(f"not a CPU list: {spec!r}")
        out.update(range(a, b + 1))
    if not out:
        raise ValueError(f"empty CPU list: {spec!r}")
    avail = os.sched_getaffinity(0) | set(range(os.cpu_count() or 1))
    if not out <= avail:
        raise ValueError(f"CPUs {sorted(out - avail)} do not exist here (this machine: {format_cpus(avail)})")
    return sorted(out)


def format_cpus(cpus) -> str:
    """[0, 1, 2, 5] -> '0-2,5' (None -> '')."""
    if cpus is None:
        return ""
    xs = sorted(set(cpus))
    parts, i = [], 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        parts.append(str(xs[i]) if i == j else f"{xs[i]}-{xs[j]}")
        i = j + 1
    return ",".join(parts)


def _threads(pid: int) -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return [pid]


def pin_process(pid: int, cpus: list[int]) -> None:
    """Every current thread of `pid` (0 = this process) may run on `cpus` only."""
    pid = pid or os.getpid()
    for tid in _threads(pid):
        try:
            os.sched_setaffinity(tid, cpus)
        except ProcessLookupError:      # a thread that just exited
            pass


def process_cpus(pid: int = 0) -> list[int] | None:
    """The union of the CPU masks of `pid`'s threads (0 = this process); None if it is gone."""
    pid = pid or os.getpid()
    out: set[int] = set()
    for tid in _threads(pid):
        try:
            out |= os.sched_getaffinity(tid)
        except (ProcessLookupError, OSError):
            pass
    return sorted(out) if out else None
