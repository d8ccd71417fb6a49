"""OpenTelemetry traces of sampled decisions: one span per request, a child span per stage.

    model thread, per batch: sample each request with probability trace_sample_ratio (numpy, one
        call per batch); remember the sampled responses with the batch's id, size and stage times
    event loop, per sampled response at the RPC's end: build the spans with explicit timestamps
        uwrt.Decide | uwrt.DecideStream   [handler start .. response]   request id, outcome, batch
          queue                           [dispatch - queue wait .. dispatch]
          featurize, encode, trees, policy [the batch's stages, back to back]
          reasons                         [the end of policy: TreeSHAP, when computed]
        --> BatchSpanProcessor (its own thread) --> OTLP/gRPC or the console

Spans are built after the fact from times the server measures anyway, so an unsampled request
costs nothing here and tracing off (`trace_sample_ratio = 0`, the default) creates no tracer at
all: the request path then checks one attribute. The stage spans are the batch's (every request of
a batch shares them); the batch id and size are attributes.

Incoming trace context: a call whose metadata carries a valid W3C `traceparent` (and optionally
`tracestate`) joins the client's trace: the server span is a child of the client's span, and the
client's sampled flag decides (OpenTelemetry's parent-based sampling: flag 01 traces the request
whatever the ratio, 00 does not); a call without one (or with a malformed one, ignored) is sampled
by the ratio and starts its own trace. On DecideStream the stream's metadata applies to every
message: each gets its own server span under the same client span. The metadata is read only
when tracing is on.

Thread safety: `on_batch` runs on the model thread, `finish` on the event loop; the pending map
is a dict of single atomic operations (set / pop) bounded by MAX_PENDING.
"""
from __future__ import annotations

import itertools
import logging
import os
import socket
import sys
import time
from typing import Any

import numpy as np

from uwrt.runtime.pb import pb

__all__ = ["Tracing", "TracingUnavailable", "build_exporter", "Parent"]

log = logging.getLogger("uwrt.tracing")

MAX_PENDING = 10_000
_OUTCOME = {v: k for k, v in pb.Outcome.items()}


class TracingUnavailable(RuntimeError):
    """The configured exporter cannot be built (its package is not installed)."""


def build_exporter(kind: str) -> Any:
    """The span exporter for `trace_exporter`: "otlp" (OTLP/gRPC; endpoint and headers from the
    standard OTEL_EXPORTER_OTLP_* variables), "console" (JSON lines on stderr) or "none" (spans
    are built and processed, then dropped: what tracing costs the server, without an exporter's)."""
    if kind == "none":
        from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

        class _Drop(SpanExporter):
            def export(self, spans: Any) -> Any:
                return SpanExportResult.SUCCESS
        return _Drop()
    if kind == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter
        return ConsoleSpanExporter(out=sys.stderr)
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # type: ignore[import-not-found]
            OTLPSpanExporter,
        )
    except ImportError as e:
        raise TracingUnavailable(f"trace_exporter = otlp needs the OTLP exporter: pip install -r requirements/otlp.txt "
                                 f"({e}); or set trace_exporter = console, or trace_sample_ratio = 0") from None
    return OTLPSpanExporter()


class Parent:
    """A client's trace context from a call's metadata: the OpenTelemetry Context to start the
    server span in, and whether the client sampled its trace."""
    __slots__ = ("context", "sampled")

    def __init__(self, context: Any, sampled: bool) -> None:
        self.context, self.sampled = context, sampled


