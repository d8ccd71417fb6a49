"""Decode cost of the two protobuf encodings of an applicant's event history.

    PYTHONPATH=. python bench/proto_encoding.py [--json bench/proto_encoding.json] [--rounds 5]

Columnar: uwrt.v1.EventHistory, six packed repeated scalar columns (what the API uses).
Row-wise: `repeated Event events`, one sub-message per event with the same six fields. The
row-wise message is built at run time from a DescriptorProto (no .proto file), reusing the
API's EventType enum. Both are filled with the same random but realistic history (newest
first) of 16, 128 and 512 events, and for each we time, per message, with perf_counter_ns:
  parse      Message.FromString(bytes)           (what the gRPC deserializer does)
  serialize  msg.SerializeToString()
  to_numpy   the six columns out as int64 numpy arrays from a parsed message: np.asarray
             per column for "columnar", np.fromiter per column for "col_iter" (same bytes),
             one pass of attrgetter over the sub-messages for "row_wise"
  decode     parse + to_numpy, timed together    (bytes on the wire -> model-ready columns)
Each is measured in `--rounds` rounds (each round ~`--round-ms` of repetitions); the table
shows the median per-message time in microseconds and the min-max over rounds.
"""

import argparse
import datetime as dt
import functools
import json
import operator
import os
import platform
import statistics
import time

import numpy as np
from google.protobuf import __version__ as protobuf_version
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.internal import api_implementation

from uwrt.bench.meta import git_sha
from uwrt.runtime.pb import pb

COLUMNS = ("timestamp_unix_s", "type", "amount_minor", "mcc", "days_past_due",
           "installment_index")
SIZES = (16, 128, 512)


def row_wise_class():
    """EventHistoryRows { repeated Event events = 1; } built from descriptors at run time."""
    F = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(
        name="uwrt_bench/row_wise_history.proto", package="uwrt.bench", syntax="proto3",
        dependency=[pb.DESCRIPTOR.name])
    event = fdp.message_type.add(name="Event")
    for number, (name, ftype) in enumerate(
            [("timestamp_unix_s", F.TYPE_INT64), ("type", F.TYPE_ENUM),
             ("amount_minor", F.TYPE_INT64), ("mcc", F.TYPE_INT32),
             ("days_past_due", F.TYPE_INT32), ("installment_index", F.TYPE_INT32)], start=1):
        field = event.field.add(name=name, number=number, type=ftype, label=F.LABEL_OPTIONAL)
        if ftype == F.TYPE_ENUM:
            field.type_name = ".uwrt.v1.EventType"
    rows = fdp.message_type.add(name="EventHistoryRows")
    rows.field.add(name="events", number=1, type=F.TYPE_MESSAGE, label=F.LABEL_REPEATED,
                   type_name=".uwrt.bench.Event")
    pool = descriptor_pool.Default()  # already holds uwrt/v1/underwriting.proto
    try:
        fd = pool.FindFileByName(fdp.name)
    except KeyError:
        fd = pool.Add(fdp)
    return message_factory.GetMessageClass(fd.message_types_by_name["EventHistoryRows"])


def random_history(n, rng):
    """Newest-first history: installment loans (origination, dues, payments), declines."""
    types = rng.choice([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], size=n,
                       p=[.08, .30, .38, .07, .03, .03, .04, .01, .02, .04])
    gaps = rng.exponential(3 * 86400, size=n).astype(np.int64) + 60
    ts = 1_767_225_600 - np.cumsum(gaps)  # newest first, ending before 2026-01-01
    amount = np.round(rng.lognormal(np.log(6000), 1.0, size=n)).astype(np.int64)
    amount[types == 10] = 0
    mcc = rng.choice([5411, 5812, 5999, 5651, 5732, 4121, 5942, 7011, 0], size=n)
    dpd = np.where(types == 4, rng.integers(1, 30, size=n),
                   np.where(types == 5, rng.integers(15, 90, size=n), 0))
    inst = np.where(np.isin(types, [2, 3, 4, 5, 6]), rng.integers(1, 5, size=n), 0)
    return {c: v.astype(np.int64) for c, v in zip(
        COLUMNS, (ts, types, amount, mcc, dpd, inst), strict=True)}


def build_columnar(h):
    msg = pb.EventHistory()
    for c in COLUMNS:
        getattr(msg, c).extend(h[c].tolist())
    return msg


def build_rows(cls, h):
    msg = cls()
    for row in zip(*(h[c].tolist() for c in COLUMNS), strict=True):
        msg.events.add(**dict(zip(COLUMNS, row, strict=True)))
    return msg


