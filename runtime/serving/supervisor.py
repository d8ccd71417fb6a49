"""`uwrt serve` with several workers: the supervisor (parent) process.

    supervisor: reserve host:port --> spawn N workers (each pinned to its core) --> every worker
        loads + warms up --> reports its bundle digest --> all match: "bind" --> all SERVING -->
        "uwrt serving on HOST:PORT with N workers" --> watch: restart a crashed worker
        (backoff) --> SIGTERM/SIGINT: forward, drain, exit

* **The port.** Checked and held before anything starts (runtime/serving/ports.py): a plain bind
  fails on any listener (exit 4, naming the address); then a socket bound with SO_REUSEPORT and
  never listening holds it for the supervisor's life, so other servers cannot bind it even while
  every worker restarts, and port 0 becomes a concrete port handed to the workers.
* **Workers** (runtime/serving/worker_process.py) are fresh interpreters (`python -m ...`, not a
  fork: torch, ONNX Runtime and gRPC threads do not survive fork), each in its own session so a
  terminal's Ctrl-C reaches only the supervisor, which forwards it. Each pins itself to its core
  before importing anything heavy, warms up, and binds with SO_REUSEPORT only after the
  supervisor accepted its bundle digest.
* **Same bundle.** The expected digest is `bundle_digest` (if set) or the one in the bundle's
  manifest.json when serving starts; a worker reporting another (the directory was replaced
  meanwhile) is killed before it binds and logged; at start-up that fails start-up (exit 2), later
  it counts as a failed restart. At start-up no worker binds before every worker has reported.
* **Health gate.** The supervisor prints its "serving" line only once every worker reports SERVING;
  a worker that exits or does not reach SERVING within `worker_start_timeout_s` fails start-up
  (its exit code: 2 bundle, 3 device, 4 port; else 5), the others are stopped.
* **Restarts.** A worker that exits while serving is logged with its exit code or signal and
  restarted after `restart_backoff_s`, doubling per consecutive failure up to 60 s (reset after
  60 s of serving); the other workers keep serving meanwhile.
* **Drain.** SIGTERM/SIGINT: SIGTERM to every serving worker (each drains: health NOT_SERVING, new
  RPCs refused, queued and in-flight requests finish within grace_s), workers still starting are
  killed (they hold no requests); exit 0 when every serving worker drained, 6 when one had to be
  killed after grace_s + 10 s or failed its drain. A second signal kills everything at once (exit 6).
* **Reporting.** One log line per worker start, ready, exit and restart, with index, pid and core;
  a JSON status file in a private temporary directory, rewritten atomically on every change, which
  each worker reads for GetModelInfo (runtime/serving/workers.py).

Thread safety: single-threaded; `run` must be called from the main thread (it owns the signals).
"""
from __future__ import annotations

import json
import logging
import os
import pathlib
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from uwrt.runtime.config import RuntimeConfig
from uwrt.runtime.serving.ports import Reservation
from uwrt.runtime.serving.reload import ReloadRound
from uwrt.runtime.serving.workers import THREAD_ENV, WorkerPlan, digest_matches, pinned_config, write_status

__all__ = ["Supervisor", "serve_workers", "expected_digest", "EXIT_BUNDLE", "EXIT_PORT", "EXIT_START", "EXIT_UNDRAINED"]

log = logging.getLogger("uwrt.supervisor")

EXIT_BUNDLE, EXIT_DEVICE, EXIT_PORT, EXIT_START, EXIT_UNDRAINED = 2, 3, 4, 5, 6
DRAIN_MARGIN_S = 10.0      # past grace_s: interpreter exit after the drain (the worker exits without teardown)
BACKOFF_MAX_S = 60.0
STABLE_S = 60.0            # serving this long resets a worker's consecutive-failure count
WORKER_MODULE = "uwrt.runtime.serving.worker_process"


def expected_digest(cfg: RuntimeConfig, bundle: str) -> tuple[str, str]:
    """(digest or prefix every worker must serve, where it comes from). Reads only manifest.json's
    `bundle_digest` field: each worker verifies the whole bundle against it when it loads.
    Raises OSError/ValueError/KeyError when the manifest cannot be read."""
    if cfg.bundle_digest:
        return cfg.bundle_digest, "the bundle_digest setting"
    manifest = pathlib.Path(bundle) / "manifest.json"
    digest = json.loads(manifest.read_text())["bundle_digest"]
    if not isinstance(digest, str) or len(digest) < 12:
        raise ValueError(f"{manifest}: bundle_digest is not a digest: {digest!r}")
    return digest, f"{manifest} at start-up"


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


