"""`uwrt audit verify | show | replay`: the decision log, read without a running server.

* `verify DIR`: every segment of every writer: frames and CRCs, header and trailer, the
  trailer's count, seq range and SHA-256, the SHA-256 chain between segments, segment numbers
  and seqs without gaps. Exit 0 when all hold, 1 otherwise (each problem printed).
* `show DIR [--id ID] [--kind K] [--writer N] [--limit N] [--json]`: records as a table or as
  JSON lines (protobuf's JSON mapping of uwrt.v1.DecisionRecord).
* `replay DIR --bundle B`: re-score every logged decision (and shadow decision, with --kinds)
  whose request is in the log with bundle B, offline, and report every difference in outcome,
  probability (beyond --tolerance), score, reasons or counteroffer: reproducing a decision for a
  regulator (B = the bundle that made it), or a challenger analysis (B = another bundle).
  Exit 0 when nothing differs, 1 when something does, 2 when the bundle fails verification.

Thread safety: one command per process.
"""
from __future__ import annotations

import argparse
import json
from collections import Counter
from typing import Any

from google.protobuf import json_format

from uwrt.runtime.pb import pb, rec
from uwrt.runtime.records.reader import records, verify

__all__ = ["register"]

KINDS = {"decision": rec.KIND_DECISION, "error": rec.KIND_ERROR, "replay": rec.KIND_REPLAY, "shadow": rec.KIND_SHADOW}


