"""`python deploy/cluster.py up`: N `uwrt serve` replicas behind HAProxy on this machine (loopback).

    python deploy/cluster.py up --replicas 3 [--bundle bundles/demo] [--port 50050] [-- SERVE FLAGS]
    python deploy/cluster.py status [--port 50050]            # the balancer's view of every replica
    python deploy/cluster.py rolling-restart [--port 50050]   # drain and restart each replica in turn

`make cluster` runs `up` after installing what it needs (HAProxy: `make ops-install`). `up` starts
every replica on its own loopback port, waits until each reports SERVING (grpc.health.v1), renders
deploy/haproxy/uwrt.cfg.in for them, starts HAProxy in the foreground as a child and keeps running:
a replica that exits unexpectedly is restarted (HAProxy keeps it out until it reports SERVING
again), SIGHUP (`rolling-restart`) drains and restarts the replicas one at a time, and Ctrl-C /
SIGTERM drains every replica and stops. State for `status` lives in the work directory
(`$TMPDIR/uwrt-cluster-<port>`: cluster.json, haproxy.cfg, haproxy.log, one log per replica).

Draining a replica (`Cluster.drain`) is balancer first, then the process: the runtime API sets the
replica to DRAIN (no new requests from that instant), then SIGTERM lets it finish what it holds
within `grace_s` and exit 0. A plain SIGTERM without the first step can fail the few requests that
reach the replica between its shutdown and the balancer noticing (README, "Scaling out").

Library use (tests, bench/replicas.py): `Cluster(bundle, replicas=3)` as a context manager;
`Replica` alone is one `uwrt serve` process. Not thread-safe: one owner drives a cluster.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import functools
import io
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
if sys.path and pathlib.Path(sys.path[0] or ".").resolve() == ROOT / "deploy":
    sys.path.pop(0)                            # run as a script: deploy/'s modules are not top-level names
if str(ROOT) not in sys.path:                  # `python deploy/cluster.py` from a checkout
    sys.path.insert(0, str(ROOT))

from deploy.raw_health_check import haproxy_tcp_check  # noqa: E402

TEMPLATE = ROOT / "deploy" / "haproxy" / "uwrt.cfg.in"
HEALTH_SERVICE = "uwrt.v1.Underwriting"         # what `uwrt serve` reports (also "" for the whole server)
MIN_HAPROXY = (2, 6)
HAPROXY_MISSING = ("haproxy >= 2.6 is needed for the multi-replica topology and was not found: run "
                   "`make ops-install` (installs the Debian package `haproxy` with apt-get; needs root), or "
                   "install it with your package manager")

__all__ = ["HAProxySettings", "Balancer", "Replica", "Cluster", "render_config", "find_haproxy", "serve_flags", "main"]


# ------------------------------------------------------------------------------------------------
# Balancer configuration


@dataclasses.dataclass(frozen=True)
class HAProxySettings:
    """The knobs of deploy/haproxy/uwrt.cfg.in. Defaults: a replica that stops answering SERVING is
    out of rotation within inter + fall * fastinter (~0.4 s); one that comes back is in after rise
    checks (~0.4 s)."""
    balance: str = "roundrobin"       #: roundrobin (even spread) or leastconn (fewest in-flight requests)
    inter_ms: int = 200               #: health check interval while the replica is up
    fastinter_ms: int = 100           #: interval while its state is changing (after a failed check)
    downinter_ms: int = 500           #: interval while it is down
    fall: int = 2                     #: consecutive failed checks that take a replica out
    rise: int = 2                     #: consecutive SERVING answers that bring it back
    timeout_check_ms: int = 1000      #: a check not answered within this fails
    nbthread: int = 1                 #: HAProxy threads
    health_service: str = HEALTH_SERVICE
    log_level: str = "info"           #: "info" logs every request (tests read it); "notice" only state changes


def render_config(listen: str, servers: list[tuple[str, str]], stats_socket: str,
                  settings: HAProxySettings = HAProxySettings()) -> str:
    """The HAProxy configuration for `servers` ([(name, "host:port")]) behind `listen` ("host:port")."""
    if settings.balance not in ("roundrobin", "leastconn"):
        raise ValueError(f"balance must be roundrobin or leastconn, got {settings.balance!r}")
    fields = {k: str(v) for k, v in dataclasses.asdict(settings).items()}
    fields.update(listen=listen, stats_socket=stats_socket,
                  health_check="\n".join("    " + line for line in haproxy_tcp_check(settings.health_service)),
                  servers="\n".join(f"    server {name} {addr}" for name, addr in servers))
    return string.Template(TEMPLATE.read_text()).substitute(fields)


@functools.cache
def find_haproxy() -> str | None:
    """Path of an haproxy >= 2.6, or None."""
    exe = shutil.which("haproxy") or next((p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy")
                                           if os.access(p, os.X_OK)), None)
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "-v"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"version (\d+)\.(\d+)", out)
    return exe if m and (int(m.group(1)), int(m.group(2))) >= MIN_HAPROXY else None


# ------------------------------------------------------------------------------------------------
# Replicas


@functools.cache
def serve_flags() -> frozenset[str]:
    """Every option `uwrt serve` accepts (read from the CLI's own parser, so it tracks the code)."""
    from uwrt.runtime.cli.main import build_parser
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return frozenset(opt for a in sub.choices["serve"]._actions for opt in a.option_strings)


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS just called free. There is a small race until the caller binds it, and a gRPC
    server that lost it would share it silently (SO_REUSEPORT) rather than fail, until `uwrt serve`
    refuses an occupied port; on loopback, with ports from the OS's ephemeral range, this is rare."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def health(target: str, service: str = "", timeout_s: float = 1.0) -> str:
    """grpc.health.v1 Check through grpcio: "SERVING", "NOT_SERVING", ... or "UNREACHABLE"."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    with grpc.insecure_channel(target) as ch:
        try:
            r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service),
                                                     timeout=timeout_s)
        except grpc.RpcError as e:
            return "UNREACHABLE" if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) \
                else e.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)


def _env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": str(ROOT) + (os.pathsep + path if path else "")}


class Replica:
    """One `uwrt serve` process on a fixed loopback port (its log: `log_path`, appended across restarts)."""

    def __init__(self, name: str, bundle: str | os.PathLike, port: int, *, host: str = "127.0.0.1",
                 serve_args: tuple[str, ...] = (), log_path: str | os.PathLike | None = None) -> None:
        self.name, self.bundle, self.port, self.host = name, str(bundle), port, host
        self.serve_args = tuple(serve_args)
        self.log_path = pathlib.Path(log_path) if log_path else pathlib.Path(tempfile.gettempdir()) / f"uwrt-{name}.log"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "uwrt.runtime.cli", "serve", "--bundle", self.bundle,
               "--host", self.host, "--port", str(self.port)]
        if "--workers" in serve_flags():       # multi-process serving: one worker per replica here
            cmd += ["--workers", "1"]
        if "--drain-delay-s" in serve_flags():
            # on SIGTERM, keep serving NOT_SERVING for longer than HAProxy needs to take the replica
            # out of rotation (inter + fall x fastinter, ~0.4 s): a plain SIGTERM then loses nothing
            cmd += ["--drain-delay-s", "1.0"]
        if "--metrics-port" in serve_flags() and "--metrics-port" not in self.serve_args:
            # every replica would bind the default metrics port (9464) on this one host: the second
            # fails to start. Metrics off unless SERVE_ARGS give each its port (README: Operating uwrt)
            cmd += ["--metrics-port", "0"]
        return cmd + list(self.serve_args)

    def start(self) -> None:
        """Start the process (returns at once; `wait_serving` waits for warm-up)."""
        if self.running:
            raise RuntimeError(f"{self.name} is already running (pid {self.proc.pid})")   # type: ignore[union-attr]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"---- {time.strftime('%H:%M:%S')} start: {' '.join(self.command())}\n".encode())
            log.flush()
            # its own session: Ctrl-C in the terminal reaches the cluster, which drains replicas in order
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=_env(),
                                         cwd=ROOT, start_new_session=True)
        self.starts += 1

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def log_tail(self, n: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        return ""

    def health(self, timeout_s: float = 1.0) -> str:
        return health(self.target, HEALTH_SERVICE, timeout_s)

    def wait_serving(self, timeout_s: float = 180.0) -> None:
        """Until the replica reports SERVING; raises if it exits or the time runs out."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.running:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode if self.proc else '-'}) before "
                                   f"SERVING:\n{self.log_tail()}")
            if self.health(timeout_s=1.0) == "SERVING":
                return
            time.sleep(0.1)
        raise TimeoutError(f"{self.name} not SERVING after {timeout_s:.0f}s:\n{self.log_tail()}")

    def signal(self, sig: int) -> None:
        if self.running:
            self.proc.send_signal(sig)      # type: ignore[union-attr]

    def kill(self) -> None:
        """SIGKILL the replica's whole process group (a crashed host: nothing gets to clean up)."""
        if self.running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)   # type: ignore[union-attr]
            self.proc.wait(timeout=30)                     # type: ignore[union-attr]

    def terminate(self, timeout_s: float = 60.0) -> int | None:
        """SIGTERM (drain within grace_s, then exit) and wait; the exit code, or None if not running."""
        if not self.running:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)             # type: ignore[union-attr]
        try:
            return self.proc.wait(timeout=timeout_s)       # type: ignore[union-attr]
        except subprocess.TimeoutExpired:
            self.kill()
            raise