class Tracing:
    """Sampling and span building for one server process. `exporter`: a SpanExporter (tests pass
    an InMemorySpanExporter; `simple` exports synchronously instead of from a batch thread)."""

    def __init__(self, ratio: float, exporter: Any, *, worker: int = 0, simple: bool = False,
                 seed: int | None = None) -> None:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

        from uwrt.runtime import __version__
        self.ratio = ratio
        self._trace = trace
        resource = Resource.create({"service.name": "uwrt", "service.version": __version__,
                                    "service.instance.id": f"{socket.gethostname()}:{os.getpid()}",
                                    "uwrt.worker": worker})
        self.provider = TracerProvider(resource=resource)      # sampling is ours (below): ALWAYS_ON here
        self.processor = SimpleSpanProcessor(exporter) if simple else BatchSpanProcessor(exporter)
        self.provider.add_span_processor(self.processor)
        self.tracer = self.provider.get_tracer("uwrt.server")
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
        self._propagator = TraceContextTextMapPropagator()
        self._rng = np.random.default_rng(seed)
        self._batch_ids = itertools.count(1)
        self._pending: dict[int, tuple] = {}
        # perf_counter_ns -> Unix ns (OpenTelemetry timestamps)
        self._epoch_offset_ns = time.time_ns() - time.perf_counter_ns()
        self.sampled = 0

    def on_batch(self, responses: list[pb.DecisionResponse], times: Any) -> None:
        """Model thread, once per batch: draw which requests the ratio samples and remember every
        response with its batch (a client's sampled `traceparent` can still pick one at finish)."""
        n = len(responses)
        draws = self._rng.random(n) < self.ratio if self.ratio < 1.0 else None
        end_ns = time.perf_counter_ns()
        batch = (next(self._batch_ids), n, end_ns, times.featurize_us, times.encode_us, times.trees_us,
                 times.policy_us, times.reasons_us)
        if len(self._pending) > MAX_PENDING:       # responses never finished (clients gone): drop them
            self._pending.clear()
        pending = self._pending
        for j, r in enumerate(responses):
            pending[id(r)] = (r, batch, True if draws is None else bool(draws[j]))

    def parent_of(self, metadata: Any) -> Parent | None:
        """The client's trace context from a call's invocation metadata (None when it sends no
        valid `traceparent`)."""
        carrier = {k: v for k, v in (metadata or ()) if k in ("traceparent", "tracestate") and isinstance(v, str)}
        if "traceparent" not in carrier:
            return None
        ctx = self._propagator.extract(carrier)
        sc = self._trace.get_current_span(ctx).get_span_context()
        if not sc.is_valid:
            return None
        return Parent(ctx, bool(sc.trace_flags.sampled))

    def finish(self, method: str, resp: pb.DecisionResponse, t0_ns: int, end_ns: int,
               parent: Parent | None = None) -> None:
        """Event loop, at the RPC's end: the spans of a sampled response (nothing otherwise);
        `parent`: the client's trace context, which then decides the sampling."""
        item = self._pending.pop(id(resp), None)
        if item is None or item[0] is not resp:
            return
        if not (parent.sampled if parent is not None else item[2]):
            return
        batch_id, size, b_end, f_us, e_us, t_us, p_us, r_us = item[1]
        off = self._epoch_offset_ns
        b0 = b_end - 1000 * (f_us + e_us + t_us + p_us)
        q = 1000 * resp.timing.queue_us
        root = self.tracer.start_span(f"uwrt.{method}", context=None if parent is None else parent.context,
                                      start_time=t0_ns + off, attributes={
            "rpc.system": "grpc", "rpc.service": "uwrt.v1.Underwriting", "rpc.method": method,
            "uwrt.request_id": resp.request_id, "uwrt.outcome": _OUTCOME.get(resp.outcome, "?"),
            "uwrt.batch.id": batch_id, "uwrt.batch.size": size, "uwrt.bundle_digest": resp.model.bundle_digest[:12]})
        ctx = self._trace.set_span_in_context(root)
        spans = [("queue", max(t0_ns, b0 - q), b0)]
        t = b0
        for name, us in (("featurize", f_us), ("encode", e_us), ("trees", t_us), ("policy", p_us)):
            spans.append((name, t, t + 1000 * us))
            t += 1000 * us
        if r_us:
            spans.append(("reasons", t - 1000 * r_us, t))
        for name, s, e in spans:
            self.tracer.start_span(name, context=ctx, start_time=s + off).end(end_time=e + off)
        root.end(end_time=end_ns + off)
        self.sampled += 1

    def shutdown(self) -> None:
        try:
            self.provider.shutdown()       # flushes what the batch processor still holds
        except Exception:  # noqa: BLE001 - at exit, never fail the drain over spans
            log.exception("tracing shutdown failed")
