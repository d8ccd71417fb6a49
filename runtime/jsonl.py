"""The one request file format every command accepts: JSON lines, each a DecisionRequest in
protobuf's JSON mapping (https://protobuf.dev/programming-guides/json/).

Thread safety: stateless functions.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import IO

from google.protobuf import json_format
from google.protobuf.message import Message

from uwrt.runtime.pb import pb


def to_json_line(msg: Message) -> str:
    """One-line protobuf JSON mapping. Map fields (`features`) come out with sorted keys: protobuf's
    map iteration order differs between processes, and files must be byte-identical."""
    d = json_format.MessageToDict(msg)
    if isinstance(d.get("features"), dict):
        d["features"] = dict(sorted(d["features"].items()))
    return json.dumps(d, indent=None)


def write_jsonl(messages: Iterable[Message], fh: IO[str]) -> int:
    """Write one JSON object per line; returns the count."""
    n = 0
    for m in messages:
        fh.write(to_json_line(m))
        fh.write("\n")
        n += 1
    return n


def read_jsonl(fh: IO[str], message_type=pb.DecisionRequest) -> Iterator[Message]:
    """Parse strictly (unknown fields are errors). A bad line raises ValueError naming its number."""
    for lineno, line in enumerate(fh, 1):
        if not line.strip():
            continue
        msg = message_type()
        try:
            json_format.Parse(line, msg, ignore_unknown_fields=False)
        except json_format.ParseError as e:
            raise ValueError(f"line {lineno}: not a valid {message_type.DESCRIPTOR.name}: {e}") from None
        yield msg