def register(sub: argparse._SubParsersAction) -> None:
    from uwrt.runtime.cli.main import COMMANDS
    a = sub.add_parser("audit", help=COMMANDS["audit"][0],
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    s = a.add_subparsers(dest="audit_command", required=True, metavar="SUBCOMMAND")
    v = s.add_parser("verify", help="check checksums, counts and gaps of a decision log")
    v.add_argument("dir", help="the decision log directory (records_dir)")
    v.add_argument("--json", action="store_true", help="print the report as JSON")
    v.set_defaults(func=cmd_verify)
    w = s.add_parser("show", help="print decision records")
    w.add_argument("dir", help="the decision log directory (records_dir)")
    w.add_argument("--id", help="only this request id")
    w.add_argument("--kind", choices=sorted(KINDS), help="only records of this kind")
    w.add_argument("--writer", type=int, help="only this writer (worker index)")
    w.add_argument("--limit", type=int, default=0, help="at most this many records (default: all)")
    w.add_argument("--json", action="store_true", help="JSON lines (DecisionRecord's JSON mapping) instead of a table")
    w.set_defaults(func=cmd_show)
    r = s.add_parser("replay", help="re-score logged requests with a bundle and report every difference")
    r.add_argument("dir", help="the decision log directory (records_dir)")
    r.add_argument("--bundle", required=True, help="bundle directory to re-score with")
    r.add_argument("--kinds", default="decision", help="record kinds to re-score, comma-separated: decision, shadow "
                                                       "(default decision)")
    r.add_argument("--tolerance", type=float, default=1e-6,
                   help="largest probability difference that is not a difference (default 1e-6)")
    r.add_argument("--limit", type=int, default=0, help="at most this many records (default: all)")
    r.add_argument("--batch-size", type=int, default=64, help="requests per pipeline call (default 64)")
    r.add_argument("--json", help="also write every difference and the summary to this JSON file")
    r.set_defaults(func=cmd_replay)


def cmd_verify(args: argparse.Namespace) -> int:
    rep = verify(args.dir)
    if args.json:
        print(json.dumps({"ok": rep.ok, "writers": rep.writers, "records": rep.records, "problems": rep.all_problems(),
                          "segments": [vars(s) for s in rep.segments]}, indent=2))
    else:
        for sg in rep.segments:
            state = f"sealed ({sg.reason})" if sg.sealed else "open"
            extra = f", {sg.truncated_bytes} torn bytes truncated at recovery" if sg.truncated_bytes else ""
            print(f"{sg.path}: {sg.records} records, seq {sg.first_seq}..{sg.last_seq}, {state}{extra}")
            for n in sg.notes:
                print(f"  note: {n}")
        for p in rep.all_problems():
            print(f"PROBLEM: {p}")
        print(f"{'OK' if rep.ok else 'FAILED'}: {rep.writers} writer(s), {len(rep.segments)} segment(s), "
              f"{rep.records} record(s), {len(rep.all_problems())} problem(s)")
    return 0 if rep.ok else 1


def _kind_name(k: int) -> str:
    return rec.RecordKind.Name(k).removeprefix("KIND_").lower()


def cmd_show(args: argparse.Namespace) -> int:
    n = 0
    if not args.json:
        print(f"{'writer':6} {'seq':>8} {'kind':8} {'request_id':24} {'outcome':12} {'pd':>8} {'score':>7} "
              f"{'path':8} {'bundle':12} {'batch':>6} error")
    for writer, r in records(args.dir, writers=[args.writer] if args.writer is not None else None):
        if args.id is not None and r.request_id != args.id:
            continue
        if args.kind is not None and r.kind != KINDS[args.kind]:
            continue
        if args.json:
            d = json_format.MessageToDict(r)
            d["writer"] = writer
            print(json.dumps(d))
        else:
            resp = r.response
            out = pb.Outcome.Name(resp.outcome) if r.HasField("response") else "-"
            path = pb.DecisionPath.Name(resp.path) if r.HasField("response") else "-"
            err = f"{r.error.code}: {r.error.message}" if r.HasField("error") else ""
            print(f"{writer:6} {r.seq:>8} {_kind_name(r.kind):8} {r.request_id[:24]:24} {out:12} "
                  f"{resp.probability_of_default:8.5f} {resp.score:7.1f} {path:8} {resp.model.bundle_digest[:12]:12} "
                  f"{r.batch_id:>6} {err}")
        n += 1
        if args.limit and n >= args.limit:
            break
    return 0


def _compare(logged: pb.DecisionResponse, now: pb.DecisionResponse, tol: float) -> list[dict[str, Any]]:
    diffs = []

    def d(field: str, a: Any, b: Any) -> None:
        diffs.append({"field": field, "logged": a, "now": b})

    if logged.outcome != now.outcome:
        d("outcome", pb.Outcome.Name(logged.outcome), pb.Outcome.Name(now.outcome))
    if abs(logged.probability_of_default - now.probability_of_default) > tol:
        d("probability_of_default", logged.probability_of_default, now.probability_of_default)
    if abs(logged.score - now.score) > max(tol, 1e-9) * 1e3:
        d("score", logged.score, now.score)
    if [x.code for x in logged.reasons] != [x.code for x in now.reasons]:
        d("reasons", [x.code for x in logged.reasons], [x.code for x in now.reasons])
    if logged.counteroffer_amount_minor != now.counteroffer_amount_minor:
        d("counteroffer_amount_minor", logged.counteroffer_amount_minor, now.counteroffer_amount_minor)
    return diffs


def cmd_replay(args: argparse.Namespace) -> int:
    from uwrt.runtime.config import RuntimeConfig
    from uwrt.runtime.errors import InvalidRequest
    from uwrt.runtime.pipeline import Pipeline
    kinds = {KINDS[k.strip()] for k in args.kinds.split(",") if k.strip()}
    pipe = Pipeline.from_dir(args.bundle, config=RuntimeConfig())
    ident = pipe.identity
    todo: list[tuple[str, rec.DecisionRecord]] = []
    skipped: Counter[str] = Counter()
    counts: Counter[str] = Counter()
    for writer, r in records(args.dir):
        if r.kind not in kinds:
            continue
        if not r.HasField("request"):
            skipped["no request stored (records_payload = digest)"] += 1
            continue
        todo.append((writer, r))
        if args.limit and len(todo) >= args.limit:
            break
    diffs: list[dict[str, Any]] = []
    same_bundle: Counter[bool] = Counter()
    for s in range(0, len(todo), args.batch_size):
        chunk = todo[s:s + args.batch_size]
        for (writer, r), res in zip(chunk, pipe.decide([r.request for _, r in chunk]), strict=True):
            counts["compared"] += 1
            same_bundle[r.response.model.bundle_digest == ident.bundle_digest] += 1
            where = {"writer": writer, "seq": r.seq, "request_id": r.request_id,
                     "logged_bundle": r.response.model.bundle_digest[:12]}
            if isinstance(res, InvalidRequest):
                diffs.append({**where, "field": "request", "logged": "decided", "now": f"invalid: {res}"})
                counts["different"] += 1
                continue
            found = _compare(r.response, res, args.tolerance)
            counts["different" if found else "identical"] += 1
            diffs += [{**where, **x} for x in found]
    for x in diffs:
        print(f"DIFF {x['writer']}#{x['seq']} {x['request_id']} (logged by {x['logged_bundle']}): {x['field']}: "
              f"{x['logged']} -> {x['now']}")
    summary = {"bundle": ident.bundle_id, "bundle_digest": ident.bundle_digest, "compared": counts["compared"],
               "identical": counts["identical"], "different": counts["different"],
               "logged_by_this_bundle": same_bundle[True], "logged_by_other_bundles": same_bundle[False],
               "skipped": dict(skipped), "tolerance": args.tolerance}
    print(f"replayed {summary['compared']} record(s) with bundle {ident.bundle_id} ({ident.bundle_digest[:12]}): "
          f"{summary['identical']} identical, {summary['different']} different"
          + (f"; skipped {sum(skipped.values())}: {dict(skipped)}" if skipped else ""))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"summary": summary, "differences": diffs}, fh, indent=2)
    return 1 if counts["different"] else 0


