"""`uwrt`: the command line. One subcommand per job; `uwrt <cmd> --help` documents each.

Exit codes: 0 success; 1 some requests were invalid (scored the rest); 2 usage, bundle or
input-file errors (for `serve`: also a bundle whose digest is not `bundle_digest`, or a worker
that loaded another bundle); 3 `serve --profile gpu` on a machine where CUDA is not usable or
the GPU encoder cannot start (`--profile auto` serves the cpu profile instead, logging why);
4 `serve`: the address is in use or cannot be bound; 5 `serve`: a worker failed to start;
6 `serve`: a worker did not drain within the grace period at shutdown.

Start-up cost: only the chosen command's parser is built (`COMMANDS` names where each one
lives) and every heavy import (torch, ONNX Runtime, xgboost, grpc, numpy) happens inside the
command that needs it, so `uwrt --help`, `decide`, `generate`, `bench` and `bundle inspect`
never import torch, ONNX Runtime or xgboost (tests/runtime/cli/test_startup.py).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from uwrt.runtime import __version__

if TYPE_CHECKING:
    from uwrt.runtime.config import RuntimeConfig

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
    cfg = DemoConfig.preset(args.preset, seed=args.seed, n_applicants=args.n, epochs=args.epochs,
                            controls=True if args.with_controls else None)
    build_demo(args.out, cfg, overwrite=args.overwrite)
    from uwrt.runtime.pipeline import prepare_bundle_caches
    print(prepare_bundle_caches(args.out), flush=True)
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from uwrt.runtime.cli.table import format_decisions
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
    table = args.output == "-" and not args.json          # a person at stdout: the same table as `uwrt decide`
    decided = []
    with _open_out(args.output) as out:
        for s in range(0, len(requests), cfg.score_batch_size):
            chunk = requests[s:s + cfg.score_batch_size]
            for k, res in enumerate(pipe.decide(chunk)):
                if isinstance(res, InvalidRequest):
                    n_bad += 1
                    print(f"error: request {s + k + 1} ({chunk[k].request_id or 'no id'}): {res}", file=sys.stderr)
                elif table:
                    decided.append(res)
                else:
                    out.write(to_json_line(res) + "\n")
        if table:
            out.write("\n".join(format_decisions(decided, times=False)) + "\n")
    dt = time.perf_counter() - t0
    n = len(requests)
    print(f"scored {n - n_bad} of {n} requests in {dt:.2f}s ({n / dt if dt else 0:.0f} requests/s, "
          f"batch {cfg.score_batch_size}, bundle {pipe.identity.bundle_id})", file=sys.stderr)
    return 1 if n_bad else 0


def add_config_flags(p: argparse.ArgumentParser, only: tuple[str, ...] | None = None) -> None:
    """--config FILE plus one flag per RuntimeConfig knob (leaf name, dashes), default None so
    that the file and UWRT_* environment variables apply unless a flag is given."""
    from uwrt.runtime.config import knobs
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
    from uwrt.runtime.config import RuntimeConfig
    over = {k[len("knob_"):]: v for k, v in vars(args).items() if k.startswith("knob_")}
    return RuntimeConfig.load(getattr(args, "config", None), **over)


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio

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
    # load_config logged the profile and why it was picked
    logging.getLogger("uwrt.cli").info("encoder %s on %s; %s", cfg.encoder_backend, cfg.encoder_device,
                                       plan.describe())
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
        logging.getLogger("uwrt.cli").info("no bundle given and %s does not exist: building the demo bundle first "
                                           "(default preset, well under a minute on 2 cores)", bundle)
        build_demo(bundle, DemoConfig.preset("default"))
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
        return asyncio.run(serve(pipe, cfg, profile=cfg.profile, profile_reason=reason, pinned_cpu=plan.cpus[0],
                                 bundle_path=bundle))
    except ports.PortUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 4


def _add_generate(sub) -> None:
    g = sub.add_parser("generate", help=COMMANDS["generate"][0],
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


def _add_build_demo(sub) -> None:
    b = sub.add_parser("build-demo", help=COMMANDS["build-demo"][0],
                       description="Generate synthetic applicants, train the sequence encoder and the XGBoost "
                                   "stage (and the tabular-only baseline it is measured against), and write a "
                                   "verified model bundle with a model card. Progress bars on a terminal, one "
                                   "log line per step always. Presets: 'default' (what `make serve` builds, "
                                   "8,000 applicants and 4 epochs: well under a minute on 2 cores), 'full' "
                                   "(20,000 applicants, 6 epochs, with the shuffled-event-order control: the "
                                   "model card's evidence, ~2 min on 2 cores), 'small' (seconds; for tests).")
    b.add_argument("--out", required=True, help="bundle directory to create")
    b.add_argument("--preset", choices=["default", "full", "small"], default="default",
                   help="'default', 'full' (with the controls) or 'small' (default: 'default')")
    b.add_argument("--with-controls", action="store_true",
                   help="also train the shuffled-event-order control (a second encoder: about twice the "
                        "training time); the model card then says whether the encoder's gain comes from the "
                        "order and timing of events. Implied by --preset full")
    b.add_argument("--seed", type=int, default=None, help="random seed (default: the preset's)")
    b.add_argument("--n", type=int, default=None, help="applicants to generate (default: the preset's)")
    b.add_argument("--epochs", type=int, default=None, help="encoder epochs (default: the preset's)")
    b.add_argument("--overwrite", action="store_true", help="replace an existing bundle directory")
    b.set_defaults(func=cmd_build_demo)


def _add_score(sub) -> None:
    s = sub.add_parser("score", help=COMMANDS["score"][0],
                       description="Score DecisionRequest JSON lines with a bundle and print the decisions as a "
                                   "table (the same as `uwrt decide`), or as DecisionResponse JSON lines with "
                                   "--json or --output FILE. Invalid requests are reported on stderr "
                                   "(exit 1); a bundle that fails verification exits 2.")
    s.add_argument("--bundle", required=True, help="bundle directory")
    s.add_argument("--input", required=True, help="requests JSONL ('-' for stdin)")
    s.add_argument("--output", default="-", help="write DecisionResponse JSON lines to this file (default: stdout)")
    s.add_argument("--json", action="store_true", help="print DecisionResponse JSON lines instead of a table")
    add_config_flags(s, only=("score_batch_size", "torch_threads", "tree_threads", "max_request_events",
                                "encoder_backend", "onnx_attention", "onnx_optimization", "onnx_intra_op_threads",
                                "tree_path", "tree_cache_dir", "reasons_path"))
    s.set_defaults(func=cmd_score)


def _add_serve(sub) -> None:
    v = sub.add_parser("serve", help=COMMANDS["serve"][0],
                       description="Serve Underwriting (Decide, DecideStream, GetModelInfo) with dynamic batching, "
                                   "grpc.health.v1 (reflection with --reflection true). Serves --bundle, or the demo "
                                   f"bundle at {DEFAULT_BUNDLE} (built on first use). SIGTERM/SIGINT drain and exit 0.")
    add_config_flags(v)
    v.set_defaults(func=cmd_serve)


#: Every subcommand: name -> (its one-line help, "module:function" that adds its parser). Only the
#: chosen command's module is imported (the others appear in `uwrt --help` by name and help only).
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("write synthetic DecisionRequests as JSON lines", "uwrt.runtime.cli.main:_add_generate"),
    "build-demo": ("train the demo model and write a bundle", "uwrt.runtime.cli.main:_add_build_demo"),
    "score": ("score requests offline with a bundle", "uwrt.runtime.cli.main:_add_score"),
    "serve": ("run the gRPC decision server", "uwrt.runtime.cli.main:_add_serve"),
    "decide": ("send requests to a running server and print decisions", "uwrt.runtime.cli.decide:register"),
    "bundle": ("build, inspect, verify and sign model bundles", "uwrt.runtime.cli.bundle:register"),
    "bench": ("load-test a running server (open/closed loop, sweeps, p99 search)", "uwrt.bench.loadgen:register"),
    "proto": ("write the API's .proto and a descriptor set for clients in other languages",
              "uwrt.runtime.cli.proto:register"),
    "audit": ("verify, show and replay the decision log", "uwrt.runtime.cli.audit:register"),
    "drift": ("PSI of a request file against the bundle's development sample", "uwrt.runtime.cli.drift:register"),
}


def _chosen_command(argv: Sequence[str]) -> str | None:
    """The subcommand named in argv (the first word that is not an option: the top-level options
    take no values)."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The `uwrt` parser. With `argv`, only the command it names gets its full parser (the
    others a name-and-help stub, enough for `uwrt --help`); without, every command in full."""
    p = argparse.ArgumentParser(prog="uwrt", description="uwrt: low-latency credit-underwriting inference runtime")
    p.add_argument("--version", action="version", version=f"uwrt {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = None if argv is None else _chosen_command(argv)
    for name, (help_line, where) in COMMANDS.items():
        if argv is None or name == chosen:
            module, func = where.split(":")
            getattr(importlib.import_module(module), func)(sub)
        else:
            sub.add_parser(name, help=help_line, add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    global _command
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    _command = args.command
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        errors = sys.modules.get("uwrt.runtime.errors")     # not imported: cannot be a BundleError
        if errors is not None and isinstance(e, errors.BundleError):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise


_command: str | None = None


def entry() -> None:
    """The `uwrt` console script (and `python -m uwrt.runtime.cli`): main(), then exit. After
    `uwrt serve` has drained, the process exits at once with its output flushed: tearing the
    interpreter down (collecting the model's large heap) took 3-6 s, during which the closed
    port's connections stayed open with nobody answering them."""
    code = main()
    if _command == "serve":
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
