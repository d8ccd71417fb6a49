"""`uwrt bundle create | inspect | verify | keygen | sign`.

`register(subparsers)` adds the `bundle` command to the top-level CLI's argparse subparsers.
Each subcommand sets `args.func`, a handler `(args) -> int` exit code: 0 on success, 2 on a
BundleError (printed as `error: <message>` on stderr); `verify` exits 3 when the bundle is
intact but not signed by any of the given public keys.

`inspect` and `verify` import neither torch, ONNX Runtime nor xgboost (they check the weights
through safetensors' numpy view and the tree model's UBJSON header; tests/runtime/bundle
checks this in a fresh interpreter).

To get the parts of an existing bundle (e.g. to rebuild it with another policy), use
`uwrt.runtime.bundle.bundle.export_parts(load_bundle(DIR), OUT)`: it writes trees.ubj,
encoder.safetensors, encoder_config.json, feature_schema.json, policy.json (and the model
cards) in exactly the form `bundle create` reads.

Thread safety: handlers print to stdout/stderr and touch only the named paths; run one per
process.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from uwrt.runtime import __version__
from uwrt.runtime.errors import BundleError

if TYPE_CHECKING:
    from uwrt.runtime.bundle.bundle import Bundle

__all__ = ["register", "cmd_create", "cmd_inspect", "cmd_verify", "cmd_keygen", "cmd_sign"]

#: `uwrt bundle verify` exit code when the bundle is intact but no given public key signed it.
EXIT_NOT_SIGNED = 3


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `bundle {create,inspect,verify,keygen,sign}` to `subparsers`; returns the `bundle` parser."""
    p = subparsers.add_parser("bundle", help="build, inspect, verify and sign model bundles",
                              description="Build, inspect, verify and sign model bundles.")
    sub = p.add_subparsers(dest="bundle_command", metavar="{create,inspect,verify,keygen,sign}", required=True)

    c = sub.add_parser("create", help="build a bundle from externally trained parts",
                       description="Validate the parts as load_bundle would, then write the "
                                   "bundle atomically.")
    c.add_argument("--out", required=True, help="bundle directory to create")
    c.add_argument("--trees", required=True, help="XGBoost model (.ubj or .json), binary:logistic")
    c.add_argument("--encoder-weights", required=True, help="encoder weights (.safetensors)")
    c.add_argument("--encoder-config", required=True, help="EncoderConfig as JSON")
    c.add_argument("--feature-schema", required=True,
                   help="FeatureSchema as JSON (its optional \"limits\" object holds the request limits)")
    c.add_argument("--request-limits", default=None,
                   help="RequestLimits as JSON (accepted currencies, amount range, installments per product, "
                        "as_of window, required features, max imputed share); replaces the schema's \"limits\"")
    c.add_argument("--policy", required=True, help="Policy as JSON")
    c.add_argument("--bundle-id", default=None, help="default: uwrt-<hash of the parts>")
    c.add_argument("--tree-version", default=None, help="default: <trees stem>-<sha256[:8]>")
    c.add_argument("--model-card", default=None, help="model card (JSON)")
    c.add_argument("--model-card-md", default=None, help="model card (Markdown)")
    c.add_argument("--monitoring-sample", default=None, metavar="FILE",
                   help="development sample (requests JSONL, a few thousand applicants from the population the "
                        "model was built for, ideally not its training rows): scored by the new bundle, its "
                        "statistics become the bundle's monitoring.json, the drift baseline (README: Operating uwrt)")
    c.add_argument("--monitoring", default=None, metavar="FILE",
                   help="a monitoring.json computed elsewhere (uwrt-monitoring format); instead of --monitoring-sample")
    c.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    c.set_defaults(func=cmd_create)

    i = sub.add_parser("inspect", help="verify a bundle and describe what is inside",
                       description="Verify a bundle (digests, undeclared files, signature consistency, "
                                   "compatibility of the parts) and describe it. Exit 0, or 2 if it fails.")
    i.add_argument("dir", help="bundle directory")
    i.add_argument("--json", action="store_true", help="print one JSON object")
    i.set_defaults(func=cmd_inspect)

    v = sub.add_parser("verify", help="verify a bundle's digests and signature",
                       description="Verify every digest, that no undeclared file is present, the parts' "
                                   "compatibility and every signature in manifest.sig. With --pubkey, the "
                                   "bundle must also be signed by one of those keys. Exit codes: 0 verified; "
                                   "2 verification failed (tampered, incomplete, incompatible, a signature "
                                   "that does not verify, an unreadable key); 3 intact but not signed by any "
                                   "given --pubkey.")
    v.add_argument("dir", help="bundle directory")
    v.add_argument("--pubkey", action="append", default=[], metavar="PUB",
                   help="trusted public key (PEM, from `bundle keygen`); repeatable")
    v.set_defaults(func=cmd_verify)

    k = sub.add_parser("keygen", help="create an Ed25519 key pair for signing bundles",
                       description="Write <name>.key (private, PKCS#8 PEM, mode 0600) and <name>.pub "
                                   "(public PEM) into --out. Keep the private key outside every bundle "
                                   "and off serving hosts; give servers the .pub (trusted_keys).")
    k.add_argument("--out", required=True, help="directory for the key pair (created 0700 if missing)")
    k.add_argument("--name", default="bundle-signing", help="file name stem (default bundle-signing)")
    k.add_argument("--overwrite", action="store_true", help="replace an existing key pair")
    k.set_defaults(func=cmd_keygen)

    s = sub.add_parser("sign", help="sign a bundle's manifest (writes manifest.sig)",
                       description="Verify the bundle, then add this key's Ed25519 signature over "
                                   "manifest.json to manifest.sig (signatures by other keys are kept).")
    s.add_argument("dir", help="bundle directory")
    s.add_argument("--key", required=True, help="private key (PEM, from `bundle keygen`; must be mode 0600)")
    s.set_defaults(func=cmd_sign)
    return p


