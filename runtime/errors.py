"""Every error the runtime raises on purpose, each with the gRPC status code it maps to.

The server (and the CLI) turn these into status codes / exit codes in one place; anything
else escaping the pipeline is a bug and is reported as INTERNAL.
"""
from __future__ import annotations

import grpc


class UwrtError(Exception):
    """Base class. `code` is the gRPC status a client sees."""
    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidRequest(UwrtError):
    """A request is malformed or out of range. `field` is its path, e.g. `history.type[3]`."""
    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class BundleError(UwrtError):
    """A model bundle is missing, incomplete, tampered with or incompatible."""
    code = grpc.StatusCode.FAILED_PRECONDITION


class BackendError(UwrtError):
    """A compute backend (encoder or tree stage) failed or cannot run here."""
    code = grpc.StatusCode.UNAVAILABLE
