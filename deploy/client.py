"""The client side of scaling out: how a decision engine's gRPC channel should talk to uwrt replicas.

`deploy/client/service_config.json` is the gRPC service config (gRFC A6/A17, standard in every gRPC
language; README "Scaling out" shows it in full):

* `round_robin` over every address the target resolves to -- `ipv4:10.0.0.5:50051,10.0.0.6:50051`
  or `dns:///uwrt-headless.NAMESPACE.svc.cluster.local:50051` (a headless Service) -- so each
  request goes to the next replica, without a proxy;
* `healthCheckConfig`: the channel watches grpc.health.v1 `Watch("uwrt.v1.Underwriting")` on each
  replica and only sends to those that say SERVING (warm-up, drain);
* a retry policy for `Decide` (and `GetModelInfo`): UNAVAILABLE only, 3 attempts, exponential
  backoff from 20 ms, all inside the caller's deadline, with retry throttling (retries stop when
  more than ~10% of calls fail, i.e. the whole service is down, not one replica).

Which failures a retry is safe for is in README ("What is safe to retry"): UNAVAILABLE means the
replica never answered, so the request may or may not have been decided there; a retry decides it
again, on another replica, with the same result (decisions are deterministic for a bundle and
request; tested), but twice, and nothing records either decision until idempotency by request id
exists.

Through a balancer (HAProxy, a mesh), use `proxy_service_config()`: the retry policy only. The
balancer already balances and health-checks the replicas; client-side health checking through it
would watch one replica's health over one long-lived stream and take the whole balancer out of the
channel when that replica drains (or when the balancer times the idle stream out).

`channel(target)` builds such a channel (grpc.aio by default); it is what the tests use.
"""
from __future__ import annotations

import json
import pathlib
from typing import Any

__all__ = ["SERVICE_CONFIG_PATH", "service_config", "proxy_service_config", "channel_options", "channel"]

SERVICE_CONFIG_PATH = pathlib.Path(__file__).resolve().parent / "client" / "service_config.json"


def service_config(*, retries: bool = True, round_robin: bool = True, health_check: bool = True) -> dict[str, Any]:
    """The recommended service config, optionally without one of its parts (for comparisons)."""
    cfg = json.loads(SERVICE_CONFIG_PATH.read_text())
    if not retries:
        cfg.pop("retryThrottling", None)
        for m in cfg.get("methodConfig", []):
            m.pop("retryPolicy", None)
    if not round_robin:
        cfg.pop("loadBalancingConfig", None)
    if not health_check:
        cfg.pop("healthCheckConfig", None)
    return cfg


def proxy_service_config() -> dict[str, Any]:
    """The config for a channel to a balancer: the retry policy, no client-side balancing or health."""
    return service_config(round_robin=False, health_check=False)


def channel_options(cfg: dict[str, Any] | None = None) -> list[tuple[str, Any]]:
    """grpcio channel arguments carrying `cfg` (default: the recommended config)."""
    return [("grpc.service_config", json.dumps(service_config() if cfg is None else cfg)),
            ("grpc.enable_retries", 1)]


def channel(target: str, cfg: dict[str, Any] | None = None, *, aio: bool = True):
    """An insecure channel to `target` with the service config (grpc.aio unless aio=False)."""
    import grpc
    make = grpc.aio.insecure_channel if aio else grpc.insecure_channel
    return make(target, options=channel_options(cfg))