def _fail(e: BundleError) -> int:
    print(f"error: {e}", file=sys.stderr)
    return 2


def cmd_create(args: argparse.Namespace) -> int:
    """Handler of `uwrt bundle create`."""
    from uwrt.runtime.bundle.bundle import create_from_parts  # imported on use: `uwrt --help` stays light
    kw = dict(trees=args.trees, encoder_weights=args.encoder_weights,
              encoder_config=args.encoder_config, feature_schema=args.feature_schema,
              policy=args.policy, bundle_id=args.bundle_id, tree_version=args.tree_version,
              model_card=args.model_card, model_card_md=args.model_card_md, request_limits=args.request_limits,
              created_by=f"uwrt {__version__} bundle create")
    if args.monitoring and args.monitoring_sample:
        return _fail(BundleError("give --monitoring or --monitoring-sample, not both"))
    try:
        extra = {} if not args.monitoring else {"monitoring.json": _checked_monitoring(args.monitoring, args)}
        b = create_from_parts(args.out, overwrite=args.overwrite, extra_files=extra, **kw)
        if args.monitoring_sample:      # score the sample with the bundle just built, then add its statistics
            b = create_from_parts(args.out, overwrite=True, **kw, extra_files={
                "monitoring.json": _sample_monitoring(b, args.monitoring_sample)})
    except BundleError as e:
        return _fail(e)
    print(f"bundle_id      {b.bundle_id}")
    print(f"bundle_digest  {b.bundle_digest}")
    print(f"path           {b.path}")
    from uwrt.runtime.pipeline import prepare_bundle_caches
    print(prepare_bundle_caches(b.path), flush=True)
    return 0


def _checked_monitoring(path: str, args: argparse.Namespace) -> bytes:
    """A given monitoring.json, validated against the schema being bundled."""
    from uwrt.runtime.bundle.schema import FeatureSchema
    from uwrt.runtime.monitoring.drift import MonitoringStats
    try:
        with open(path, "rb") as fh:
            data = fh.read()
        with open(args.feature_schema, encoding="utf-8") as fh:
            schema = FeatureSchema.from_dict(json.load(fh))
        MonitoringStats.from_dict(json.loads(data)).check_schema(
            [f.name for f in schema.features if f.source != "embedding"])
    except (OSError, KeyError, TypeError, ValueError) as e:
        raise BundleError(f"--monitoring {path}: {e}") from None
    return data


