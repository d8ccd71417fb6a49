"""`uwrt`: the command line. One subcommand per job; `uwrt <cmd> --help` documents each.

Exit codes: 0 success; 1 some requests were invalid (scored the rest); 2 usage, bundle or
input-file errors (for `serve`: also a bundle whose digest is not `bundle_digest`, or a worker
that loaded another bundle); 3 `serve --profile gpu` on a machine where CUDA is not usable or
the GPU encoder cannot start (`--profile auto` serves the cpu profile instead, logging why);
4 `serve`: the address is in use or cannot be bound; 5 `serve`: a worker failed to start;
6 `serve`: a worker did not drain within the grace period at shutdown.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time

from uwrt.runtime import __version__
from uwrt.runtime.config import RuntimeConfig, knobs
from uwrt.runtime.errors import BundleError

DEFAULT_BUNDLE = "bundles/demo"


def _open_in(path: str):
    """A context manager for reading `path` ('-' = stdin, left open)."""
    return contextlib.nullcontext(sys.stdin) if path == "-" else open(path, encoding="utf-8")


def _open_out(path: str):
    """A context manager for writing `path` ('-' = stdout, left open)."""
    return contextlib.nullcontext(sys.stdout) if path == "-" else open(path, "w", encoding="utf-8")


def cmd_generate(args: argparse.Namespace) -> int:
    from uwrt.demo.synth import generate
    from uwrt.runtime.jsonl import write_jsonl
    t0 = time.perf_counter()
    data = generate(args.n, args.seed, id_prefix=args.id_prefix, drift=args.drift)
    with _open_out(args.out) as fh:
        write_jsonl(data.requests, fh)
    print(f"wrote {args.n} requests (seed {args.seed}) in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return 0


def cmd_build_demo(args: argparse.Namespace) -> int:
    from uwrt.demo.train import DemoConfig, build_demo
    cfg = DemoConfig.preset(args.preset, seed=args.seed, n_applicants=args.n, epochs=args.epochs)
    build_demo(args.out, cfg, overwrite=args.overwrite)
    from uwrt.runtime.pipeline import prepare_bundle_caches
    print(prepare_bundle_caches(args.out), flush=True)
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from uwrt.runtime.errors import InvalidRequest
    from uwrt.runtime.featurize import Limits
    from uwrt.runtime.jsonl import read_jsonl, to_json_line
    from uwrt.runtime.pipeline import Pipeline
    cfg = config_from_args(args)
    cfg.apply_threads()
    pipe = Pipeline.from_dir(args.bundle, limits=Limits(cfg.max_request_events), tree_threads=cfg.tree_threads,
                             config=cfg)
    try:
        with _open_in(args.input) as fh:
            requests = list(read_jsonl(fh))
    except (OSError, ValueError) as e:
        print(f"error: {args.input}: {e}", file=sys.stderr)
        return 2
    n_bad = 0
    t0 = time.perf_counter()
    with _open_out(args.output) as out:
        for s in range(0, len(requests), cfg.score_batch_size):
            chunk = requests[s:s + cfg.score_batch_size]
            for k, res in enumerate(pipe.decide(chunk)):
                if isinstance(res, InvalidRequest):
                    n_bad += 1
                    print(f"error: request {s + k + 1} ({chunk[k].request_id or 'no id'}): {res}", file=sys.stderr)
                else:
                    out.write(to_json_line(res) + "\n")
    dt = time.perf_counter() - t0
    n = len(requests)
    print(f"scored {n - n_bad} of {n} requests in {dt:.2f}s ({n / dt if dt else 0:.0f} requests/s, "
          f"batch {cfg.score_batch_size}, bundle {pipe.identity.bundle_id})", file=sys.stderr)
    return 1 if n_bad else 0


def add_config_flags(p: argparse.ArgumentParser, only: tuple[str, ...] | None = None) -> None:
    """--config FILE plus one flag per RuntimeConfig knob (leaf name, dashes), default None so
    that the file and UWRT_* environment variables apply unless a flag is given."""
    p.add_argument("--config", default=None, help="TOML configuration file (see README: Configuration)")
    g = p.add_argument_group("runtime configuration (defaults: runtime/config.py; README: Configuration)")
    for dotted, typ, default, doc in knobs():
        leaf = dotted.split(".")[-1]
        if only is not None and leaf not in only:
            continue
        conv = (lambda t: tuple(int(x) for x in t.split(","))) if typ not in (int, float, str) else typ
        if typ is bool:  # --require-signature true|false (None = not given, so file/env apply)
            conv = _bool_flag
        g.add_argument("--" + leaf.replace("_", "-"), dest=f"knob_{leaf}", type=conv, default=None,
                       help=f"{doc} (default {default})".replace("%", "%%"))


def _bool_flag(text: str) -> bool:
    v = text.strip().lower()
    if v not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return v in ("1", "true", "yes", "on")


def config_from_args(args: argparse.Namespace) -> RuntimeConfig:
    over = {k[len("knob_"):]: v for k, v in vars(args).items() if k.startswith("knob_")}
    return RuntimeConfig.load(getattr(args, "config", None), **over)


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio
    import os

    from uwrt.runtime.profiles import ProfileUnavailable, load_config
    from uwrt.runtime.serving import ports, supervisor, workers
    over = {k[len("knob_"):]: v for k, v in vars(args).items() if k.startswith("knob_")}
    try:
        resolved = load_config(getattr(args, "config", None), **over)   # defaults < profile < file < env < flags
    except ProfileUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    cfg = resolved.config
    plan = workers.plan_workers(cfg)
    print(f"profile {cfg.profile} ({resolved.reason}); encoder {cfg.encoder_backend} on {cfg.encoder_device}; "
          f"{plan.describe()}", file=sys.stderr, flush=True)
    try:     # before anything slow: an occupied port fails at once (exit 4)
        held = ports.reserve(cfg.host, cfg.port) if plan.count > 1 else None
        if held is None and cfg.port:
            ports.check_free(cfg.host, cfg.port)
    except ports.PortUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 4
    if cfg.metrics_port:     # the metrics endpoint's port, as early (runtime/serving/metrics.py)
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)     # uwrt manages its own (several workers)
        from uwrt.runtime.serving.metrics import check_port
        try:
            check_port(cfg.metrics_host or cfg.host, cfg.metrics_port)
        except ports.PortUnavailable as e:
            if held is not None:
                held.close()
            print(f"error: {e}", file=sys.stderr)
            return 4
    bundle = cfg.bundle or DEFAULT_BUNDLE
    if not cfg.bundle and not os.path.exists(os.path.join(bundle, "manifest.json")):
        from uwrt.demo.train import DemoConfig, build_demo
        print(f"no bundle given and {bundle} does not exist: building the demo bundle first (~3 min)",
              file=sys.stderr, flush=True)
        build_demo(bundle, DemoConfig.preset("full"))
    if held is not None:     # runtime/serving/supervisor.py: N pinned worker processes on the held port
        return supervisor.serve_workers(cfg, bundle, plan, held, profile_reason=resolved.reason,
                                        log_level=logging.getLogger().level)
    from uwrt.runtime.serving.server import build_pipeline, serve
    if plan.cpus[0] is not None:     # pin_workers = "on" with one worker: this process, before its threads start
        os.sched_setaffinity(0, {plan.cpus[0]})
        cfg = workers.pinned_config(cfg)[0]
    try:
        pipe = build_pipeline(cfg, bundle)
    except (ImportError, RuntimeError, OSError) as e:
        if cfg.encoder_device == "cpu":
            raise
        why = f"{type(e).__name__}: {e}"
        if resolved.requested != "auto":     # an explicit gpu request never silently serves on CPU
            print(f"error: the {cfg.profile} profile's encoder ({cfg.encoder_backend} on {cfg.encoder_device}) "
                  f"cannot start: {why}", file=sys.stderr)
            return 3
        logging.getLogger("uwrt.profiles").error("auto: the GPU encoder cannot start (%s); serving the cpu profile",
                                                 why)
        resolved = load_config(getattr(args, "config", None), **{**over, "profile": "cpu"})
        cfg, reason = resolved.config, f"auto: GPU usable but its encoder failed to start ({why}); cpu profile"
        pipe = build_pipeline(cfg, bundle)
    else:
        reason = resolved.reason
    if cfg.bundle_digest and not workers.digest_matches(cfg.bundle_digest, pipe.identity.bundle_digest):
        print(f"error: {bundle} has bundle digest {pipe.identity.bundle_digest[:12]}, but bundle_digest = "
              f"{cfg.bundle_digest} is required", file=sys.stderr)
        return 2
    try:
        return asyncio.run(serve(pipe, cfg, profile=cfg.profile, profile_reason=reason, pinned_cpu=plan.cpus[0]))
    except ports.PortUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 4


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="uwrt", description="uwrt: low-latency credit-underwriting inference runtime")
    p.add_argument("--version", action="version", version=f"uwrt {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    g = sub.add_parser("generate", help="write synthetic DecisionRequests as JSON lines",
                       description="Seeded synthetic applicants as DecisionRequest JSON lines "
                                   "(protobuf JSON mapping), the request format every command accepts.")
    g.add_argument("--n", type=int, default=100, help="number of requests (default 100)")
    g.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    g.add_argument("--id-prefix", default="app-", help="request id prefix (default 'app-')")
    g.add_argument("--out", default="-", help="output file (default: stdout)")
    g.add_argument("--drift", type=float, default=0.0,
                   help="shift of the applicants' mean latent risk, in standard deviations, growing from 0 at the "
                        "earliest as_of to DRIFT at the latest (mean shift DRIFT/2): a riskier mix on purpose, e.g. "
                        "to see `uwrt drift` and the server's PSI gauges move (default 0: the training population)")
    g.set_defaults(func=cmd_generate)

    b = sub.add_parser("build-demo", help="train the demo model and write a bundle",
                       description="Generate synthetic applicants, train the sequence encoder and the XGBoost "
                                   "stage (plus controls), and write a verified model bundle with a model card.")
    b.add_argument("--out", required=True, help="bundle directory to create")
    b.add_argument("--preset", choices=["full", "small"], default="full",
                   help="'full' (default, ~3 min on 2 cores) or 'small' (seconds; for tests)")
    b.add_argument("--seed", type=int, default=None, help="random seed (default: the preset's)")
    b.add_argument("--n", type=int, default=None, help="applicants to generate (default: the preset's)")
    b.add_argument("--epochs", type=int, default=None, help="encoder epochs (default: the preset's)")
    b.add_argument("--overwrite", action="store_true", help="replace an existing bundle directory")
    b.set_defaults(func=cmd_build_demo)

    s = sub.add_parser("score", help="score requests offline with a bundle",
                       description="Score DecisionRequest JSON lines with a bundle; print one DecisionResponse "
                                   "JSON line per valid request. Invalid requests are reported on stderr "
                                   "(exit 1); a bundle that fails verification exits 2.")
    s.add_argument("--bundle", required=True, help="bundle directory")
    s.add_argument("--input", required=True, help="requests JSONL ('-' for stdin)")
    s.add_argument("--output", default="-", help="responses JSONL (default: stdout)")
    add_config_flags(s, only=("score_batch_size", "torch_threads", "tree_threads", "max_request_events",
                                "encoder_backend", "onnx_attention", "onnx_optimization", "onnx_intra_op_threads",
                                "tree_path", "tree_cache_dir", "reasons_path"))
    s.set_defaults(func=cmd_score)

    v = sub.add_parser("serve", help="run the gRPC decision server",
                       description="Serve Underwriting (Decide, DecideStream, GetModelInfo) with dynamic batching, "
                                   "grpc.health.v1 and reflection. Serves --bundle, or the demo bundle at "
                                   f"{DEFAULT_BUNDLE} (built on first use). SIGTERM/SIGINT drain and exit 0.")
    add_config_flags(v)
    v.set_defaults(func=cmd_serve)

    from uwrt.runtime.cli import decide
    decide.register(sub)

    from uwrt.runtime.cli import bundle as bundle_cli
    bundle_cli.register(sub)

    from uwrt.runtime.cli import drift as drift_cli
    drift_cli.register(sub)

    from uwrt.bench import loadgen  # `uwrt bench`: the load generator (bench/loadgen/)
    loadgen.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return args.func(args)
    except BundleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
