"""Reading and verifying a decision log directory without a running server.

`records(root)` yields every DecisionRecord of every writer (`w0`, `w1`, ...), in seq order per
writer; `verify(root)` checks every segment: frames and CRCs, header first, trailer last
(except each writer's newest segment, which may be open), the trailer's record count, seq range
and SHA-256, the chain of SHA-256s between a writer's segments, segment numbers and seqs without
gaps. Pure reads; thread safe.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

from uwrt.runtime.pb import rec
from uwrt.runtime.records.format import BadFrame, parse_entry, scan, segments_of, writer_dirs

__all__ = ["records", "verify", "VerifyReport", "SegmentReport", "read_segment"]


@dataclass
class SegmentReport:
    path: str
    number: int
    records: int = 0
    first_seq: int = 0
    last_seq: int = 0
    sealed: bool = False
    reason: str = ""
    truncated_bytes: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class VerifyReport:
    segments: list[SegmentReport] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    records: int = 0
    writers: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems and all(not s.problems for s in self.segments)

    def all_problems(self) -> list[str]:
        return self.problems + [f"{s.path}: {p}" for s in self.segments for p in s.problems]


def read_segment(path: str) -> tuple[list[rec.LogEntry], BadFrame | None, list[int], bytes]:
    """(entries, the first bad frame or None, each entry's frame offset, file bytes)."""
    with open(path, "rb") as fh:
        buf = fh.read()
    entries, bad, offsets = [], None, []
    for f in scan(buf):
        if isinstance(f, BadFrame):
            bad = f
            break
        entries.append(parse_entry(f.payload))
        offsets.append(f.offset)
    return entries, bad, offsets, buf


def records(root: str | os.PathLike, *, writers: list[int] | None = None, after_seq: dict[int, int] | None = None
            ) -> Iterator[tuple[str, rec.DecisionRecord]]:
    """(writer name, record) for every readable record under `root`; `after_seq[index]` skips a
    writer's records up to that seq (whole sealed segments below it are not read)."""
    from uwrt.runtime.records.segments import read_trailer
    for index, wdir in writer_dirs(root):
        if writers is not None and index not in writers:
            continue
        floor = (after_seq or {}).get(index, 0)
        for _, path in segments_of(wdir):
            if floor:
                tr = read_trailer(path)
                if tr is not None and tr.last_seq <= floor:
                    continue
            entries, _, _, _ = read_segment(path)
            for e in entries:
                if e.WhichOneof("entry") == "record" and e.record.seq > floor:
                    yield f"w{index}", e.record


def verify(root: str | os.PathLike) -> VerifyReport:
    rep = VerifyReport()
    wds = writer_dirs(root)
    if not wds:
        rep.problems.append(f"{root}: no writer directories (w0, w1, ...): not a decision log")
    for index, wdir in wds:
        rep.writers += 1
        segs = segments_of(wdir)
        prev_number, prev_last_seq, prev_sha = 0, 0, b""
        for k, (number, path) in enumerate(segs):
            s = SegmentReport(path, number)
            rep.segments.append(s)
            newest = k == len(segs) - 1
            if number != prev_number + 1:
                s.problems.append(f"segment number {number} follows {prev_number}: segments missing")
            entries, bad, offsets, buf = read_segment(path)
            if bad is not None:
                if newest and bad.why.startswith("truncated") and not (entries and entries[-1].WhichOneof("entry")
                                                                       == "trailer"):
                    s.notes.append(f"open segment: incomplete frame at byte {bad.offset} (being written, or a torn "
                                   f"tail the next start-up truncates)")
                else:
                    s.problems.append(f"bad frame at byte {bad.offset}: {bad.why}" +
                                      ("" if newest else " (not the newest segment)"))
            if not entries or entries[0].WhichOneof("entry") != "header":
                s.problems.append("does not start with a segment header")
                prev_number = number
                continue
            h = entries[0].header
            if h.segment_number != number:
                s.problems.append(f"header says segment {h.segment_number}")
            if h.writer != f"w{index}":
                s.problems.append(f"header says writer {h.writer!r}")
            if prev_sha and h.prev_segment_sha256 != prev_sha:
                s.problems.append("prev_segment_sha256 does not match the previous segment's trailer")
            body = entries[1:]
            trailer = None
            if body and body[-1].WhichOneof("entry") == "trailer":
                trailer = body[-1].trailer
                body = body[:-1]
            expect = h.first_seq
            if prev_last_seq and h.first_seq != prev_last_seq + 1:
                s.problems.append(f"first_seq {h.first_seq} does not follow {prev_last_seq}: records missing")
            for e in body:
                kind = e.WhichOneof("entry")
                if kind != "record":
                    s.problems.append(f"unexpected {kind} inside the segment")
                    continue
                if e.record.seq != expect:
                    s.problems.append(f"seq {e.record.seq} where {expect} was expected: a gap")
                    expect = e.record.seq
                expect += 1
                s.records += 1
                s.last_seq = e.record.seq
                s.first_seq = s.first_seq or e.record.seq
            rep.records += s.records
            if trailer is not None:
                s.sealed, s.reason, s.truncated_bytes = True, trailer.reason, trailer.truncated_bytes
                tframe_start = offsets[-1]
                if trailer.record_count != s.records:
                    s.problems.append(f"trailer counts {trailer.record_count} records, {s.records} found")
                if (trailer.first_seq, trailer.last_seq) != (s.first_seq, s.last_seq):
                    s.problems.append(f"trailer seq range {trailer.first_seq}..{trailer.last_seq}, found "
                                      f"{s.first_seq}..{s.last_seq}")
                if hashlib.sha256(buf[:tframe_start]).digest() != trailer.sha256:
                    s.problems.append("SHA-256 does not match the trailer")
                if bad is not None and not s.problems:
                    s.problems.append("bytes after the trailer")
                prev_sha = trailer.sha256
            elif not newest:
                s.problems.append("not sealed, but not the newest segment")
            prev_number = number
            if s.last_seq:
                prev_last_seq = s.last_seq
            elif h.first_seq > 1:
                prev_last_seq = h.first_seq - 1
    return rep

