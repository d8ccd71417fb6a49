"""A grpc.health.v1 `Check` as raw HTTP/2 bytes, for balancers that cannot speak gRPC health.

HAProxy 2.6 has no gRPC health check, and its `http-check send` cannot carry a gRPC body (the
5-byte message prefix holds NUL bytes, which its configuration strings and log-format bodies
truncate). Its `tcp-check` can send and match arbitrary bytes, so the check is written here as one
client flight -- the HTTP/2 preface, an empty SETTINGS frame, a HEADERS frame for
`POST /grpc.health.v1.Health/Check` and a DATA frame with the `HealthCheckRequest{service}`
message -- and the server's answer is matched in two steps (`haproxy_tcp_check`):

1. wait until `grpc-status` appears in the response (the call is complete; also a trailers-only
   error such as NOT_FOUND for an unknown service);
2. then, conclusively, require the DATA frame of stream 1 that carries
   `HealthCheckResponse{status: SERVING}` (bytes `08 01`). NOT_SERVING (`08 02`), SERVICE_UNKNOWN,
   an error status or no answer within `timeout check` all fail the check.

So the balancer checks what the server reports, not only that its port accepts connections.
Limitations (README, "Scaling out"): step 1 matches the literal header name, which gRPC C-core
servers (grpcio, `uwrt serve`) send without Huffman coding on a fresh connection (every check
opens one); a server that Huffman-codes header names would need step 1 dropped (the SERVING frame
match alone still works, at the cost of NOT_SERVING being detected by `timeout check` instead of
at once). `probe` sends the same bytes from Python; tests compare it with grpcio's health client.
"""
from __future__ import annotations

import re
import socket
import struct
import time

__all__ = ["HEALTH_METHOD", "check_request", "haproxy_tcp_check", "parse_frames", "probe"]

HEALTH_METHOD = "/grpc.health.v1.Health/Check"
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, SETTINGS = 0x0, 0x1, 0x4
END_STREAM, END_HEADERS = 0x1, 0x4
# HPACK static table indexes (RFC 7541, Appendix A)
_METHOD_POST, _SCHEME_HTTP, _AUTHORITY, _PATH, _CONTENT_TYPE = 3, 6, 1, 4, 31

SERVING, NOT_SERVING = 1, 2      # grpc.health.v1.HealthCheckResponse.ServingStatus


def _frame(ftype: int, flags: int, stream: int, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([ftype, flags]) + struct.pack(">I", stream) + payload


def _hpack_int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    """RFC 7541 5.1 integer with an N-bit prefix; `first` holds the bits above the prefix."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out, value = bytearray([first | limit]), value - limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _hpack_str(s: str) -> bytes:
    b = s.encode()
    return _hpack_int(len(b), 7) + b              # H bit 0: no Huffman coding


def _literal(index: int | None, name: str, value: str) -> bytes:
    """Literal header field without indexing (RFC 7541 6.2.2): never touches the dynamic table."""
    if index is None:
        return b"\x00" + _hpack_str(name) + _hpack_str(value)
    return _hpack_int(index, 4) + _hpack_str(value)


def _message(service: str) -> bytes:
    """gRPC length-prefixed HealthCheckRequest{service} (field 1, length-delimited)."""
    body = b""
    if service:
        raw = service.encode()
        body = b"\x0a" + bytes([len(raw)]) + raw      # a one-byte varint: check_request allows <= 127 bytes
    return b"\x00" + struct.pack(">I", len(body)) + body


def check_request(service: str = "", authority: str = "localhost") -> bytes:
    """The client's whole first flight for one Check on stream 1 (a fresh connection)."""
    if len(service.encode()) > 127:
        raise ValueError("service names longer than 127 bytes are not supported")
    block = (bytes([0x80 | _METHOD_POST, 0x80 | _SCHEME_HTTP]) + _literal(_PATH, ":path", HEALTH_METHOD)
             + _literal(_AUTHORITY, ":authority", authority)
             + _literal(_CONTENT_TYPE, "content-type", "application/grpc") + _literal(None, "te", "trailers"))
    return (PREFACE + _frame(SETTINGS, 0, 0, b"") + _frame(HEADERS, END_HEADERS, 1, block)
            + _frame(DATA, END_STREAM, 1, _message(service)))


def serving_frame_regex() -> str:
    """Regex over the upper-case hex of the response (HAProxy `rbinary`): the DATA frame on stream
    1 (any flags) carrying HealthCheckResponse{status: SERVING}; `^(..)*` keeps it byte-aligned."""
    payload = b"\x00" + struct.pack(">I", 2) + bytes([0x08, SERVING])
    return "^(..)*" + "000007" + "00" + ".." + "00000001" + payload.hex().upper()


def haproxy_tcp_check(service: str = "") -> list[str]:
    """The backend lines that make HAProxy's check a grpc.health.v1 Check of `service`."""
    return [
        "option tcp-check",
        "tcp-check connect",
        f"tcp-check send-binary {check_request(service).hex()}",
        # 1: the answer is complete (normal trailers or a trailers-only error both carry grpc-status)
        f'tcp-check expect comment "grpc-status\\ received" rbinary {b"grpc-status".hex().upper()}',
        # 2: decided on what is already there: SERVING, or the check fails at once
        f'tcp-check expect min-recv 0 comment "grpc.health.v1\\ SERVING" rbinary {serving_frame_regex()}',
    ]


def parse_frames(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """Split server bytes into (type, flags, stream, payload) frames (a trailing partial frame is dropped)."""
    out, i = [], 0
    while i + 9 <= len(data):
        n = int.from_bytes(data[i:i + 3], "big")
        if i + 9 + n > len(data):
            break
        ftype, flags = data[i + 3], data[i + 4]
        stream = int.from_bytes(data[i + 5:i + 9], "big") & 0x7FFFFFFF
        out.append((ftype, flags, stream, data[i + 9:i + 9 + n]))
        i += 9 + n
    return out


def probe(host: str, port: int, service: str = "", timeout_s: float = 1.0) -> int | None:
    """Send `check_request` and decode the reply like the HAProxy rules do: the HealthCheckResponse
    status (1 SERVING, 2 NOT_SERVING, 0 UNKNOWN, 3 SERVICE_UNKNOWN), or None when the call failed
    (connection refused, an error status, no complete answer within `timeout_s`)."""
    deadline = time.monotonic() + timeout_s
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as s:
            s.sendall(check_request(service))
            data = b""
            while b"grpc-status" not in data:
                s.settimeout(max(1e-3, deadline - time.monotonic()))
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
    except OSError:
        return None
    m = re.search(rb"grpc-status([\x00-\x7e])", data)     # literal value, no Huffman: length byte, digits
    if m is None or data[m.end():m.end() + m.group(1)[0]] != b"0":
        return None                               # no complete answer, or an error status (e.g. NOT_FOUND)
    for ftype, _flags, stream, payload in parse_frames(data):
        if ftype == DATA and stream == 1 and len(payload) >= 5:
            msg = payload[5:5 + int.from_bytes(payload[1:5], "big")]
            if not msg:
                return 0                          # proto3: UNKNOWN (0) is the empty message
            if msg[0] == 0x08 and len(msg) >= 2:
                return msg[1]
    return None
