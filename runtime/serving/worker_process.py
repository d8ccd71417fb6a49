"""One worker process of `uwrt serve --workers N`: a whole server (pipeline, batcher, gRPC) on
one core. Started by the supervisor (runtime/serving/supervisor.py) as
`python -m uwrt.runtime.serving.worker_process --status-fd FD`, never by hand.

Protocol (JSON lines):

* supervisor -> worker, on stdin: the spec (index, core, resolved configuration, bundle path,
  profile, status file), then `{"cmd": "bind"}` once the supervisor has checked the bundle digest.
  EOF on stdin means the supervisor is gone: the worker drains and exits.
* worker -> supervisor, on FD: `{"event": "loaded", "digest": ...}` after the bundle is loaded and
  every batch shape is warm (before the port is bound), `{"event": "serving"}` once listening
  and SERVING, `{"event": "drained"}` after a drain, `{"event": "error", "message": ...}` before
  a failed start's exit.

Order: read the spec, pin to the core (before torch, ONNX Runtime, xgboost or gRPC start any
thread: threads inherit the affinity), load the bundle, warm up, report the digest, wait for
"bind", bind with SO_REUSEPORT and serve. A restarted worker therefore never receives a
connection while cold. SIGTERM/SIGINT: the server's own drain (health NOT_SERVING, new RPCs
refused, queued and in-flight requests finish within grace_s), then exit 0.

Exit codes: 0 drained (or stopped before serving); 2 the bundle failed to load; 3 the encoder's
device cannot start; 4 the port cannot be bound; 5 any other start-up failure; 6 requests were
still queued or running when grace_s ran out.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import IO, Any

log = logging.getLogger("uwrt.worker")

EXIT_BUNDLE, EXIT_DEVICE, EXIT_BIND, EXIT_START, EXIT_UNDRAINED = 2, 3, 4, 5, 6


def _read_spec(fd: int) -> tuple[dict[str, Any], bytes]:
    """The first line on `fd` (read unbuffered, so nothing after it is swallowed) and the rest read."""
    buf = b""
    while b"\n" not in buf:
        chunk = os.read(fd, 65536)
        if not chunk:
            raise SystemExit("uwrt worker: stdin closed before the spec (run by `uwrt serve --workers N` only)")
        buf += chunk
    line, rest = buf.split(b"\n", 1)
    return json.loads(line), rest


class _Status:
    """The status pipe to the supervisor (written from the main thread only)."""

    def __init__(self, fh: IO[str]) -> None:
        self.fh = fh

    def send(self, event: str, **fields: Any) -> None:
        try:
            self.fh.write(json.dumps({"event": event, **fields}) + "\n")
            self.fh.flush()
        except OSError:          # the supervisor is gone; stdin EOF stops us
            pass


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "--status-fd":
        print("usage: python -m uwrt.runtime.serving.worker_process --status-fd FD (started by `uwrt serve`)",
              file=sys.stderr)
        return 2
    status = _Status(os.fdopen(int(argv[1]), "w", encoding="utf-8"))
    spec, rest = _read_spec(0)
    index, cpu = int(spec["index"]), spec["cpu"]
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})      # first: every thread started from here on inherits it
        for var in spec.get("thread_env", ()):
            os.environ.setdefault(var, "1")
    logging.basicConfig(level=spec.get("log_level", logging.INFO), stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s w{index} %(name)s: %(message)s")

    from uwrt.runtime.config import RuntimeConfig
    from uwrt.runtime.errors import BundleError
    cfg = RuntimeConfig.from_dict(spec["config"])
    t0 = time.perf_counter()
    try:
        from uwrt.runtime.serving.server import build_pipeline
        pipe = build_pipeline(cfg, spec["bundle"])
    except BundleError as e:
        status.send("error", message=f"bundle: {e}")
        return EXIT_BUNDLE
    except (ImportError, RuntimeError, OSError) as e:
        log.exception("worker %d: the pipeline cannot start", index)
        status.send("error", message=f"{type(e).__name__}: {e}")
        return EXIT_DEVICE if cfg.encoder_device != "cpu" else EXIT_START
    except Exception as e:  # noqa: BLE001 - reported to the supervisor, which logs and decides
        log.exception("worker %d: the pipeline cannot start", index)
        status.send("error", message=f"{type(e).__name__}: {e}")
        return EXIT_START
    import asyncio
    return asyncio.run(_serve(spec, cfg, pipe, status, rest, t0))


async def _serve(spec: dict[str, Any], cfg, pipe, status: _Status, rest: bytes, t0: float) -> int:
    import asyncio
    import signal

    from uwrt.runtime.serving.ports import PortUnavailable
    from uwrt.runtime.serving.server import Server
    from uwrt.runtime.serving.workers import worker_settings

    loop = asyncio.get_running_loop()
    index, cpu = int(spec["index"]), spec["cpu"]
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    ctl = asyncio.StreamReader()
    ctl.feed_data(rest)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(ctl), os.fdopen(0, "rb", 0, closefd=False))

    server = Server(pipe, cfg, profile=spec["profile"], profile_reason=spec["profile_reason"], reuse_port=True,
                    bind=False, writer_index=index, recover_all=False, bundle_path=spec["bundle"])
    server.rt.info_sources.append(lambda: worker_settings(index=index, count=int(spec["count"]), cpu=cpu,
                                                          status_file=spec["status_file"]))
    try:
        await server.warm_up()
    except Exception as e:  # noqa: BLE001
        log.exception("worker %d: warm-up failed", index)
        status.send("error", message=f"warm-up: {type(e).__name__}: {e}")
        return EXIT_START
    ident = pipe.identity
    status.send("loaded", digest=ident.bundle_digest, bundle_id=ident.bundle_id,
                load_s=round(time.perf_counter() - t0, 2))

    line = asyncio.ensure_future(ctl.readline())
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait({line, stopped}, return_when=asyncio.FIRST_COMPLETED)
    if not line.done() or not line.result() or json.loads(line.result()).get("cmd") != "bind":
        log.info("worker %d: stopped before serving", index)
        line.cancel()
        stopped.cancel()
        return 0
    stopped.cancel()
    try:
        await server.start(warm=False)      # warm already: binds (SO_REUSEPORT), listens, SERVING
    except PortUnavailable as e:
        status.send("error", message=str(e))
        return EXIT_BIND
    status.send("serving", port=server.port)

    # hot reload (runtime/serving/reload.py): the supervisor's two-phase round over every worker
    from uwrt.runtime.pb import admin_pb
    from uwrt.runtime.serving.reload import ReloadRefused
    prepared: dict[int, Any] = {}
    asks: dict[int, asyncio.Future] = {}
    tasks: set[asyncio.Future] = set()

    async def do_prepare(msg: dict[str, Any]) -> None:
        rid = int(msg["id"])
        try:
            p = await server.reloader.prepare(str(msg.get("bundle", "")), str(msg.get("expected", "")))
        except ReloadRefused as e:
            status.send("prepare_failed", id=rid, reason=str(e))
            return
        prepared[rid] = p
        status.send("prepared", id=rid, digest=p.digest, bundle_id=p.pipeline.identity.bundle_id)

    async def ask_supervisor(bundle: str, expected: str) -> admin_pb.ReloadResponse:
        """Admin.Reload on this worker: the supervisor reloads every worker and answers."""
        k = len(asks) + 1
        fut = loop.create_future()
        asks[k] = fut
        status.send("reload_request", id=k, bundle=bundle, expected=expected)
        try:
            res = await asyncio.wait_for(fut, cfg.worker_start_timeout_s * 2)
        except TimeoutError:
            return admin_pb.ReloadResponse(ok=False, message="the supervisor did not answer the reload in time")
        finally:
            asks.pop(k, None)
        return admin_pb.ReloadResponse(ok=bool(res.get("ok")), bundle_id=str(res.get("bundle_id", "")),
                                       bundle_digest=str(res.get("digest", "")), message=str(res.get("message", "")),
                                       workers=int(res.get("workers", 0)))

    server.reload_fn = ask_supervisor
    loop.add_signal_handler(signal.SIGHUP, lambda: log.warning(
        "worker %d: SIGHUP ignored: send it to the supervisor (pid %d), which reloads every worker", index,
        os.getppid()))

    async def watch_supervisor() -> None:
        while line := await ctl.readline():
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            cmd = msg.get("cmd")
            if cmd == "prepare":
                t = asyncio.ensure_future(do_prepare(msg))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
            elif cmd == "commit":
                p = prepared.pop(int(msg["id"]), None)
                if p is not None:
                    server.reloader.commit(p)
                    status.send("committed", id=int(msg["id"]), digest=p.digest)
            elif cmd == "abort":
                if prepared.pop(int(msg["id"]), None) is not None:
                    log.info("worker %d: reload %s aborted by the supervisor: %s", index, msg["id"], msg.get("why", ""))
            elif cmd == "reload_result":
                f = asks.get(int(msg["id"]))
                if f is not None and not f.done():
                    f.set_result(msg)
        log.warning("worker %d: the supervisor is gone (stdin closed): draining", index)
        stop.set()

    watch = asyncio.ensure_future(watch_supervisor())
    await stop.wait()
    watch.cancel()
    ok = await server.stop()
    status.send("drained", ok=ok)
    return 0 if ok else EXIT_UNDRAINED


if __name__ == "__main__":
    code = main(sys.argv[1:])
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)   # no interpreter teardown: the drain is done, and a stray non-daemon thread must not hang exit
