"""The Admin service (proto/uwrt/v1/admin.proto): `Reload`. Registered on the server's port only
when `admin_enabled` is true (off by default).

AUTH HOOK: once the TLS/authentication interceptor (server hardening work) is in, every Admin
method must require the `admin` role: map `/uwrt.v1.Admin/*` to that role in its table. Until
then, enable this service only where the port is reachable by operators alone.

Thread safety: the event loop only.
"""
from __future__ import annotations

from collections.abc import Awaitable, Callable

import grpc

from uwrt.runtime.pb import admin_grpc, admin_pb

__all__ = ["AdminService", "ADMIN_SERVICE_NAME"]

ADMIN_SERVICE_NAME = admin_pb.DESCRIPTOR.services_by_name["Admin"].full_name


class AdminService(admin_grpc.AdminServicer):
    def __init__(self, reload_fn: Callable[[str, str], Awaitable[admin_pb.ReloadResponse]]) -> None:
        self.reload_fn = reload_fn

    async def Reload(self, request: admin_pb.ReloadRequest, context: grpc.aio.ServicerContext
                     ) -> admin_pb.ReloadResponse:
        return await self.reload_fn(request.bundle, request.expected_digest)
