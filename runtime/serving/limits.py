"""Transport and RPC limits of the gRPC server, from `RuntimeConfig` (knobs: `max_request_bytes`
and the `[transport]` section; README: Security).

* **Message size.** gRPC refuses a request larger than `max_request_bytes` + `HEADROOM_BYTES`
  itself, with RESOURCE_EXHAUSTED ("Received message larger than max"), before the message is
  handed to Python or parsed (gRPC's standard code for an oversize message: it cannot be mapped,
  no handler runs; clients must not retry it like load shedding: see README). A request between
  `max_request_bytes` and that cap reaches the handler, whose own check (before parsing, on the
  raw bytes: runtime/serving/wire.py) answers INVALID_ARGUMENT naming the field `request`.
* **Concurrency.** `max_concurrent_rpcs` (grpc.aio's limiter: RESOURCE_EXHAUSTED "Concurrent RPC
  limit exceeded!" before the request is read), `max_concurrent_streams` per connection,
  `max_connections` per process.
* **Pending calls.** gRPC core queues calls that arrived before the server's loop asked for them,
  and above `grpc.server.max_pending_requests` (default 1000) it starts dropping them at random,
  which clients see as CANCELLED: a burst of 2,000 unary calls came back ~8% CANCELLED. The
  queue's soft and hard limits are raised above what the RPC limit admits, so a burst is pulled
  by the loop and shed by the RPC limit or the batcher, consistently RESOURCE_EXHAUSTED.
* **Connections.** Idle and maximum age (GOAWAY, with a grace period), keepalive pings to find
  dead clients, and keepalive enforcement against ping floods.

Thread safety: pure functions.
"""
from __future__ import annotations

from typing import Any

from uwrt.runtime.config import RuntimeConfig

__all__ = ["HEADROOM_BYTES", "MAX_SEND_BYTES", "pending_limits", "receive_limit", "server_kwargs", "server_options"]

#: Transport cap above max_request_bytes: requests up to here get our own INVALID_ARGUMENT
#: naming the field; above it gRPC refuses them before they reach Python.
HEADROOM_BYTES = 64 << 10
#: Largest response the server sends (GetModelInfo is the largest, a few KB).
MAX_SEND_BYTES = 16 << 20


def receive_limit(cfg: RuntimeConfig) -> int:
    """Largest message gRPC hands to a handler (bytes)."""
    return cfg.max_request_bytes + HEADROOM_BYTES


def pending_limits(cfg: RuntimeConfig) -> tuple[int, int]:
    """(soft, hard) limits of gRPC core's queue of calls not yet taken by the server loop."""
    t = cfg.transport
    soft = max(4096, 4 * t.max_concurrent_rpcs) if t.max_concurrent_rpcs else 1 << 16
    return soft, 2 * soft


def _ms(seconds: float) -> int:
    return int(round(seconds * 1000))


def server_options(cfg: RuntimeConfig, *, reuse_port: bool) -> list[tuple[str, Any]]:
    """grpc.aio.server channel arguments for `cfg` (see the module docstring)."""
    t = cfg.transport
    soft, hard = pending_limits(cfg)
    opts: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", receive_limit(cfg)),
        ("grpc.max_send_message_length", MAX_SEND_BYTES),
        ("grpc.so_reuseport", 1 if reuse_port else 0),
        ("grpc.server.max_pending_requests", soft),
        ("grpc.server.max_pending_requests_hard_limit", hard),
        ("grpc.keepalive_timeout_ms", _ms(t.keepalive_timeout_s)),
        ("grpc.http2.min_ping_interval_without_data_ms", _ms(t.keepalive_min_client_interval_s)),
        ("grpc.keepalive_permit_without_calls", 1 if t.keepalive_permit_without_calls else 0),
        ("grpc.http2.max_ping_strikes", 2),
    ]
    if t.max_concurrent_streams:
        opts.append(("grpc.max_concurrent_streams", t.max_concurrent_streams))
    if t.max_connections:
        opts.append(("grpc.max_allowed_incoming_connections", t.max_connections))
    if t.max_connection_idle_s:
        opts.append(("grpc.max_connection_idle_ms", _ms(t.max_connection_idle_s)))
    if t.max_connection_age_s:
        opts.append(("grpc.max_connection_age_ms", _ms(t.max_connection_age_s)))
        opts.append(("grpc.max_connection_age_grace_ms", _ms(t.max_connection_age_grace_s)))
    if t.keepalive_time_s:
        opts.append(("grpc.keepalive_time_ms", _ms(t.keepalive_time_s)))
    return opts


def server_kwargs(cfg: RuntimeConfig, *, reuse_port: bool) -> dict[str, Any]:
    """Keyword arguments for grpc.aio.server (options and the concurrent-RPC limit)."""
    t = cfg.transport
    return {"options": server_options(cfg, reuse_port=reuse_port),
            "maximum_concurrent_rpcs": t.max_concurrent_rpcs or None}