@dataclass(eq=False)
class _Worker:
    index: int
    cpu: int | None
    proc: subprocess.Popen | None = None
    status_fd: int | None = None
    buf: bytes = b""
    #: new | starting (spawned) | loaded (digest accepted, binding) | serving | draining | backoff
    #: (waiting to restart) | exited
    state: str = "new"
    restarts: int = 0
    failures: int = 0          # consecutive failed runs (crash, refusal, start timeout)
    last_exit: str | None = None
    why: str = ""              # why the supervisor killed it (refused, start timeout), for the exit line
    error: str = ""            # the worker's own last error message
    started_at: float = 0.0
    serving_since: float | None = None
    restart_at: float = 0.0
    drained: bool = False

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def tag(self) -> str:
        return f"worker {self.index} (pid {self.pid}, cpu {'none' if self.cpu is None else self.cpu})"


class Supervisor:
    """Runs N worker processes behind one reserved port until SIGTERM/SIGINT. `run()` -> exit code."""

    def __init__(self, cfg: RuntimeConfig, bundle: str, plan: WorkerPlan, reservation: Reservation, *,
                 profile_reason: str, expected: tuple[str, str], log_level: int = logging.INFO) -> None:
        self.cfg = cfg
        self.bundle = os.path.realpath(bundle)      # every worker, restarts included, loads the same directory
        self.bundle_arg = bundle                    # as given: SIGHUP re-resolves it (a flipped symlink)
        self.reload: ReloadRound | None = None      # a hot reload in progress (runtime/serving/reload.py)
        self._reload_seq = 0
        self.reloads = 0
        self.reload_last = ""
        self.plan = plan
        self.res = reservation
        self.profile_reason = profile_reason
        self.digest, self.digest_source = expected
        self.log_level = log_level
        wcfg = RuntimeConfig.from_dict({**cfg.to_dict(), "port": reservation.port})
        if plan.pinned:
            wcfg, changed = pinned_config(wcfg)
            if changed:
                log.info("pinned workers run one thread per pool: %s set to 1", ", ".join(changed))
        self.worker_cfg = wcfg
        self.workers = [_Worker(i, c) for i, c in enumerate(plan.cpus)]
        self.restarts = 0
        self.refused = 0
        self.phase = "starting"      # starting | serving | stopping
        self.fail_code: int | None = None
        self._bind_sent = False
        self.tmpdir = tempfile.mkdtemp(prefix="uwrt-serve-")    # 0700: private to this user
        self.status_file = os.path.join(self.tmpdir, "workers.json")
        self.sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.sel.register(self._wake_r, selectors.EVENT_READ, None)
        self.metrics = None       # the one /metrics over every worker (runtime/serving/metrics.py)
        if cfg.metrics_port:
            from uwrt.runtime.serving.metrics import SupervisorEndpoint
            self.metrics = SupervisorEndpoint(self.tmpdir, cfg.metrics_host or cfg.host, cfg.metrics_port,
                                              bundle=self.bundle, min_decisions=cfg.drift_min_decisions)
            self.metrics.watch_cpu(lambda: [(w.index, w.pid) for w in self.workers if w.pid is not None])

    # ------------------------------------------------------------------ public

    def run(self) -> int:
        """Start every worker, serve until SIGTERM/SIGINT, drain. Returns the process exit code."""
        old = {s: signal.signal(s, lambda *_: None)
               for s in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGHUP)}
        old_fd = signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        try:
            log.info("starting %s on %s; bundle %s, digest %s (from %s)", self.plan.describe(), self.res.address,
                     self.bundle, self.digest[:12], self.digest_source)
            if self.metrics is not None:
                self.metrics.start()
            self._publish()
            self._recover_records(None)      # every writer directory, before any worker writes
            for w in self.workers:
                self._spawn(w)
            code = self._start()
            if code is None:
                where = ("pinned to cpus " + ",".join(str(w.cpu) for w in self.workers)) if self.plan.pinned \
                    else "not pinned"
                print(f"uwrt serving on {self.res.address} with {len(self.workers)} workers ({where})", flush=True)
                code = self._supervise()
            return code
        finally:
            for w in self.workers:         # normally none left: only after an unexpected error
                if w.proc is not None and w.proc.poll() is None:
                    w.proc.kill()
                    w.proc.wait()
            signal.set_wakeup_fd(old_fd)
            for s, h in old.items():
                signal.signal(s, h)
            if self.metrics is not None:
                self.metrics.close()
            self.sel.close()
            os.close(self._wake_r)
            os.close(self._wake_w)
            self.res.close()
            shutil.rmtree(self.tmpdir, ignore_errors=True)

    # ------------------------------------------------------------------ phases

    def _start(self) -> int | None:
        """Until every worker is SERVING (None), a worker fails (its code), or a signal (drain)."""
        while True:
            sigs = self._pump(self._timeout())
            if sigs:
                log.info("signal during start-up: stopping")
                return self._stop()
            if self.fail_code is not None:
                self._stop()
                return self.fail_code
            if all(w.state == "serving" for w in self.workers):
                self.phase = "serving"
                return None
            if not self._bind_sent and all(w.state == "loaded" for w in self.workers):
                self._bind_sent = True
                for w in self.workers:       # every digest checked: now all may bind
                    self._send(w, {"cmd": "bind"})
            self._check_start_timeouts()

    def _supervise(self) -> int:
        while True:
            sigs = self._pump(self._timeout())
            if sigs:
                log.info("%s: draining %d workers (grace %.1fs)", signal.Signals(sigs[0]).name,
                         sum(w.state == "serving" for w in self.workers), self.cfg.grace_s)
                return self._stop()
            now = time.monotonic()
            for w in self.workers:
                if w.state == "backoff" and now >= w.restart_at:
                    w.restarts += 1
                    self.restarts += 1
                    self._spawn(w)
            self._check_start_timeouts()
            self._reload_step()

    def _stop(self) -> int:
        """Drain serving workers (SIGTERM), kill starting ones; exit code 0 or EXIT_UNDRAINED."""
        self.phase = "stopping"
        draining = []
        for w in self.workers:
            if w.proc is None:
                w.state = "exited"
            elif w.state == "serving":
                w.state, w.drained = "draining", False
                draining.append(w)
                self._signal(w, signal.SIGTERM)
            else:
                w.why = "stopped before serving"
                self._signal(w, signal.SIGKILL)
        self._publish()
        deadline = time.monotonic() + self.cfg.grace_s + DRAIN_MARGIN_S
        undrained = False
        while any(w.proc is not None for w in self.workers):
            left = deadline - time.monotonic()
            if left <= 0 or self._pump(min(left, 1.0)):
                for w in self.workers:
                    if w.proc is not None:
                        log.error("%s not stopped %s: killing it", w.tag(),
                                  "after a second signal" if left > 0 else f"within grace_s + {DRAIN_MARGIN_S:.0f}s")
                        undrained |= w in draining
                        w.why = "killed: not drained in time"
                        self._signal(w, signal.SIGKILL)
                        w.proc.wait()
                        self._reaped(w)
        for w in draining:
            if not w.drained or w.last_exit != "exit code 0":
                undrained = True
        log.info("all workers stopped%s", "; some did not drain cleanly" if undrained else ", drained")
        return EXIT_UNDRAINED if undrained else 0

    # ------------------------------------------------------------------ events

    def _timeout(self) -> float:
        now = time.monotonic()
        t = 1.0
        for w in self.workers:
            if w.state == "backoff":
                t = min(t, max(0.0, w.restart_at - now))
        return t

    def _pump(self, timeout: float) -> list[int]:
        """Wait up to `timeout` for signals, status lines and exits; handle them. Returns the
        stop signals (SIGTERM/SIGINT) received."""
        stops: list[int] = []
        for key, _ in self.sel.select(timeout):
            if key.data is None:
                try:
                    data = os.read(self._wake_r, 512)
                except BlockingIOError:
                    data = b""
                stops += [s for s in data if s in (signal.SIGTERM, signal.SIGINT)]
                if signal.SIGHUP in data and self.phase == "serving":
                    self._start_reload("", "", None)
            else:
                self._read_status(key.data)
        for w in self.workers:
            if w.proc is not None and w.proc.poll() is not None:
                if w.status_fd is not None:        # whatever it wrote before exiting
                    self._read_status(w)
                self._reaped(w)
        return stops

    def _read_status(self, w: _Worker) -> None:
        assert w.status_fd is not None
        try:
            chunk = os.read(w.status_fd, 65536)
        except BlockingIOError:
            return
        if not chunk:
            self.sel.unregister(w.status_fd)
            os.close(w.status_fd)
            w.status_fd = None
            return
        w.buf += chunk
        while b"\n" in w.buf:
            line, w.buf = w.buf.split(b"\n", 1)
            try:
                ev = json.loads(line)
            except ValueError:
                log.error("%s: unreadable status line %r", w.tag(), line[:200])
                continue
            self._on_event(w, ev)

    def _on_event(self, w: _Worker, ev: dict[str, Any]) -> None:
        kind = ev.get("event")
        if kind == "loaded":
            digest = str(ev.get("digest", ""))
            if not digest_matches(self.digest, digest):
                self.refused += 1
                w.why = (f"refused: it loaded bundle {ev.get('bundle_id')} with digest {digest[:12]}, but this "
                         f"server serves digest {self.digest[:12]} (from {self.digest_source})")
                log.error("%s %s", w.tag(), w.why)
                self._signal(w, signal.SIGKILL)
                if self.phase == "starting":
                    self.fail_code = EXIT_BUNDLE
                return
            w.state = "loaded"
            log.info("%s loaded bundle %s (%s) and warmed up in %.1fs", w.tag(), ev.get("bundle_id"), digest[:12],
                     float(ev.get("load_s", 0.0)))
            if self.phase == "serving":
                self._send(w, {"cmd": "bind"})
        elif kind == "serving":
            w.state, w.serving_since = "serving", time.monotonic()
            log.info("%s ready: SERVING on %s", w.tag(), self.res.address)
        elif kind == "drained":
            w.drained = bool(ev.get("ok", True))
            if not w.drained:
                log.error("%s: requests were still queued or running when grace_s ran out", w.tag())
        elif kind == "error":
            w.error = str(ev.get("message", ""))
            log.error("%s failed to start: %s", w.tag(), w.error)
        elif kind == "reload_request":
            self._start_reload(str(ev.get("bundle", "")), str(ev.get("expected", "")), (w.index, int(ev["id"])))
        elif kind in ("prepared", "prepare_failed", "committed"):
            self._reload_event(w, kind, ev)
        self._publish()

    # ------------------------------------------------------------------ hot reload

    def _start_reload(self, bundle: str, expected: str, requester: tuple[int, int] | None) -> None:
        """Two-phase reload of every serving worker: prepare (each loads, compiles, warms and
        parity-checks the bundle in the background), then commit only when all prepared the
        same digest; otherwise abort: nothing switches."""
        if self.reload is not None:
            self._reload_reply(requester, False, f"reload {self.reload.rid} is in progress")
            return
        path = os.path.realpath(bundle or self.bundle_arg)
        serving = {w.index for w in self.workers if w.state == "serving"}
        if not serving:
            self._reload_reply(requester, False, "no worker is serving")
            return
        self._reload_seq += 1
        self.reload = ReloadRound(self._reload_seq, path, expected, serving, requester)
        log.info("reload %d: preparing %s on workers %s", self._reload_seq, path, sorted(serving))
        for w in self.workers:
            if w.index in serving:
                self._send(w, {"cmd": "prepare", "id": self._reload_seq, "bundle": path, "expected": expected})

    def _reload_event(self, w: _Worker, kind: str, ev: dict[str, Any]) -> None:
        r = self.reload
        if r is None or int(ev.get("id", -1)) != r.rid:
            return
        if kind == "prepared":
            r.on_prepared(w.index, str(ev.get("digest", "")), str(ev.get("bundle_id", "")))
        elif kind == "prepare_failed":
            r.on_failed(w.index, str(ev.get("reason", "")))
        elif kind == "committed":
            r.committed.add(w.index)
        self._reload_step()

    def _reload_step(self) -> None:
        r = self.reload
        if r is None:
            return
        if r.phase == "prepare" and time.monotonic() - r.started > self.cfg.worker_start_timeout_s:
            for i in r.workers - set(r.prepared) - set(r.failed):
                r.on_failed(i, f"not prepared within worker_start_timeout_s = {self.cfg.worker_start_timeout_s:g}s")
        what = r.decide()
        if what == "commit":
            # from now on this is the bundle: a worker (re)started later loads it and is checked against it
            self.bundle, self.digest = r.bundle, r.digest
            self.digest_source = f"reload {r.rid} of {r.bundle}"
            for w in self.workers:
                if w.index in r.workers:
                    self._send(w, {"cmd": "commit", "id": r.rid})
        elif what == "abort":
            for w in self.workers:
                if w.index in r.prepared:
                    self._send(w, {"cmd": "abort", "id": r.rid, "why": r.message})
            log.error("reload %d of %s refused: %s; still serving %s", r.rid, r.bundle, r.message, self.digest[:12])
            self.reload_last = f"refused {r.bundle}: {r.message}"
            self._reload_reply(r.requester, False, r.message)
            self.reload = None
            return
        if r.phase == "commit" and r.workers <= r.committed:
            self.reloads += 1
            self.reload_last = f"serving {r.bundle_id} ({r.digest[:12]}) from {r.bundle}"
            log.info("reload %d: every worker serves bundle %s (%s) from %s", r.rid, r.bundle_id, r.digest[:12],
                     r.bundle)
            self._reload_reply(r.requester, True, self.reload_last, r)
            self.reload = None

    def _reload_reply(self, requester: tuple[int, int] | None, ok: bool, message: str,
                      r: ReloadRound | None = None) -> None:
        if requester is None:
            return
        w = self.workers[requester[0]]
        self._send(w, {"cmd": "reload_result", "id": requester[1], "ok": ok, "message": message,
                       "digest": r.digest if r else "", "bundle_id": r.bundle_id if r else "",
                       "workers": len(r.workers) if r else 0})

    def _reaped(self, w: _Worker) -> None:
        """`w.proc` has exited: record it, then fail start-up, restart, or just note it (draining)."""
        assert w.proc is not None
        rc = w.proc.returncode
        if w.status_fd is not None:
            self.sel.unregister(w.status_fd)
            os.close(w.status_fd)
            w.status_fd = None
        w.last_exit = describe_exit(rc)
        pid, w.buf = w.proc.pid, b""
        if self.metrics is not None:
            self.metrics.worker_exited(pid)
        if w.proc.stdin is not None:
            try:
                w.proc.stdin.close()
            except OSError:
                pass
        why = f" ({w.why})" if w.why else ""
        if self.phase == "stopping":
            w.state = "exited"
            lvl = logging.INFO if (rc == 0 and w.drained) or w.why == "stopped before serving" else logging.ERROR
            log.log(lvl, "worker %d (pid %d, cpu %s) exited: %s%s%s", w.index, pid, w.cpu, w.last_exit,
                    ", drained" if w.drained else "", why)
        elif self.phase == "starting":
            w.state = "exited"
            log.error("worker %d (pid %d, cpu %s) exited during start-up: %s%s", w.index, pid, w.cpu, w.last_exit,
                      why)
            if self.fail_code is None:
                self.fail_code = rc if rc in (EXIT_BUNDLE, EXIT_DEVICE, EXIT_PORT) else EXIT_START
        else:
            now = time.monotonic()
            if w.serving_since is not None and now - w.serving_since >= STABLE_S:
                w.failures = 0
            w.failures += 1
            delay = min(BACKOFF_MAX_S, self.cfg.restart_backoff_s * 2 ** (w.failures - 1))
            w.state, w.restart_at = "backoff", now + delay
            log.error("worker %d (pid %d, cpu %s) exited: %s%s; restarting in %.1fs (failure %d in a row, "
                      "%d restarts so far)", w.index, pid, w.cpu, w.last_exit, why, delay, w.failures, w.restarts)
        w.proc, w.why, w.serving_since = None, "", None
        self._recover_records([w.index])
        r = self.reload
        if r is not None and w.index in r.workers:
            if r.phase == "prepare" and w.index not in r.prepared:
                r.on_failed(w.index, f"exited during the reload ({w.last_exit})")
            elif r.phase == "commit":
                r.committed.add(w.index)       # it restarts on the new bundle (self.bundle)
            self._reload_step()
        self._publish()

    def _recover_records(self, only: list[int] | None) -> None:
        """With records_dir: seal what dead workers left in their log directories, index their
        durable decisions and drop their claims (runtime/records/recover.py), so requests with
        the same ids on the other workers stop waiting for a dead owner at once."""
        if not self.cfg.records_dir:
            return
        from uwrt.runtime.records.index import IdempotencyIndex
        from uwrt.runtime.records.recover import index_path, recover
        try:
            os.makedirs(self.cfg.records_dir, exist_ok=True)
            index = None
            if self.cfg.idempotency_window_s > 0:
                index = IdempotencyIndex(index_path(self.cfg.records_dir), window_s=self.cfg.idempotency_window_s,
                                         owner=f"supervisor:{os.getpid()}")
            recover(self.cfg.records_dir, index, only=only)
            if index is not None:
                index.close()
        except Exception:  # noqa: BLE001 - the worker's own start-up recovers again and fails loudly if it cannot
            log.exception("decision log %s: recovery failed", self.cfg.records_dir)

    def _check_start_timeouts(self) -> None:
        now = time.monotonic()
        for w in self.workers:
            if w.state in ("starting", "loaded") and w.proc is not None and not w.why \
                    and now - w.started_at > self.cfg.worker_start_timeout_s:
                w.why = f"not SERVING within worker_start_timeout_s = {self.cfg.worker_start_timeout_s:g}s"
                log.error("%s %s: killing it", w.tag(), w.why)
                self._signal(w, signal.SIGKILL)

    # ------------------------------------------------------------------ processes

    def _spawn(self, w: _Worker) -> None:
        r, wfd = os.pipe()
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        if self.metrics is not None:
            env.update(self.metrics.env())
        w.proc = subprocess.Popen([sys.executable, "-m", WORKER_MODULE, "--status-fd", str(wfd)],
                                  stdin=subprocess.PIPE, pass_fds=(wfd,), start_new_session=True, env=env)
        os.close(wfd)
        os.set_blocking(r, False)
        w.status_fd, w.buf = r, b""
        self.sel.register(r, selectors.EVENT_READ, w)
        w.state, w.started_at, w.why, w.error, w.drained = "starting", time.monotonic(), "", "", False
        self._send(w, {"index": w.index, "cpu": w.cpu, "count": len(self.workers), "bundle": self.bundle,
                       "config": self.worker_cfg.to_dict(), "profile": self.cfg.profile,
                       "profile_reason": self.profile_reason, "status_file": self.status_file,
                       "log_level": self.log_level, "thread_env": list(THREAD_ENV) if w.cpu is not None else []})
        log.info("%s %s", w.tag(), f"restarted (restart {w.restarts})" if w.restarts else "started")
        self._publish()

    def _send(self, w: _Worker, msg: dict[str, Any]) -> None:
        if w.proc is None or w.proc.stdin is None:
            return
        try:
            w.proc.stdin.write((json.dumps(msg) + "\n").encode())
            w.proc.stdin.flush()
        except OSError:        # it died; its exit is reaped by _pump
            pass

    def _signal(self, w: _Worker, sig: int) -> None:
        if w.proc is not None and w.proc.poll() is None:
            try:
                w.proc.send_signal(sig)
            except ProcessLookupError:
                pass

    def _publish(self) -> None:
        if self.metrics is not None:
            self.metrics.update([w.state for w in self.workers], self.restarts)
        write_status(self.status_file, {
            "supervisor_pid": os.getpid(), "address": self.res.address, "count": len(self.workers),
            "digest": self.digest, "restarts": self.restarts, "refused": self.refused, "phase": self.phase,
            "bundle": self.bundle, "reloads": self.reloads, "reload_last": self.reload_last,
            "workers": [{"index": w.index, "pid": w.pid, "cpu": w.cpu, "state": w.state, "restarts": w.restarts,
                         "last_exit": w.last_exit} for w in self.workers]})


def serve_workers(cfg: RuntimeConfig, bundle: str, plan: WorkerPlan, reservation: Reservation, *,
                  profile_reason: str, log_level: int = logging.INFO) -> int:
    """`uwrt serve` with plan.count > 1 workers on the reserved port; returns the exit code."""
    try:
        expected = expected_digest(cfg, bundle)
    except (OSError, ValueError, KeyError) as e:
        reservation.close()
        print(f"error: {bundle}: cannot read the bundle digest from manifest.json: {type(e).__name__}: {e}",
              file=sys.stderr)
        return EXIT_BUNDLE
    return Supervisor(cfg, bundle, plan, reservation, profile_reason=profile_reason, expected=expected,
                      log_level=log_level).run()
