"""The Ray Serve peer: the same pipeline behind Ray Serve's gRPC proxy with `@serve.batch`.

    python -m uwrt.bench.ray_peer --bundle bundles/demo [--port 0] [--max-batch-size 32]
        [--batch-wait-timeout-s 0.001] [--max-ongoing-requests 256]

This is what a team would build instead of uwrt with an existing serving framework (Ray Serve,
`pip install -r requirements/bench.txt`). It serves the same Underwriting proto, so the same
load generator drives it: Ray's gRPC proxy (`serve.start(grpc_options=gRPCOptions(port=...,
grpc_servicer_functions=["uwrt.bench.ray_peer.add_servicer"]))`, which adds the generated
`add_UnderwritingServicer_to_server` after registering protobuf pickling, see
`register_pickling`) routes `/uwrt.v1.Underwriting/Decide` to the deployment's `Decide` method. With one application
no routing metadata is needed.

Settings, chosen to match `uwrt serve`'s defaults so the comparison is fair (2 cores):
  * one replica (`num_replicas=1`, `num_cpus=1`), torch intra-op threads 1, xgboost threads 1,
    TorchScript encoder: the same single model worker as uwrt (whose event loop owns the rest);
    Ray's proxy and controller are separate processes sharing the same 2 cores.
  * `@serve.batch(max_batch_size=32, batch_wait_timeout_s=0.001)`: uwrt's max_batch_size 32 and
    max_wait_us 1000 (Ray's defaults are 10 and 0.01 s, which would lose on latency by design).
  * `max_ongoing_requests=256` (Ray's default, 5, would cap batches at 5): uwrt's max_queue 256.
  * The batch runs `Pipeline.decide` on a 1-thread executor, as uwrt does, so the replica's
    event loop keeps accepting while a batch computes.
What Ray lacks by design (documented, not emulated): deadline-aware dispatch, admission by
predicted wait, per-length-bucket batches. An invalid request comes back INVALID_ARGUMENT; Ray
reports its own proxy errors (e.g. UNAVAILABLE while starting, DEADLINE_EXCEEDED past the
request timeout).

GetModelInfo returns the model identity and `stats.requests` / `stats.batches` of the replica, so
the load generator reports Ray's mean batch size too. DecideStream is not served (Ray's gRPC
proxy supports unary and server-streaming calls, not bidirectional streams).

Prints `ray serving on HOST:PORT` once a Decide has succeeded through the proxy; SIGTERM/SIGINT
shut Serve and Ray down and exit 0.

Thread safety: Ray runs the deployment in its own actor process; `decide_batch` calls are
serialized by `@serve.batch` and the pipeline only runs on the replica's single worker thread.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVICER_FN = "uwrt.bench.ray_peer.add_servicer"
MESSAGES = ("DecisionRequest", "DecisionResponse", "GetModelInfoRequest", "ModelInfo")


def _decode(name: str, data: bytes):
    from uwrt.runtime.pb import pb
    return getattr(pb, name).FromString(data)


def _reduce(msg):
    return _decode, (type(msg).__name__, msg.SerializeToString())


def register_pickling() -> None:
    """Ray pickles requests and responses between its proxy and the replica. Generated protobuf
    classes name their module after the .proto path (`uwrt.v1.underwriting_pb2`), which is not
    importable, so pickle them as (message name, serialized bytes) instead."""
    import copyreg

    from uwrt.runtime.pb import pb
    for name in MESSAGES:
        copyreg.pickle(getattr(pb, name), _reduce)


def add_servicer(servicer, server) -> None:
    """The servicer function Ray's gRPC proxy loads: our proto's, after registering pickling."""
    from uwrt.runtime.pb import pb_grpc
    register_pickling()
    pb_grpc.add_UnderwritingServicer_to_server(servicer, server)

#: the settings recorded next to every result (and in bench/RESULTS.md)
DEFAULTS = dict(max_batch_size=32, batch_wait_timeout_s=0.001, max_ongoing_requests=256, num_replicas=1,
                replica_num_cpus=1, torch_threads=1, tree_threads=1, encoder_backend="torchscript")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_app(bundle: str, settings: dict):
    """The Ray Serve application (imports ray lazily: it is an optional bench extra)."""
    from ray import serve

    @serve.deployment(num_replicas=settings["num_replicas"], max_ongoing_requests=settings["max_ongoing_requests"],
                      ray_actor_options={"num_cpus": settings["replica_num_cpus"]})
    class UnderwritingPeer:
        def __init__(self, bundle_dir: str, cfg: dict) -> None:
            import concurrent.futures

            import torch

            from uwrt.bench.ray_peer import register_pickling
            from uwrt.runtime.pipeline import Pipeline
            register_pickling()
            torch.set_num_threads(cfg["torch_threads"])
            self.pipe = Pipeline.from_dir(bundle_dir, tree_threads=cfg["tree_threads"],
                                          encoder_backend=cfg["encoder_backend"])
            self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="peer-model")
            self.requests = self.batches = 0
            self.decide_batch.set_max_batch_size(cfg["max_batch_size"])
            self.decide_batch.set_batch_wait_timeout_s(cfg["batch_wait_timeout_s"])
            from uwrt.demo.synth import generate
            for r in generate(20, 12345, id_prefix="warm-").requests:   # warm up as the other servers do
                self.pipe.decide([r])

        @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.001)
        async def decide_batch(self, reqs: list) -> list:
            import asyncio
            self.requests += len(reqs)
            self.batches += 1
            return await asyncio.get_running_loop().run_in_executor(self.executor, self.pipe.decide, reqs)

        async def Decide(self, request, context=None):
            import time as _t

            import grpc

            from uwrt.runtime.errors import InvalidRequest
            from uwrt.runtime.pb import pb
            t0 = _t.perf_counter_ns()
            res = await self.decide_batch(request)
            if isinstance(res, InvalidRequest):
                if context is not None:
                    context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
                    context.set_details(str(res))
                return pb.DecisionResponse(request_id=request.request_id)
            # Ray has no per-request queue time: report total - compute as the queue share
            res.timing.total_us = (_t.perf_counter_ns() - t0) // 1000
            res.timing.queue_us = max(0, res.timing.total_us - (res.timing.featurize_us + res.timing.encode_us
                                                                  + res.timing.trees_us + res.timing.policy_us))
            return res

        async def GetModelInfo(self, request, context=None):
            from uwrt.runtime.pb import pb
            info = pb.ModelInfo(max_history=self.pipe.encoder_config.max_history, profile="ray-serve-peer",
                                encoder_backend=self.pipe.encoder.name, tree_backend=self.pipe.trees.name)
            info.model.CopyFrom(self.pipe.identity)
            info.settings["server"] = "uwrt.bench.ray_peer (Ray Serve @serve.batch)"
            info.settings["stats.requests"] = str(self.requests)
            info.settings["stats.batches"] = str(self.batches)
            return info

    return UnderwritingPeer.bind(os.path.abspath(bundle), settings)


def _probe(target: str, timeout_s: float) -> None:
    """Block until a real Decide succeeds through the proxy (Ray's proxy answers before the
    replica is ready)."""
    import grpc

    from uwrt.demo.synth import generate
    from uwrt.runtime.pb import pb_grpc
    req = generate(1, 3, id_prefix="probe-").requests[0]
    end = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < end:
        try:
            with grpc.insecure_channel(target) as ch:
                pb_grpc.UnderwritingStub(ch).Decide(req, timeout=5)
            return
        except grpc.RpcError as e:
            last = e
            time.sleep(0.5)
    raise RuntimeError(f"the Ray Serve peer did not answer a Decide within {timeout_s:g}s: {last}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m uwrt.bench.ray_peer", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default="bundles/demo")
    ap.add_argument("--port", type=int, default=0, help="gRPC proxy port (0: a free one)")
    for k, v in DEFAULTS.items():
        ap.add_argument("--" + k.replace("_", "-"), type=type(v), default=v)
    ap.add_argument("--start-timeout-s", type=float, default=300.0)
    args = ap.parse_args(argv)
    try:
        import ray
        from ray import serve
        from ray.serve.config import HTTPOptions, gRPCOptions
    except ImportError as e:
        print(f"error: Ray Serve is not installed ({e}); pip install -r requirements/bench.txt", file=sys.stderr)
        return 2
    settings = {k: getattr(args, k) for k in DEFAULTS}
    port = args.port or _free_port()
    # Ray's worker processes (proxy, replica) must import runtime.* like this process does.
    os.environ["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                                                         if p])
    # every Ray process on loopback: nothing listens on or talks to another address
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             _node_ip_address="127.0.0.1")
    serve.start(http_options=HTTPOptions(host="127.0.0.1", port=_free_port()),
                grpc_options=gRPCOptions(port=port, grpc_servicer_functions=[SERVICER_FN]))
    serve.run(build_app(args.bundle, settings), name="uwrt_peer", blocking=False)
    target = f"127.0.0.1:{port}"
    _probe(target, args.start_timeout_s)
    print(f"ray settings: {settings}", flush=True)
    print(f"ray serving on {target}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5):
        pass
    serve.shutdown()
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
