"""Every error the runtime raises on purpose, each with the gRPC status code it maps to.

The server (and the CLI) turn these into status codes / exit codes in one place; anything
else escaping the pipeline is a bug and is reported as INTERNAL.
"""
from __future__ import annotations

import grpc

#: Longest client-supplied value (characters) an error message repeats before it is cut.
ECHO_MAX_CHARS = 64


def echo(value: object, limit: int = ECHO_MAX_CHARS) -> str:
    """A client-supplied value as it may appear in an error message or field path: unchanged
    when it is short and printable (so ordinary messages read as before), otherwise with
    non-printable characters escaped and cut to `limit` characters plus "...(N bytes)" (N: the
    value's UTF-8 size). Every message that repeats client input goes through this, so a
    100 KB feature name can never produce a 100 KB status message (which would exceed a
    client's metadata limit). Thread safety: pure."""
    s = value if isinstance(value, str) else str(value)
    if len(s) <= limit and s.isprintable():
        return s
    shown = s if s.isprintable() else s.encode("unicode_escape", "backslashreplace").decode("ascii")
    if len(shown) <= limit:
        return shown
    return f"{shown[:limit]}...({len(s.encode('utf-8', 'surrogatepass'))} bytes)"


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