def _sample_monitoring(b: Bundle, sample: str) -> str:
    """monitoring.json text from a development sample (requests JSONL) scored by bundle `b`."""
    from uwrt.runtime.cli.drift import development_stats
    from uwrt.runtime.jsonl import read_jsonl
    from uwrt.runtime.pipeline import Pipeline
    try:
        with open(sample, encoding="utf-8") as fh:
            requests = list(read_jsonl(fh))
        stats = development_stats(Pipeline.from_dir(b.path), requests,
                                  source=f"--monitoring-sample {sample} ({len(requests)} requests)")
    except (OSError, ValueError) as e:
        raise BundleError(f"--monitoring-sample {sample}: {e}") from None
    print(f"monitoring.json from {stats.n} development-sample decisions ({sample})", file=sys.stderr)
    return stats.to_json()


def cmd_inspect(args: argparse.Namespace) -> int:
    """Handler of `uwrt bundle inspect`: verifies, then prints text or (--json) one object."""
    from uwrt.runtime.bundle.bundle import load_bundle  # imported on use: `uwrt --help` stays light
    try:
        b = load_bundle(args.dir, check_trees_with_xgboost=False)
    except BundleError as e:
        if args.json:
            print(json.dumps({"path": str(args.dir), "verified": False, "error": str(e)}))
        return _fail(e)
    print(json.dumps(describe(b), indent=2, sort_keys=True) if args.json else format_text(b))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Handler of `uwrt bundle verify`: 0 verified, 2 failed, 3 not signed by a given key."""
    from uwrt.runtime.bundle.bundle import load_bundle  # imported on use: `uwrt --help` stays light
    try:
        b = load_bundle(args.dir, check_trees_with_xgboost=False, trusted_keys=args.pubkey)
    except BundleError as e:
        return _fail(e)
    print(f"bundle {b.path}: {len(b.manifest['files'])} files match manifest.json, bundle_digest "
          f"{b.bundle_digest}; signature: {b.signature.describe()}")
    if args.pubkey and b.signature.state != "trusted":
        print(f"error: not signed by any of {', '.join(args.pubkey)}", file=sys.stderr)
        return EXIT_NOT_SIGNED
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    """Handler of `uwrt bundle keygen`."""
    from uwrt.runtime.bundle.signing import generate_keypair
    try:
        priv, pub, kid = generate_keypair(args.out, name=args.name, overwrite=args.overwrite)
    except (BundleError, OSError) as e:
        return _fail(e if isinstance(e, BundleError) else BundleError(str(e)))
    print(f"private key  {priv}  (mode 0600: keep it off serving hosts and out of bundles)")
    print(f"public key   {pub}  (give it to servers: trusted_keys)")
    print(f"key id       {kid}")
    return 0


def cmd_sign(args: argparse.Namespace) -> int:
    """Handler of `uwrt bundle sign`."""
    from uwrt.runtime.bundle.bundle import sign_bundle  # imported on use: `uwrt --help` stays light
    try:
        b = sign_bundle(args.dir, args.key)
    except (BundleError, OSError) as e:
        return _fail(e if isinstance(e, BundleError) else BundleError(str(e)))
    print(f"signed bundle {b.path} (bundle_digest {b.bundle_digest}) with key {b.signature.trusted[0]}; "
          f"signers now: {', '.join(b.signature.signers)}")
    return 0


def describe(b: Bundle) -> dict[str, Any]:
    """The JSON form of `inspect`."""
    m = b.manifest
    ident = b.identity()
    return {
        "path": str(b.path), "verified": True,
        "identity": {k: m[k] for k in ("bundle_id", "bundle_digest", "created_at", "created_by",
                                       "format", "format_version")},
        "model_identity": {f.name: getattr(ident, f.name) for f in ident.DESCRIPTOR.fields},
        "components": m["components"], "feature_schema": m["feature_schema"],
        "request_limits": b.schema.limits.to_dict(),
        "request_limits_declared": "limits" in m["feature_schema"],
        "encoder_config": m["encoder_config"], "policy": m["policy"], "files": m["files"],
        "signature": b.signature.to_dict(),
    }


def _schema_rows(b: Bundle) -> list[tuple[str, str, str, str, str]]:
    """(index, name, source, impute, reason); runs of embedding columns become one row."""
    rows, feats, i = [], b.schema.features, 0
    while i < len(feats):
        f, j = feats[i], i + 1
        if f.source == "embedding":
            while (j < len(feats) and feats[j].source == "embedding"
                   and (feats[j].impute_value, feats[j].reason_code) == (f.impute_value, f.reason_code)):
                j += 1
        idx = str(i) if j == i + 1 else f"{i}-{j - 1}"
        name = f.name if j == i + 1 else f"{f.name}..{feats[j - 1].name}"
        rows.append((idx, name, f.source, f"{f.impute_value:g}", f.reason_code or "-"))
        i = j
    return rows


def _table(rows: Sequence[tuple[str, ...]], indent: str = "  ") -> list[str]:
    widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]))]
    return [indent + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def format_text(b: Bundle) -> str:
    """The human form of `inspect`."""
    m, comps = b.manifest, b.manifest["components"]
    enc, trees = comps["encoder"], comps["trees"]
    out = [f"bundle {b.path}",
           f"  id          {b.bundle_id}",
           f"  digest      {b.bundle_digest}",
           f"  created     {m['created_at']} by {m['created_by']}",
           f"  format      {m['format']} v{m['format_version']}",
           "components",
           f"  encoder     {enc['file']}  version {enc['version']}",
           f"  trees       {trees['file']}  version {trees['version']}  "
           f"num_features {trees['num_features']}  objective {trees['objective']}",
           f"feature schema {b.schema.version} ({len(b.schema.features)} columns)"]
    out += _table([("#", "name", "source", "impute", "reason")] + _schema_rows(b))
    lim = b.schema.limits
    declared = "limits" in m["feature_schema"]
    lo, hi = lim.amount_range_minor()
    out += [f"request limits{'' if declared else ' (defaults: the manifest declares none)'}",
            f"  currencies     {', '.join(f'{c} (exponent {e})' for c, e in lim.currencies)}",
            f"  amount         {lim.amount_min_major:g} .. {lim.amount_max_major:g} major units ({lo}..{hi} minor)",
            "  installments   " + ", ".join(f"{p} {a}" if a == z else f"{p} {a}..{z}" for p, a, z in lim.installments),
            f"  as_of          from unix {lim.as_of_min_unix_s} to the server's clock + {lim.as_of_max_future_s} s",
            f"  required       {', '.join(lim.required_features) or '-'}",
            f"  imputation     at most {lim.max_imputed_share:g} of the applicant features"]
    p = b.policy
    out += [f"policy {p.version}",
            f"  APPROVE pd <= {p.approve_max_pd:g}; COUNTEROFFER pd <= {p.counteroffer_max_pd:g} "
            f"(x{p.counteroffer_amount_ratio:g} amount); REVIEW pd <= {p.review_max_pd:g}; else DECLINE",
            f"  score = {p.score_offset:g} + {p.score_pdo:g}/ln2 * ln((1-pd)/pd); "
            f"max_reasons {p.max_reasons}"]
    out += [f"  reason {code}: {text}" for code, text in sorted(p.reason_texts.items())]
    cfg = m["encoder_config"]
    out += [f"encoder config {cfg['version']}",
            "  " + " ".join(f"{k}={v}" for k, v in sorted(cfg.items()) if k != "version"),
            "files"]
    out += _table([(name, f"{e['bytes']:,} B", f"sha256 {e['sha256'][:12]}")
                   for name, e in sorted(m["files"].items())])
    out.append(f"signature   {b.signature.describe()}")
    out.append(f"verification OK: {len(m['files'])} files match manifest.json, no undeclared files, "
               "bundle_digest matches, components fit the schema and config")
    return "\n".join(out)