def columnar_to_numpy(msg):
    # upb's RepeatedScalarContainer has __array__: np.asarray copies the column in one go.
    return {c: np.asarray(getattr(msg, c), dtype=np.int64) for c in COLUMNS}


def columnar_to_numpy_fromiter(msg):
    # The same columns element by element through the iterator protocol (for comparison).
    out = {}
    for c in COLUMNS:
        col = getattr(msg, c)
        out[c] = np.fromiter(col, dtype=np.int64, count=len(col))
    return out


_ROW = operator.attrgetter(*COLUMNS)


def rows_to_numpy(msg):
    # One pass over the sub-messages into an (n, 6) array: ~3x faster than six np.fromiter
    # passes over the events.
    ev = msg.events
    arr = np.array(list(map(_ROW, ev)), dtype=np.int64).reshape(len(ev), len(COLUMNS))
    return {c: arr[:, i] for i, c in enumerate(COLUMNS)}


def measure(fn, rounds, round_ms):
    """Per-call ns for `rounds` rounds, each a loop sized to last about round_ms."""
    reps = 1
    while True:  # calibrate (the first calls also warm up)
        t0 = time.perf_counter_ns()
        for _ in range(reps):
            fn()
        if (el := time.perf_counter_ns() - t0) > round_ms * 1e5:  # a tenth of a round
            break
        reps *= 2
    reps = max(1, int(reps * round_ms * 1e6 / el))
    per_call = []
    for _ in range(rounds):
        t0 = time.perf_counter_ns()
        for _ in range(reps):
            fn()
        per_call.append((time.perf_counter_ns() - t0) / reps)
    return {"median_us": statistics.median(per_call) / 1e3, "min_us": min(per_call) / 1e3,
            "max_us": max(per_call) / 1e3, "reps_per_round": reps}




def main():
    ap = argparse.ArgumentParser(description="protobuf event-history encoding benchmark")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--round-ms", type=float, default=100.0)
    ap.add_argument("--seed", type=int, default=20260101)
    args = ap.parse_args()
    rows_cls, rng = row_wise_class(), np.random.default_rng(args.seed)
    encodings = {"columnar": (pb.EventHistory, build_columnar, columnar_to_numpy),
                 "col_iter": (pb.EventHistory, build_columnar, columnar_to_numpy_fromiter),
                 "row_wise": (rows_cls, lambda h: build_rows(rows_cls, h), rows_to_numpy)}
    meta = {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "git_sha": git_sha(), "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "numpy": np.__version__, "protobuf": protobuf_version,
            "protobuf_implementation": api_implementation.Type(), "rounds": args.rounds,
            "round_ms": args.round_ms, "seed": args.seed}
    print(" ".join(f"{k}={v}" for k, v in meta.items()))
    results = []
    for n in SIZES:
        hist = random_history(n, rng)
        for name, (cls, build, to_numpy) in encodings.items():
            msg = build(hist)
            buf = msg.SerializeToString()
            got = to_numpy(cls.FromString(buf))
            assert all(np.array_equal(got[c], hist[c]) for c in COLUMNS), name
            r = {"events": n, "encoding": name, "bytes": len(buf)}
            parsed = cls.FromString(buf)
            def decode(cls=cls, buf=buf, to_numpy=to_numpy):
                return to_numpy(cls.FromString(buf))

            for metric, fn in (("parse", functools.partial(cls.FromString, buf)),
                               ("serialize", msg.SerializeToString),
                               ("to_numpy", functools.partial(to_numpy, parsed)),
                               ("decode", decode)):
                r[metric] = measure(fn, args.rounds, args.round_ms)
            results.append(r)
    metrics = ("parse", "serialize", "to_numpy", "decode")
    print(f"\n{'events':>6} {'encoding':<9} {'bytes':>6} " +
          " ".join(f"{m + ' us (min-max)':>24}" for m in metrics))
    for r in results:
        cells = [f"{r[m]['median_us']:8.2f} ({r[m]['min_us']:.2f}-{r[m]['max_us']:.2f})"
                 for m in metrics]
        print(f"{r['events']:>6} {r['encoding']:<9} {r['bytes']:>6} " +
              " ".join(f"{c:>24}" for c in cells))
    for n in SIZES:
        col, row = (next(r for r in results if r["events"] == n and r["encoding"] == e)
                    for e in ("columnar", "row_wise"))
        print(f"{n:>4} events: row-wise/columnar  bytes x{row['bytes'] / col['bytes']:.2f}"
              f"  decode x{row['decode']['median_us'] / col['decode']['median_us']:.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=2)
            f.write("\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
