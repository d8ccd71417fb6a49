"""The transport floor: the Underwriting service with no model, for measuring what gRPC, Python
and the machine cost before any model work.

    python -m uwrt.bench.echo_server [--host 127.0.0.1] [--port 0]

A grpc.aio server like `uwrt serve`'s (same message-size options, grpc.health.v1, no batcher, no
model, no worker thread): `Decide` receives the request parsed by the generated handler (as the
real server does), copies a fixed, realistic DecisionResponse (a DECLINE with four reasons, two
warnings, the model identity: ~480 bytes, the size of a real adverse response), sets the
request id and `timing.total_us` (the handler's own microseconds; the other stages are 0) and
returns it. `DecideStream` answers every request in order, the same way. `GetModelInfo` reports
`settings["server"] = "uwrt.bench.echo_server (no model)"` and `stats.requests` /
`stats.batches` (equal: no batching). Health is SERVING as soon as the port is bound.

`uwrt bench --floor` and `bench/compare --servers ...,echo,health` run the same sweep against it
(Decide, and the health RPC) so every result shows the model path next to the floor at the same
rate. Prints `echo serving on HOST:PORT` once listening; SIGTERM/SIGINT stop it (1 s grace) and
exit 0.

Subclass `EchoService` and override `respond` to make a server that fails or stalls on purpose
(the load generator's tests do).

Thread safety: everything runs on the server's event loop.
"""
from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from uwrt.runtime.pb import pb, pb_grpc

MAX_MESSAGE_BYTES = 4 * 1024 * 1024

__all__ = ["EchoService", "template_response", "start_server", "main"]


def template_response() -> pb.DecisionResponse:
    """A DECLINE as the demo model writes one (four reasons, two imputed features)."""
    r = pb.DecisionResponse(outcome=pb.DECLINE, probability_of_default=0.4607, score=611.37, path=pb.MODEL)
    for code, text, c in (("DELINQUENCY", "Recent late or missed payments", 1.1046),
                          ("REPAYMENT_HISTORY", "Pattern of recent repayment activity on your account", 0.4074),
                          ("BUREAU_SCORE", "Credit bureau score is too low", 0.1469),
                          ("INCOME", "Income is insufficient for the amount of credit requested", 0.1248)):
        r.reasons.add(code=code, text=text, contribution=c)
    r.model.CopyFrom(pb.ModelIdentity(
        bundle_id="uwrt-demo-echo", bundle_digest="f903d3d0efa904ced99d5129ed26529e2d0dd66c7ca85eed5d693d5242808e6b",
        encoder_version="enc-1", tree_version="demo-xgb-30x4", feature_schema_version="demo-features-1",
        policy_version="demo-policy-1"))
    r.warnings.add(code=pb.FEATURE_IMPUTED, detail="utilization")
    r.warnings.add(code=pb.FEATURE_IMPUTED, detail="inquiries_6m")
    return r


class EchoService(pb_grpc.UnderwritingServicer):
    """Answers every Decide with a copy of `template_response()` (see module docstring)."""

    def __init__(self) -> None:
        self.template = template_response()
        self.requests = 0

    def build(self, request: pb.DecisionRequest, t0_ns: int) -> pb.DecisionResponse:
        resp = pb.DecisionResponse()
        resp.CopyFrom(self.template)
        resp.request_id = request.request_id
        resp.timing.total_us = (time.perf_counter_ns() - t0_ns) // 1000
        return resp

    async def respond(self, request: pb.DecisionRequest, context: grpc.aio.ServicerContext) -> pb.DecisionResponse:
        """The Decide handler's work; a subclass may abort or stall here."""
        return self.build(request, time.perf_counter_ns())

    async def Decide(self, request, context):
        self.requests += 1
        return await self.respond(request, context)

    async def DecideStream(self, request_iterator, context):
        async for req in request_iterator:
            self.requests += 1
            yield self.build(req, time.perf_counter_ns())

    async def GetModelInfo(self, request, context):
        info = pb.ModelInfo(profile="echo", encoder_backend="none", tree_backend="none")
        info.model.CopyFrom(self.template.model)
        info.settings["server"] = "uwrt.bench.echo_server (no model)"
        info.settings["stats.requests"] = str(self.requests)
        info.settings["stats.batches"] = str(self.requests)
        return info


async def start_server(service: EchoService | None = None, host: str = "127.0.0.1",
                       port: int = 0) -> tuple[grpc.aio.Server, int, EchoService]:
    """A started server (health SERVING) and its bound port."""
    service = service or EchoService()
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                                      ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])
    pb_grpc.add_UnderwritingServicer_to_server(service, server)
    hs = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(hs, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise RuntimeError(f"cannot bind {host}:{port}")
    await server.start()
    for svc in ("", "uwrt.v1.Underwriting"):
        await hs.set(svc, health_pb2.HealthCheckResponse.SERVING)
    return server, bound, service


async def _serve(host: str, port: int) -> int:
    server, bound, _ = await start_server(host=host, port=port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"echo serving on {host}:{bound}", flush=True)
    await stop.wait()
    await server.stop(1.0)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m uwrt.bench.echo_server", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0 = pick a free port (printed)")
    ap.add_argument("--bundle", default=None, help=argparse.SUPPRESS)   # accepted (and ignored) like the others
    args = ap.parse_args(argv)
    return asyncio.run(_serve(args.host, args.port))


if __name__ == "__main__":
    sys.exit(main())
