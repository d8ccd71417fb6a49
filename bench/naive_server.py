"""The naive baseline server: the same model behind gRPC with no batching, the floor to beat.

    python -m uwrt.bench.naive_server --bundle bundles/demo [--port 0] [--workers 4] [--torch-threads 1]

A synchronous grpcio server (thread pool of `--workers` handler threads) serving the same
Underwriting service: each Decide runs `Pipeline.decide([request])` on its own, so one request
is one featurize, one encoder forward, one xgboost predict and one policy call; there is no
queue policy, no deadline awareness beyond gRPC's own, no load shedding. The pipeline is not
re-entrant, so a lock lets one request compute at a time; the time spent waiting for that
lock is reported as `timing.queue_us` (the handler threads are the only queue). DecideStream
answers each request in order, in-band errors like the real server. GetModelInfo reports the
model identity and `stats.requests` / `stats.batches` (always equal: batch size 1), so the
load generator's mean batch size works against it. grpc.health.v1 is SERVING after a warm-up.

Prints `naive serving on HOST:PORT` once ready (port 0 picks a free port); SIGTERM/SIGINT stop
it (in-flight requests get `--grace-s`) and exit 0.

Thread safety: handlers run on grpc's thread pool; the pipeline is only entered under `lock`.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import logging
import signal
import sys
import threading
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from uwrt.runtime.errors import InvalidRequest
from uwrt.runtime.pb import pb, pb_grpc
from uwrt.runtime.pipeline import Pipeline, StageTimes

log = logging.getLogger("uwrt.bench.naive")


class NaiveService(pb_grpc.UnderwritingServicer):
    """One request -> one pipeline call (batch of 1), under a lock."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.lock = threading.Lock()
        self.requests = 0

    def decide_one(self, req: pb.DecisionRequest) -> pb.DecisionResponse:
        """Raises InvalidRequest for a bad request; returns the response with queue/total timing."""
        t0 = time.perf_counter_ns()
        with self.lock:
            t1 = time.perf_counter_ns()
            self.requests += 1
            res = self.pipeline.decide([req], StageTimes())[0]
        if isinstance(res, InvalidRequest):
            raise res
        res.timing.queue_us = (t1 - t0) // 1000
        res.timing.total_us = (time.perf_counter_ns() - t0) // 1000
        return res

    def Decide(self, request, context):
        try:
            return self.decide_one(request)
        except InvalidRequest as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))

    def DecideStream(self, request_iterator, context):
        for req in request_iterator:
            try:
                yield self.decide_one(req)
            except InvalidRequest as e:
                resp = pb.DecisionResponse(request_id=req.request_id)
                resp.error.code, resp.error.message, resp.error.field = "INVALID_ARGUMENT", str(e), e.field
                yield resp

    def GetModelInfo(self, request, context):
        info = pb.ModelInfo(max_history=self.pipeline.encoder_config.max_history, profile="cpu-naive",
                            encoder_backend=self.pipeline.encoder.name, tree_backend=self.pipeline.trees.name)
        info.model.CopyFrom(self.pipeline.identity)
        info.settings["server"] = "uwrt.bench.naive_server (no batching)"
        info.settings["stats.requests"] = str(self.requests)
        info.settings["stats.batches"] = str(self.requests)
        return info


def warm_up(pipeline: Pipeline, n: int = 20) -> None:
    from uwrt.demo.synth import generate
    for r in generate(n, 12345, id_prefix="warm-").requests:
        pipeline.decide([r])


def build_server(pipeline: Pipeline, host: str = "127.0.0.1", port: int = 0, workers: int = 4
                 ) -> tuple[grpc.Server, int, NaiveService, health.HealthServicer]:
    """A started server (health NOT_SERVING until the caller sets it) and its bound port."""
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="naive"))
    svc = NaiveService(pipeline)
    pb_grpc.add_UnderwritingServicer_to_server(svc, server)
    hs = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(hs, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise RuntimeError(f"cannot bind {host}:{port}")
    for s in ("", "uwrt.v1.Underwriting"):
        hs.set(s, health_pb2.HealthCheckResponse.NOT_SERVING)
    server.start()
    return server, bound, svc, hs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m uwrt.bench.naive_server", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default="bundles/demo")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--workers", type=int, default=4, help="gRPC handler threads (default 4)")
    ap.add_argument("--torch-threads", type=int, default=1, help="torch intra-op threads (default 1, as uwrt serve)")
    ap.add_argument("--tree-threads", type=int, default=1)
    ap.add_argument("--encoder-backend", default="torchscript", help="as uwrt serve (default torchscript)")
    ap.add_argument("--grace-s", type=float, default=5.0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch
    torch.set_num_threads(args.torch_threads)
    pipe = Pipeline.from_dir(args.bundle, tree_threads=args.tree_threads, encoder_backend=args.encoder_backend)
    server, port, _, hs = build_server(pipe, args.host, args.port, args.workers)
    warm_up(pipe)
    for s in ("", "uwrt.v1.Underwriting"):
        hs.set(s, health_pb2.HealthCheckResponse.SERVING)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(f"naive serving on {args.host}:{port}", flush=True)
    while not stop.wait(0.5):
        pass
    hs.enter_graceful_shutdown()
    server.stop(args.grace_s).wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