# ------------------------------------------------------------------------------------------------
# The balancer


class Balancer:
    """One HAProxy process in front of `servers` ([(name, "host:port")]), listening on `port`
    (0 = a free one); its runtime API (`api`, `servers`, `wait_status`) over a unix socket."""

    def __init__(self, servers: list[tuple[str, str]], *, host: str = "127.0.0.1", port: int = 0,
                 workdir: str | os.PathLike | None = None,
                 settings: HAProxySettings = HAProxySettings()) -> None:
        exe = find_haproxy()
        if exe is None:
            raise RuntimeError(HAPROXY_MISSING)
        self.exe, self.servers_cfg, self.host, self.settings = exe, list(servers), host, settings
        self.port = port or free_port(host)
        self._own_workdir = workdir is None
        self.workdir = pathlib.Path(workdir) if workdir else pathlib.Path(tempfile.mkdtemp(prefix="uwrt-lb-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.stats_socket = str(self.workdir / "haproxy.sock")
        self.cfg_path = self.workdir / "haproxy.cfg"
        self.log_path = self.workdir / "haproxy.log"
        self.proc: subprocess.Popen | None = None

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    def config(self) -> str:
        return render_config(self.target, self.servers_cfg, self.stats_socket, self.settings)

    def check_config(self) -> None:
        """Write the configuration and have HAProxy validate it (raises with its message)."""
        self.cfg_path.write_text(self.config())
        chk = subprocess.run([self.exe, "-c", "-q", "-f", str(self.cfg_path)], capture_output=True, text=True)
        if chk.returncode:
            raise RuntimeError(f"haproxy rejected {self.cfg_path}:\n{chk.stdout}{chk.stderr}")

    def start(self, wait_up_s: float | None = 30.0) -> Balancer:
        """Start HAProxy in the foreground as a child; with `wait_up_s`, wait until every server is UP."""
        self.check_config()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([self.exe, "-db", "-f", str(self.cfg_path)], stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        if wait_up_s is not None:
            deadline = time.monotonic() + wait_up_s
            for name, _ in self.servers_cfg:
                self.wait_status(name, "UP", max(0.1, deadline - time.monotonic()), checked=True)
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.running:
            self.proc.terminate()                          # type: ignore[union-attr]
            try:
                self.proc.wait(timeout=10)                 # type: ignore[union-attr]
            except subprocess.TimeoutExpired:
                self.proc.kill()                           # type: ignore[union-attr]
                self.proc.wait()                           # type: ignore[union-attr]
        if self._own_workdir and os.environ.get("UWRT_KEEP_CLUSTER_LOGS") != "1":
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Balancer:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    def api(self, command: str, timeout_s: float = 5.0) -> str:
        """One HAProxy runtime API command over the stats socket; its reply."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout_s)
            s.connect(self.stats_socket)
            s.sendall(command.encode() + b"\n")
            out = b""
            while chunk := s.recv(65536):
                out += chunk
        return out.decode()

    def servers(self) -> dict[str, dict[str, str]]:
        """`show stat` rows of the replicas backend, by server name: status (UP, DOWN, DRAIN, MAINT,
        "UP 1/2", ...), scur (requests in flight), stot (requests sent), hrsp_5xx, check_status, ..."""
        return parse_show_stat(self.api("show stat"))

    def status(self, name: str) -> str:
        return self.servers()[name]["status"]

    def wait_status(self, name: str, status: str, timeout_s: float = 30.0, *, checked: bool = False) -> None:
        """Until the balancer shows `name` in `status`. HAProxy 2.6 starts every server UP until its
        first check; `checked=True` also requires a completed health check that agrees."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.running:
                raise RuntimeError(f"haproxy is not running:\n{self.log_tail()}")
            with contextlib.suppress(OSError):
                row = self.servers()[name]
                last = row.get("check_status", "").lstrip("* ")
                if row["status"] == status and (not checked or last not in ("", "INI")):
                    return
            time.sleep(0.05)
        raise TimeoutError(f"{name} not {status} in the balancer after {timeout_s:.1f}s "
                           f"(is {self.status(name)!r}):\n{self.log_tail()}")

    def drain(self, name: str, timeout_s: float = 30.0) -> None:
        """Send `name` no new requests (from the moment the command returns) and wait until the
        requests it already holds are answered (the balancer's in-flight count for it is 0)."""
        self.api(f"set server replicas/{name} state drain")
        deadline = time.monotonic() + timeout_s
        while int(self.servers()[name]["scur"] or 0) > 0:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} still has requests in flight after {timeout_s:.0f}s")
            time.sleep(0.01)

    def ready(self, name: str) -> None:
        """Clear DRAIN/MAINT on `name`; the health checks still decide when it is UP."""
        self.api(f"set server replicas/{name} state ready")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, n: int = 20) -> str:
        return "\n".join(self.log().splitlines()[-n:])


def parse_show_stat(text: str) -> dict[str, dict[str, str]]:
    """The `replicas` backend's server rows of a `show stat` reply, by server name."""
    rows = csv.DictReader(io.StringIO(text.lstrip("# ")))
    return {row["svname"]: row for row in rows if row.get("pxname") == "replicas"
            and row.get("svname") not in ("BACKEND", "FRONTEND")}


# ------------------------------------------------------------------------------------------------
# The topology


class Cluster:
    """`replicas` x `uwrt serve` behind one HAProxy, all on loopback. `start()` returns once every
    replica is SERVING and the balancer has each of them UP; `target` is the balancer's address."""

    def __init__(self, bundle: str | os.PathLike, replicas: int = 3, *, host: str = "127.0.0.1", port: int = 0,
                 workdir: str | os.PathLike | None = None, serve_args: tuple[str, ...] = (),
                 settings: HAProxySettings = HAProxySettings()) -> None:
        if replicas < 1:
            raise ValueError("replicas must be >= 1")
        self._own_workdir = workdir is None
        self.workdir = pathlib.Path(workdir) if workdir else pathlib.Path(tempfile.mkdtemp(prefix="uwrt-cluster-"))
        port = port or free_port(host)
        used: set[int] = {port}
        self.replicas: list[Replica] = []
        for i in range(replicas):
            p = free_port(host)
            while p in used:
                p = free_port(host)
            used.add(p)
            self.replicas.append(Replica(f"r{i + 1}", bundle, p, host=host, serve_args=serve_args,
                                         log_path=self.workdir / f"r{i + 1}.log"))
        self.balancer = Balancer([(r.name, r.target) for r in self.replicas], host=host, port=port,
                                 workdir=self.workdir, settings=settings)

    @property
    def target(self) -> str:
        return self.balancer.target

    def replica(self, name: str) -> Replica:
        for r in self.replicas:
            if r.name == name:
                return r
        raise KeyError(f"no replica {name!r} (have {[r.name for r in self.replicas]})")

    def start(self, timeout_s: float = 300.0) -> Cluster:
        deadline = time.monotonic() + timeout_s
        self.balancer.check_config()             # before anything starts: a bad config fails fast
        for r in self.replicas:                  # warm up in parallel
            r.start()
        for r in self.replicas:
            r.wait_serving(max(1.0, deadline - time.monotonic()))
        self.balancer.start(wait_up_s=max(1.0, deadline - time.monotonic()))
        return self

    def stop(self) -> None:
        """Drain every replica (balancer first), then stop HAProxy."""
        for r in self.replicas:
            if r.running:
                with contextlib.suppress(OSError, TimeoutError, KeyError):
                    self.balancer.drain(r.name, timeout_s=5.0)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    r.terminate()               # kills it if it does not exit in time
                r.kill()                        # a no-op unless it is still there
        self.balancer.stop()
        if self._own_workdir and os.environ.get("UWRT_KEEP_CLUSTER_LOGS") != "1":
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Cluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    def drain(self, name: str, timeout_s: float = 60.0) -> int | None:
        """Balancer first, then the process: no new requests to `name`, wait until what it holds
        is answered, then SIGTERM and wait for its exit code (0 after a clean drain)."""
        self.balancer.drain(name, timeout_s)
        return self.replica(name).terminate(timeout_s)

    def restart(self, name: str, timeout_s: float = 180.0) -> None:
        """Start `name` again on its port and return once the balancer has it UP. The balancer
        only puts it back after `rise` SERVING answers, i.e. after its warm-up."""
        r = self.replica(name)
        if r.running:
            self.drain(name)
        r.start()
        self.balancer.ready(name)
        r.wait_serving(timeout_s)
        self.balancer.wait_status(name, "UP", timeout_s)

    def rolling_restart(self, timeout_s: float = 180.0) -> None:
        """Drain and restart every replica in turn, keeping the others serving."""
        for r in self.replicas:
            self.restart(r.name, timeout_s)

    def describe(self) -> dict:
        b = self.balancer
        return {"target": self.target, "pid": os.getpid(), "workdir": str(self.workdir),
                "haproxy": {"pid": b.proc.pid if b.proc else None, "config": str(b.cfg_path), "log": str(b.log_path),
                            "stats_socket": b.stats_socket},
                "replicas": [{"name": r.name, "target": r.target, "pid": r.pid, "log": str(r.log_path)}
                             for r in self.replicas]}


# ------------------------------------------------------------------------------------------------
# Command line


def default_workdir(port: int) -> pathlib.Path:
    return pathlib.Path(tempfile.gettempdir()) / f"uwrt-cluster-{port}"


def _up(args: argparse.Namespace, serve_args: list[str]) -> int:
    settings = HAProxySettings(balance=args.balance, log_level="info" if args.log_requests else "notice")
    workdir = pathlib.Path(args.workdir) if args.workdir else default_workdir(args.port)
    if not os.path.exists(os.path.join(args.bundle, "manifest.json")):
        print(f"error: no bundle at {args.bundle} (build one: uwrt build-demo --out {args.bundle}, or `make bundle`)",
              file=sys.stderr)
        return 2
    try:
        cluster = Cluster(args.bundle, args.replicas, port=args.port, workdir=workdir, serve_args=tuple(serve_args),
                          settings=settings)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    stop, rolling, started = [False], [False], [False]

    def on_stop(*_):
        stop[0] = True
        if not started[0]:                     # still starting: abandon the start-up (replicas are stopped below)
            raise KeyboardInterrupt

    def on_hup(*_):
        rolling[0] = True
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGHUP, on_hup)
    print(f"starting {args.replicas} replica(s) of {args.bundle} (logs in {workdir}) ...", file=sys.stderr, flush=True)
    state = workdir / "cluster.json"
    try:
        cluster.start()
        started[0] = True
        state.write_text(json.dumps(cluster.describe(), indent=2))
        print(f"uwrt cluster serving on {cluster.target}: HAProxy -> "
              + ", ".join(f"{r.name} {r.target} (pid {r.pid})" for r in cluster.replicas), flush=True)
        print(f"  status: python deploy/cluster.py status --port {args.port}   rolling restart: "
              f"python deploy/cluster.py rolling-restart --port {args.port}   stop: Ctrl-C", flush=True)
        while not stop[0]:
            if not cluster.balancer.running:
                print("error: haproxy exited", file=sys.stderr)
                return 1
            if rolling[0]:
                rolling[0] = False
                print("rolling restart ...", file=sys.stderr, flush=True)
                cluster.rolling_restart()
                state.write_text(json.dumps(cluster.describe(), indent=2))
                print("rolling restart done", file=sys.stderr, flush=True)
            for r in cluster.replicas:
                if not r.running and not stop[0]:
                    print(f"{r.name} exited ({r.proc.returncode if r.proc else '-'}): restarting; the balancer "
                          "takes it back once it reports SERVING", file=sys.stderr, flush=True)
                    cluster.restart(r.name)
                    state.write_text(json.dumps(cluster.describe(), indent=2))
            time.sleep(0.2)
    except (RuntimeError, TimeoutError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        print("stopping: draining every replica ...", file=sys.stderr, flush=True)
        state.unlink(missing_ok=True)
        cluster.stop()
    return 0


def _load_state(args: argparse.Namespace) -> dict:
    path = (pathlib.Path(args.workdir) if args.workdir else default_workdir(args.port)) / "cluster.json"
    if not path.exists():
        raise SystemExit(f"error: no running cluster described at {path} (start one: python deploy/cluster.py up)")
    return json.loads(path.read_text())


def _status(args: argparse.Namespace) -> int:
    state = _load_state(args)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(state["haproxy"]["stats_socket"])
        s.sendall(b"show stat\n")
        text = b"".join(iter(lambda: s.recv(65536), b"")).decode()
    rows = list(parse_show_stat(text).values())
    pids = {r["name"]: r["pid"] for r in state["replicas"]}
    print(f"{'replica':8} {'address':22} {'pid':>7} {'status':8} {'in flight':>9} {'requests':>9} {'5xx':>5}  check")
    for r in rows:
        name = r["svname"]
        print(f"{name:8} {r.get('addr', ''):22} {str(pids.get(name, '')):>7} {r['status']:8} {r['scur']:>9} "
              f"{r['stot']:>9} {r['hrsp_5xx']:>5}  {r.get('check_status', '')} {r.get('check_desc', '')}")
    return 0


def _rolling(args: argparse.Namespace) -> int:
    state = _load_state(args)
    os.kill(int(state["pid"]), signal.SIGHUP)
    print(f"asked the cluster (pid {state['pid']}) for a rolling restart; watch `status`", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    serve_args: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, serve_args = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(prog="deploy/cluster.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start N replicas behind HAProxy and supervise them (Ctrl-C stops)",
                        description="Start N `uwrt serve` replicas behind HAProxy on loopback. Flags after "
                                    "`--` go to every `uwrt serve`.")
    up.add_argument("--replicas", type=int, default=3, help="number of replicas (default 3)")
    up.add_argument("--bundle", default="bundles/demo", help="bundle directory (default bundles/demo)")
    up.add_argument("--port", type=int, default=50050, help="the balancer's port (default 50050)")
    up.add_argument("--balance", choices=["roundrobin", "leastconn"], default="roundrobin")
    up.add_argument("--log-requests", action="store_true", help="HAProxy logs every request (haproxy.log)")
    for sp in (up, sub.add_parser("status", help="the balancer's view of each replica"),
               sub.add_parser("rolling-restart", help="drain and restart each replica in turn")):
        if sp is not up:
            sp.add_argument("--port", type=int, default=50050, help="the cluster's balancer port (default 50050)")
        sp.add_argument("--workdir", default=None, help="state directory (default $TMPDIR/uwrt-cluster-PORT)")
    args = p.parse_args(argv)
    if args.cmd == "up":
        return _up(args, serve_args)
    return _status(args) if args.cmd == "status" else _rolling(args)


if __name__ == "__main__":
    sys.exit(main())
