"""bench/records_format.py: the decision log's format chosen by measured cost: length-delimited
protobuf frames with CRC-32 (what uwrt writes) vs Apache Arrow IPC stream vs Parquet, appending
the same decision records in batches as the server does (one append per batch of B records).

    python bench/records_format.py [--bundle bundles/demo] [--n 4000] [--batches 1,4,16] [--repeats 5]
                                   [--out bench/results/records_format.json]

The records: `--n` generated requests decided by the bundle (real responses: reasons with
contributions, model identity, timings). What each format is given is what the server already
has in hand when a batch is decided: the request's canonical bytes (needed for its digest) and
the serialized response (needed for the idempotency index). Per format and batch size, the CPU
time (time.process_time) to turn every batch into bytes in a file (buffered writes, no fsync:
the fsync is the same for every format and is measured by bench/records_cost.py), and the bytes
per record:

    protobuf-frames  uwrt.runtime.records.format.frame around a DecisionRecord body (the server's
                     encoding: runtime/serving/audit.py writes the same fields)
    arrow-ipc        one pyarrow RecordBatch per batch on an IPC stream: scalar columns (request
                     id, kind, digest, times, outcome, probability, score, bundle digest) plus the
                     request and response as protobuf binary columns (Arrow has no type for them
                     without flattening the nested reasons/model/timing into struct columns)
    parquet          the same table, one row group per batch (pyarrow.parquet.ParquetWriter)

Also: whether a file cut at a random byte (a torn tail after a crash) still yields the whole
records before the cut, per format. Repeats are interleaved (every format once per repeat);
medians and [min, max]. Needs pyarrow (requirements/bench.txt). A command-line program.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from uwrt.bench.meta import git_sha  # noqa: E402

FORMATS = ("protobuf-frames", "arrow-ipc", "parquet")


def make_records(bundle: str, n: int) -> list[tuple[object, bytes, bytes, bytes]]:
    """(request, canonical request bytes, digest, response bytes) for n decided requests."""
    from uwrt.demo.synth import generate
    from uwrt.runtime.config import RuntimeConfig
    from uwrt.runtime.pipeline import Pipeline
    from uwrt.runtime.records.format import request_digest
    pipe = Pipeline.from_dir(bundle, config=RuntimeConfig())
    reqs = generate(n, 7, id_prefix="fmt-").requests
    out = []
    for s in range(0, n, 64):
        chunk = reqs[s:s + 64]
        for req, resp in zip(chunk, pipe.decide(chunk), strict=True):
            if isinstance(resp, Exception):
                continue
            raw, dg = request_digest(req)
            out.append((req, raw, dg, resp.SerializeToString()))
    return out


def write_protobuf(recs, batch: int, fh) -> None:
    from uwrt.runtime.pb import rec
    from uwrt.runtime.records.format import frame
    seq = 0
    for s in range(0, len(recs), batch):
        parts = []
        for req, raw, dg, resp in recs[s:s + batch]:
            seq += 1
            r = rec.DecisionRecord(seq=seq, kind=rec.KIND_DECISION, rpc=rec.RPC_DECIDE, request_id=req.request_id,
                                   request_digest=dg, as_of_unix_s=req.as_of.seconds, received_unix_ns=time.time_ns(),
                                   answered_unix_ns=time.time_ns(), profile="cpu", encoder_backend="onnx",
                                   tree_backend="native", batch_id=s // batch + 1, batch_size=batch)
            body = r.SerializeToString() + b"\x3a" + _varint(len(raw)) + raw + b"\x62" + _varint(len(resp)) + resp
            e = b"\x12" + _varint(len(body)) + body       # LogEntry.record
            parts.append(frame(e))
        fh.write(b"".join(parts))


def _varint(n: int) -> bytes:
    from uwrt.runtime.records.log import varint
    return varint(n)


def _arrow_batches(recs, batch: int):
    import pyarrow as pa

    from uwrt.runtime.pb import pb
    schema = pa.schema([("seq", pa.uint64()), ("kind", pa.uint8()), ("request_id", pa.string()),
                        ("request_digest", pa.binary(32)), ("as_of_unix_s", pa.int64()),
                        ("received_unix_ns", pa.int64()), ("answered_unix_ns", pa.int64()),
                        ("outcome", pa.uint8()), ("probability_of_default", pa.float64()), ("score", pa.float64()),
                        ("bundle_digest", pa.string()), ("request", pa.binary()), ("response", pa.binary())])
    seq = 0
    for s in range(0, len(recs), batch):
        chunk = recs[s:s + batch]
        cols: dict[str, list] = {f.name: [] for f in schema}
        for req, raw, dg, resp_b in chunk:
            seq += 1
            resp = pb.DecisionResponse()
            resp.ParseFromString(resp_b)       # the server has the message; parsing stands in for field access
            cols["seq"].append(seq)
            cols["kind"].append(1)
            cols["request_id"].append(req.request_id)
            cols["request_digest"].append(dg)
            cols["as_of_unix_s"].append(req.as_of.seconds)
            cols["received_unix_ns"].append(time.time_ns())
            cols["answered_unix_ns"].append(time.time_ns())
            cols["outcome"].append(resp.outcome)
            cols["probability_of_default"].append(resp.probability_of_default)
            cols["score"].append(resp.score)
            cols["bundle_digest"].append(resp.model.bundle_digest)
            cols["request"].append(raw)
            cols["response"].append(resp_b)
        yield schema, pa.RecordBatch.from_pydict(cols, schema=schema)


def write_arrow(recs, batch: int, fh) -> None:
    import pyarrow as pa
    w = None
    for schema, rb in _arrow_batches(recs, batch):
        if w is None:
            w = pa.ipc.new_stream(fh, schema)
        w.write_batch(rb)
    if w is not None:
        w.close()


def write_parquet(recs, batch: int, fh) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    w = None
    for schema, rb in _arrow_batches(recs, batch):
        if w is None:
            w = pq.ParquetWriter(fh, schema)
        w.write_table(pa.Table.from_batches([rb]))
    if w is not None:
        w.close()


WRITERS = {"protobuf-frames": write_protobuf, "arrow-ipc": write_arrow, "parquet": write_parquet}


def torn_tail_readable(fmt: str, data: bytes) -> int:
    """Whole records recovered from the first 60% of the file's bytes (a crash mid-write)."""
    cut = data[:int(len(data) * 0.6)]
    if fmt == "protobuf-frames":
        from uwrt.runtime.records.format import Frame, scan
        return sum(1 for f in scan(cut) if isinstance(f, Frame))
    import pyarrow as pa
    n = 0
    try:
        if fmt == "arrow-ipc":
            r = pa.ipc.open_stream(io.BytesIO(cut))
            while True:
                try:
                    n += r.read_next_batch().num_rows
                except StopIteration:
                    break
        else:
            import pyarrow.parquet as pq
            n = pq.read_table(io.BytesIO(cut)).num_rows
    except Exception:  # noqa: BLE001 - a torn file the reader refuses: what we measure
        pass
    return n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", default=str(ROOT / "bundles" / "demo"))
    p.add_argument("--n", type=int, default=4000)
    p.add_argument("--batches", default="1,4,16")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "records_format.json"))
    args = p.parse_args(argv)
    try:
        import pyarrow
    except ImportError:
        print("bench/records_format.py needs pyarrow: pip install -r requirements/bench.txt", file=sys.stderr)
        return 2
    recs = make_records(args.bundle, args.n)
    batches = [int(x) for x in args.batches.split(",")]
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="uwrt-records-format-", dir="/var/tmp"))
    cpu: dict[tuple[str, int], list[float]] = {}
    size: dict[tuple[str, int], int] = {}
    torn: dict[tuple[str, int], int] = {}
    for rep in range(args.repeats):
        for b in batches:
            for k, fmt in enumerate(FORMATS):
                fmt = FORMATS[(k + rep) % len(FORMATS)]
                path = tmp / f"{fmt}-{b}"
                with open(path, "wb") as fh:
                    t0 = time.process_time()
                    WRITERS[fmt](recs, b, fh)
                    fh.flush()
                    dt = time.process_time() - t0
                cpu.setdefault((fmt, b), []).append(1e6 * dt / len(recs))
                size[(fmt, b)] = os.path.getsize(path)
                if rep == 0:
                    torn[(fmt, b)] = torn_tail_readable(fmt, path.read_bytes())
    rows = []
    for b in batches:
        for fmt in FORMATS:
            xs = cpu[(fmt, b)]
            rows.append({"format": fmt, "batch": b, "cpu_us_per_record": statistics.median(xs),
                         "cpu_min": min(xs), "cpu_max": max(xs), "bytes_per_record": size[(fmt, b)] / len(recs),
                         "torn_60pct_records_recovered": torn[(fmt, b)], "records": len(recs)})
    meta = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "git": git_sha(),
            "uptime": os.popen("uptime").read().strip(), "pyarrow": pyarrow.__version__, "bundle": args.bundle,
            "repeats": args.repeats}
    pathlib.Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"{meta}")
    print("| batch | format | CPU us/record | bytes/record | whole records readable from a file cut at 60% |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['format']} | {r['cpu_us_per_record']:.1f} "
              f"[{r['cpu_min']:.1f}, {r['cpu_max']:.1f}] | {r['bytes_per_record']:.0f} | "
              f"{r['torn_60pct_records_recovered']} of {r['records']} |")
    for f in tmp.iterdir():
        f.unlink()
    tmp.rmdir()
    return 0


if __name__ == "__main__":
    sys.exit(main())
