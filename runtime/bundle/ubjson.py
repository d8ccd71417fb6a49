"""A small, strict UBJSON reader: enough to read an XGBoost model's header without xgboost.

`uwrt bundle inspect` / `verify` check that the tree model fits the feature schema (feature
count, objective, feature names) without importing xgboost (which takes a second and hundreds
of MB); `tree_header` gets those from the UBJSON XGBoost writes (`Booster.save_raw("ubj")`,
draft-12 UBJSON: big-endian numbers, optimized containers with `$` type and `#` count). The
full `load_bundle` also opens the model with xgboost and checks that both agree.

The input is untrusted: every length is checked against the bytes left, nesting is bounded, and
anything malformed raises ValueError (never an IndexError, a hang or a huge allocation).
Typed numeric arrays come back as numpy arrays (a zero-copy view over the input).
Thread safety: pure functions.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["loads", "TreeHeader", "tree_header"]

MAX_DEPTH = 64
_INTS = {b"i": (">b", 1), b"U": (">B", 1), b"I": (">h", 2), b"l": (">i", 4), b"L": (">q", 8)}
_FLOATS = {b"d": (">f", 4), b"D": (">d", 8)}
_NUMPY = {b"i": ">i1", b"U": ">u1", b"I": ">i2", b"l": ">i4", b"L": ">i8", b"d": ">f4", b"D": ">f8"}
_CONST = {b"Z": None, b"T": True, b"F": False}


class _Reader:
    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self.buf = memoryview(data)
        self.pos = 0

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise ValueError(f"truncated UBJSON at byte {self.pos} (wanted {n} more bytes)")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def marker(self) -> bytes:
        while True:
            m = bytes(self.take(1))
            if m != b"N":            # no-op marker
                return m

    def count(self, m: bytes | None = None) -> int:
        m = m or self.marker()
        if m not in _INTS:
            raise ValueError(f"UBJSON length at byte {self.pos} must be an integer, got marker {m!r}")
        n = self.scalar(m)
        if n < 0:
            raise ValueError(f"negative UBJSON length {n} at byte {self.pos}")
        return n

    def scalar(self, m: bytes) -> Any:
        if m in _INTS:
            fmt, size = _INTS[m]
            return struct.unpack(fmt, self.take(size))[0]
        if m in _FLOATS:
            fmt, size = _FLOATS[m]
            return struct.unpack(fmt, self.take(size))[0]
        if m in _CONST:
            return _CONST[m]
        if m == b"C":
            return bytes(self.take(1)).decode("ascii")
        if m in (b"S", b"H"):
            text = bytes(self.take(self.count())).decode("utf-8")
            return text if m == b"S" else float(text)
        raise ValueError(f"unknown UBJSON marker {m!r} at byte {self.pos - 1}")

    def value(self, m: bytes, depth: int) -> Any:
        if m == b"[":
            return self.array(depth + 1)
        if m == b"{":
            return self.obj(depth + 1)
        return self.scalar(m)

    def _container_head(self) -> tuple[bytes | None, int | None]:
        typ = n = None
        m = bytes(self.buf[self.pos:self.pos + 1])
        if m == b"$":
            self.pos += 1
            typ = bytes(self.take(1))
            m = bytes(self.buf[self.pos:self.pos + 1])
            if m != b"#":
                raise ValueError(f"UBJSON typed container without a count at byte {self.pos}")
        if m == b"#":
            self.pos += 1
            n = self.count()
            # every element takes at least one byte unless it is a typed constant
            if (typ not in _CONST) and n > len(self.buf) - self.pos:
                raise ValueError(f"UBJSON container of {n} elements exceeds the input at byte {self.pos}")
        return typ, n

    def array(self, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise ValueError("UBJSON nested too deeply")
        typ, n = self._container_head()
        if typ is not None and n is not None and typ in _NUMPY:
            dt = np.dtype(_NUMPY[typ])
            return np.frombuffer(self.take(n * dt.itemsize), dtype=dt)
        out = []
        if n is not None:
            for _ in range(n):
                out.append(self.value(typ or self.marker(), depth))
            return out
        while (m := self.marker()) != b"]":
            out.append(self.value(m, depth))
        return out

    def obj(self, depth: int) -> dict[str, Any]:
        if depth > MAX_DEPTH:
            raise ValueError("UBJSON nested too deeply")
        typ, n = self._container_head()
        out: dict[str, Any] = {}
        i = 0
        while True:
            if n is not None:
                if i == n:
                    return out
                key = bytes(self.take(self.count())).decode("utf-8")
            else:
                m = self.marker()
                if m == b"}":
                    return out
                key = bytes(self.take(self.count(m))).decode("utf-8")
            out[key] = self.value(typ or self.marker(), depth)
            i += 1


def loads(data: bytes | bytearray | memoryview) -> Any:
    """Decode one UBJSON value that fills `data` exactly; ValueError if malformed."""
    r = _Reader(data)
    try:
        v = r.value(r.marker(), 0)
    except (struct.error, UnicodeDecodeError, OverflowError) as e:
        raise ValueError(f"malformed UBJSON: {e}") from None
    if r.pos != len(r.buf):
        raise ValueError(f"trailing bytes after the UBJSON value (at byte {r.pos} of {len(r.buf)})")
    return v


@dataclass(frozen=True)
class TreeHeader:
    """What the bundle checks about an XGBoost model without loading it into xgboost."""
    num_features: int
    objective: str
    feature_names: tuple[str, ...] | None   # None when the model carries no names
    num_trees: int


def tree_header(data: bytes | bytearray) -> TreeHeader:
    """Feature count, objective, feature names and tree count of an XGBoost model saved as
    UBJSON (or as JSON); ValueError naming what is missing or malformed."""
    head = bytes(data[:2])
    try:
        if head[:1] == b"{" and head[1:2] in (*_INTS, b"}", b"$", b"#", b"N"):
            doc = loads(data)
        else:                                   # xgboost also reads JSON models
            doc = json.loads(bytes(data))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"neither UBJSON nor JSON: {e}") from None
    try:
        learner = doc["learner"]
        nf = int(learner["learner_model_param"]["num_feature"])
        objective = str(learner["objective"]["name"])
        names = learner.get("feature_names")
        trees = learner["gradient_booster"]["model"]["trees"]
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"not an XGBoost model (missing {e})") from None
    if not isinstance(trees, list):
        raise ValueError("not an XGBoost model (trees is not a list)")
    names_t = tuple(str(n) for n in names) if names is not None and len(names) else None
    return TreeHeader(num_features=nf, objective=objective, feature_names=names_t, num_trees=len(trees))
