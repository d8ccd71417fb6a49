"""Frames and segment files of the decision log (proto/uwrt/v1/records.proto has the spec).

    frame := u32 LE payload length | u32 LE crc32(length bytes) | payload | u32 LE crc32(payload)

The CRC is CRC-32 (IEEE, `zlib.crc32`): available everywhere without a dependency. The length
has its own CRC, so a torn or corrupt length is caught before it is trusted (no read past a
bad length). Pure functions; thread safe.
"""
from __future__ import annotations

import hashlib
import os
import re
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

from uwrt.runtime.pb import pb, rec

__all__ = ["FORMAT_VERSION", "MAX_PAYLOAD", "SEGMENT_SUFFIX", "Frame", "BadFrame", "frame", "scan", "request_digest",
           "segment_name", "segment_number", "writer_dirs", "segments_of", "parse_entry"]

FORMAT_VERSION = 1
MAX_PAYLOAD = 16 << 20          # a record is never this big (requests are capped far lower)
SEGMENT_SUFFIX = ".uwlog"
_HEAD = struct.Struct("<II")
_U32 = struct.Struct("<I")
_SEGMENT_RE = re.compile(r"^(\d{8})" + re.escape(SEGMENT_SUFFIX) + "$")
_WRITER_RE = re.compile(r"^w(\d+)$")


def frame(payload: bytes) -> bytes:
    """One frame around `payload` (a serialized LogEntry)."""
    n = _U32.pack(len(payload))
    return n + _U32.pack(zlib.crc32(n)) + payload + _U32.pack(zlib.crc32(payload))


@dataclass(frozen=True, slots=True)
class Frame:
    offset: int          # of the frame's first byte
    end: int             # one past its last byte
    payload: bytes


@dataclass(frozen=True, slots=True)
class BadFrame:
    offset: int
    why: str


def _frame_at(buf: bytes | memoryview, off: int) -> Frame | BadFrame:
    size = len(buf)
    if off + 8 > size:
        return BadFrame(off, f"truncated frame header ({size - off} of 8 bytes)")
    n_bytes = bytes(buf[off:off + 4])
    n, crc_n = _U32.unpack(n_bytes)[0], _U32.unpack_from(buf, off + 4)[0]
    if zlib.crc32(n_bytes) != crc_n:
        return BadFrame(off, "length CRC mismatch")
    if n > MAX_PAYLOAD:
        return BadFrame(off, f"length {n} over the limit")
    end = off + 8 + n + 4
    if end > size:
        return BadFrame(off, f"truncated frame ({size - off} of {end - off} bytes)")
    payload = bytes(buf[off + 8:off + 8 + n])
    if zlib.crc32(payload) != _U32.unpack_from(buf, off + 8 + n)[0]:
        return BadFrame(off, "payload CRC mismatch")
    return Frame(off, end, payload)


def scan(buf: bytes | memoryview, start: int = 0) -> Iterator[Frame | BadFrame]:
    """Every whole frame from `start`; stops after yielding the first BadFrame (if any)."""
    off = start
    while off < len(buf):
        f = _frame_at(buf, off)
        yield f
        if isinstance(f, BadFrame):
            return
        off = f.end


def next_good_frame(buf: bytes | memoryview, start: int) -> int | None:
    """The offset of the first whole, valid frame at or after `start` (a byte-by-byte search:
    used only after a bad frame, to tell a torn tail (nothing valid follows) from corruption in
    the middle (valid frames follow, which must never be truncated away))."""
    for off in range(start, len(buf) - 12 + 1):
        if isinstance(_frame_at(buf, off), Frame):
            return off
    return None


def parse_entry(payload: bytes) -> rec.LogEntry:
    e = rec.LogEntry()
    e.ParseFromString(payload)
    return e


def request_digest(req: pb.DecisionRequest) -> tuple[bytes, bytes]:
    """(canonical bytes, SHA-256 of them): the request serialized deterministically (fields in
    number order, map entries sorted by key), so the same request always hashes the same."""
    raw = req.SerializeToString(deterministic=True)
    return raw, hashlib.sha256(raw).digest()


def segment_name(number: int) -> str:
    return f"{number:08d}{SEGMENT_SUFFIX}"


def segment_number(name: str) -> int | None:
    m = _SEGMENT_RE.match(name)
    return int(m.group(1)) if m else None


def writer_dirs(root: str | os.PathLike) -> list[tuple[int, str]]:
    """(worker index, path) of every writer directory `w<index>` under a log root, by index."""
    out = []
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return []
    for name in names:
        m = _WRITER_RE.match(name)
        if m and os.path.isdir(os.path.join(root, name)):
            out.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(out)


def segments_of(writer_dir: str | os.PathLike) -> list[tuple[int, str]]:
    """(segment number, path) of every segment in a writer directory, by number."""
    out = []
    for name in os.listdir(writer_dir):
        n = segment_number(name)
        if n is not None:
            out.append((n, os.path.join(writer_dir, name)))
    return sorted(out)
