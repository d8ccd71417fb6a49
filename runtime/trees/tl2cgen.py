"""XGBoost Booster -> Treelite model -> TL2cgen C -> cached shared library, behind a parity gate.

Steps (each a function, `compile_tl2cgen` chains them)::

    to_treelite(booster)                     treelite.frontend.from_xgboost_ubjson (treelite >= 4.6.1:
                                             older ones misread xgboost >= 3.1 models, see notes)
    tl2cgen.annotate_branch(training rows)   optional: branch frequencies -> LIKELY/UNLIKELY hints
    tl2cgen.generate_c_code(params)          parallel_comp ~= num_trees / 30 (gcc slows sharply on
                                             huge functions); quantize off by default (below)
    + tl2cgen_batch.c                        our entry point `uwrt_predict_batch` (next to this module)
    native_cache.build_shared_library        keyed by model sha256 + generator options + compiler

`uwrt_predict_batch(const float* rows, int64 n, int32 f, double* out)` loops over the rows in
C: per row it builds a private `union Entry` scratch row (NaN -> `missing = -1`, the only
missing marker the generated code understands; the quantize build rewrites this scratch, never
the caller's rows), zeroes the accumulator (the generated `predict` adds into it) and stores
the margin (base score included, no sigmoid). No global state: thread safe, and ctypes
releases the GIL for the call.

quantize=1 is off by default: on the demo model (300 trees, depth 4, 53 features) it measured
slower (b=1 11.6 vs 7.2 us, b=64 359 vs 317 us: binary-searching 53 features costs more than it
saves), and tl2cgen 1.0.0 prints the quantization thresholds with 8 significant digits, which
does not round-trip float32: a value exactly at a split threshold can land in the wrong bin
(4 of 518 golden rows off by up to 0.019 in probability). The parity gate rejects such a build.

`parity_check` compares any margin function with xgboost on a golden set (`golden_rows`:
random values, split thresholds and their float neighbours, NaN, +-inf, +-1e30, +-3e38,
all-missing rows) and raises `TreeCompileError` past 1e-6 in probability; `compile_tl2cgen`
always runs it before returning, so a library that disagrees with xgboost is never handed out.

Thread safety: the functions are safe to call concurrently (compiles of one model serialise on
the cache's per-key lock); tl2cgen's annotate/generate are only called on a cache miss.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import math
import os
import pathlib
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from uwrt.runtime.errors import BackendError
from uwrt.runtime.trees.base import check_rows
from uwrt.runtime.trees.cache import DEFAULT_CFLAGS, CachedLibrary, NativeBuildError, build_shared_library

__all__ = ["GENERATOR_VERSION", "PROB_TOL", "TreeCompileError", "CompiledLibrary", "model_digest",
           "to_treelite", "tl2cgen_params", "compile_tl2cgen", "golden_rows", "parity_check",
           "xgboost_margin", "compile_bundle_cache"]

log = logging.getLogger("uwrt.trees")

#: In the cache key (with tl2cgen_batch.c's digest): bump when the way sources are generated changes.
GENERATOR_VERSION = "uwrt-tl2cgen-batch-1"
#: Max |sigmoid(compiled) - sigmoid(xgboost)| the parity gate accepts.
PROB_TOL = 1e-6
TREES_PER_UNIT = 30

#: Our batch entry point `uwrt_predict_batch`, compiled with TL2cgen's generated sources (package data).
BATCH_C_PATH = pathlib.Path(__file__).with_name("tl2cgen_batch.c")


class TreeCompileError(BackendError):
    """Compiling the tree model failed, or the compiled code disagrees with xgboost."""


@dataclass(frozen=True)
class CompiledLibrary:
    """A parity-checked compiled tree library: `cached` (path, key, meta, CDLL, cache_dir,
    built), the tl2cgen `params` used, and the gate's `parity` report."""
    cached: CachedLibrary
    num_features: int
    params: dict
    parity: dict = field(default_factory=dict)
    compile_s: float = 0.0


def model_digest(booster) -> str:
    """sha256 of the booster's UBJSON (deterministic: equals the bundle's trees.ubj digest)."""
    return hashlib.sha256(bytes(booster.save_raw("ubj"))).hexdigest()


def to_treelite(booster):
    """Booster -> treelite.Model via UBJSON (no temp files)."""
    import treelite
    try:
        return treelite.frontend.from_xgboost_ubjson(bytearray(booster.save_raw("ubj")))
    except Exception as e:  # treelite.TreeliteError and friends
        raise TreeCompileError(f"treelite cannot import the xgboost model: {e}") from e


def tl2cgen_params(num_trees: int, *, quantize: bool = False, parallel_comp: int | None = None) -> dict:
    """generate_c_code params: quantize, and parallel_comp ~= one unit per 30 trees (None: auto)."""
    params: dict = {}
    if quantize:
        params["quantize"] = 1
    units = parallel_comp if parallel_comp is not None else min(64, math.ceil(num_trees / TREES_PER_UNIT))
    if units > 1:
        params["parallel_comp"] = int(units)
    return params


def _generate(tl_model, params: dict, training_rows: np.ndarray | None, progress: Callable[[str], None]) -> dict:
    import tl2cgen
    with tempfile.TemporaryDirectory(prefix="uwrt-tl2cgen-") as tmp:
        p = dict(params)
        if training_rows is not None:
            t0 = time.monotonic()
            ann = os.path.join(tmp, "annotation.json")
            tl2cgen.annotate_branch(tl_model, tl2cgen.DMatrix(np.ascontiguousarray(training_rows, np.float32)),
                                    ann, nthread=1)
            p["annotate_in"] = ann
            progress(f"annotated branches on {len(training_rows)} rows in {time.monotonic() - t0:.1f} s")
        out = pathlib.Path(tmp) / "src"
        tl2cgen.generate_c_code(tl_model, out, p)
        sources = {f.name: f.read_bytes() for f in sorted(out.iterdir())
                   if f.suffix in (".c", ".h")}
    if "header.h" not in sources or "main.c" not in sources:
        raise TreeCompileError(f"tl2cgen generated unexpected files: {sorted(sources)}")
    if "uwrt_batch.c" in sources:
        raise TreeCompileError("tl2cgen generated a file named uwrt_batch.c; rename ours")
    sources["uwrt_batch.c"] = BATCH_C_PATH.read_bytes()
    return sources


def compile_tl2cgen(booster, cache_dirs: Iterable[str | os.PathLike], *, training_rows: np.ndarray | None = None,
                    quantize: bool = False, parallel_comp: int | None = None,
                    cflags: Iterable[str] = DEFAULT_CFLAGS, progress: Callable[[str], None] | None = None,
                    golden: np.ndarray | None = None, check_parity: bool = True) -> CompiledLibrary:
    """Compile (or load from cache) the booster's TL2cgen library and gate it on parity.

    Shortcut for: `to_treelite` -> (`tl2cgen.annotate_branch` on `training_rows`) ->
    `tl2cgen.generate_c_code(tl2cgen_params(...))` + tl2cgen_batch.c -> `build_shared_library` ->
    `parity_check` on `golden` (default `golden_rows(booster)`). The cache key holds the
    model digest, the training rows' digest, the params and GENERATOR_VERSION, so a hit skips
    generation and annotation entirely. Raises TreeCompileError (conversion, compile, or
    parity failure). Thread safe.
    """
    import tl2cgen
    import treelite
    progress = progress or (lambda msg: log.info("%s", msg))
    t0 = time.monotonic()
    num_trees = booster.num_boosted_rounds()
    params = tl2cgen_params(num_trees, quantize=quantize, parallel_comp=parallel_comp)
    rows_digest = "none"
    if training_rows is not None:
        training_rows = np.ascontiguousarray(training_rows, np.float32)
        rows_digest = hashlib.sha256(training_rows.tobytes() + str(training_rows.shape).encode()).hexdigest()
    key_parts = {"model_sha256": model_digest(booster), "generator": GENERATOR_VERSION,
                 "batch_c_sha256": hashlib.sha256(BATCH_C_PATH.read_bytes()).hexdigest(),
                 "tl2cgen": tl2cgen.__version__, "treelite": treelite.__version__,
                 "params": json.dumps(params, sort_keys=True), "annotation_rows_sha256": rows_digest}
    try:
        cached = build_shared_library(
            "trees_tl2cgen", lambda: _generate(to_treelite(booster), params, training_rows, progress), key_parts,
            cache_dirs, cflags=cflags, progress=progress)
    except NativeBuildError as e:
        raise TreeCompileError(f"compiling the tree model failed: {e}") from e
    lib = CompiledLibrary(cached=cached, num_features=booster.num_features(), params=params,
                          compile_s=time.monotonic() - t0)
    if not check_parity:
        return lib
    report = parity_check(CompiledTreeStage(lib).predict_margin, booster, golden, what=f"tl2cgen {cached.path}")
    return CompiledLibrary(cached=cached, num_features=lib.num_features, params=params, parity=report,
                           compile_s=lib.compile_s)


class CompiledTreeStage:
    """Direct ctypes call into the compiled library's `uwrt_predict_batch`. Thread safe."""

    def __init__(self, lib: CompiledLibrary, *, name: str = "tl2cgen") -> None:
        self.name = name
        self.lib = lib
        self.num_features = lib.num_features
        cdll = lib.cached.lib
        try:
            fn = cdll.uwrt_predict_batch
            nf = cdll.get_num_feature
        except AttributeError as e:
            raise TreeCompileError(f"{lib.cached.path}: not a uwrt tree library ({e})") from e
        nf.restype = ctypes.c_int32
        nf.argtypes = []
        if nf() != self.num_features:
            raise TreeCompileError(f"{lib.cached.path}: library has {nf()} features, model {self.num_features}")
        fn.restype = ctypes.c_int32
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p]
        self._fn = fn

    def predict_margin(self, rows: np.ndarray) -> np.ndarray:
        rows = check_rows(rows, self.num_features)
        n = rows.shape[0]
        out = np.empty(n, np.float64)
        if n:
            rc = self._fn(rows.ctypes.data, n, self.num_features, out.ctypes.data)
            if rc != 0:
                raise BackendError(f"compiled tree stage: uwrt_predict_batch returned {rc}")
        return out

    def describe(self) -> dict:
        c = self.lib.cached
        return {"name": self.name, "library": str(c.path), "cache_dir": str(c.cache_dir), "key": c.key[:16],
                "built": c.built, "params": self.lib.params, "parity": self.lib.parity}


# ------------------------------------------------------------------------------------------
# parity gate

def _split_thresholds(booster) -> dict[int, np.ndarray]:
    """feature index -> sorted unique float32 split thresholds (numerical splits)."""
    model = json.loads(bytes(booster.save_raw("json")))
    per: dict[int, list] = {}
    for tree in model["learner"]["gradient_booster"]["model"]["trees"]:
        left = tree["left_children"]
        for i, (f, c) in enumerate(zip(tree["split_indices"], tree["split_conditions"], strict=True)):
            if left[i] != -1:
                per.setdefault(int(f), []).append(c)
    return {f: np.unique(np.asarray(v, np.float32)) for f, v in per.items()}


def golden_rows(booster, n_random: int = 512, *, seed: int = 20261125) -> np.ndarray:
    """A deterministic golden set [n, F] float32 for the parity gate: per cell a split threshold
    of that feature, its float neighbours, a wide normal value, NaN (missing), +-inf, +-1e30,
    +-3e38 or +-0; plus all-missing, all +inf, all -inf and all-huge rows."""
    rng = np.random.default_rng(seed)
    nf = booster.num_features()
    thr = _split_thresholds(booster)
    x = (rng.standard_normal((n_random, nf)) * rng.choice([1.0, 10.0, 1e4], size=(n_random, 1))).astype(np.float32)
    kind = rng.random((n_random, nf))
    for f in range(nf):
        t = thr.get(f)
        if t is None or t.size == 0:
            continue
        pick = t[rng.integers(0, t.size, n_random)]
        col = x[:, f]
        col[kind[:, f] < 0.25] = pick[kind[:, f] < 0.25]
        m = (kind[:, f] >= 0.25) & (kind[:, f] < 0.35)
        col[m] = np.nextafter(pick[m], np.float32(-np.inf))
        m = (kind[:, f] >= 0.35) & (kind[:, f] < 0.45)
        col[m] = np.nextafter(pick[m], np.float32(np.inf))
    specials = np.array([np.nan, np.inf, -np.inf, 1e30, -1e30, 3e38, -3e38, 0.0, -0.0], np.float32)
    m = kind >= 0.70
    x[m] = specials[rng.integers(0, specials.size, int(m.sum()))]
    x[kind >= 0.85] = np.nan  # extra missing
    fixed = np.stack([np.full(nf, np.nan, np.float32), np.full(nf, np.inf, np.float32),
                      np.full(nf, -np.inf, np.float32), np.full(nf, 3e38, np.float32),
                      np.full(nf, -3e38, np.float32), np.full(nf, np.nan, np.float32)])
    return np.ascontiguousarray(np.concatenate([x, fixed]), np.float32)


def xgboost_margin(booster, rows: np.ndarray) -> np.ndarray:
    """The reference: xgboost inplace_predict margins (float64), NaN = missing."""
    return np.asarray(booster.inplace_predict(rows, predict_type="margin", missing=np.nan),
                      np.float64).reshape(-1)


def _sigmoid(m: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-m))


def parity_check(predict_margin: Callable[[np.ndarray], np.ndarray], booster, rows: np.ndarray | None = None,
                 *, tol_prob: float = PROB_TOL, what: str = "tree stage") -> dict:
    """Compare `predict_margin(rows)` with xgboost; raise TreeCompileError if any probability
    differs by more than `tol_prob` (or a margin is NaN where xgboost's is not). Returns
    {"rows", "max_prob_diff", "max_margin_diff"}. Also checks the input was not mutated."""
    rows = golden_rows(booster) if rows is None else np.ascontiguousarray(rows, np.float32)
    before = rows.copy()
    try:
        got = np.asarray(predict_margin(rows), np.float64).reshape(-1)
    except Exception as e:
        raise TreeCompileError(f"parity gate: {what} raised {type(e).__name__}: {e}") from e
    if not np.array_equal(before, rows, equal_nan=True):
        raise TreeCompileError(f"parity gate: {what} mutated its input rows")
    want = xgboost_margin(booster, rows)
    if got.shape != want.shape:
        raise TreeCompileError(f"parity gate: {what} returned shape {got.shape}, expected {want.shape}")
    pd = np.abs(_sigmoid(got) - _sigmoid(want))
    md = np.abs(got - want)
    bad = ~(pd <= tol_prob)  # NaN counts as bad
    report = {"rows": int(rows.shape[0]),  # NaN (a broken stage) reports as inf
              "max_prob_diff": float(np.nan_to_num(pd, nan=np.inf).max()) if pd.size else 0.0,
              "max_margin_diff": float(np.nan_to_num(md, nan=np.inf).max()) if md.size else 0.0}
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise TreeCompileError(
            f"parity gate failed for {what}: {int(bad.sum())}/{rows.shape[0]} rows differ from xgboost by more "
            f"than {tol_prob:g} in probability (max {report['max_prob_diff']:.3g}); first at row {i}: "
            f"margin {got[i]!r} vs xgboost {want[i]!r}")
    return report


# ------------------------------------------------------------------------------------------
# build-time hook

def compile_bundle_cache(bundle, *, training_rows: np.ndarray | None = None,
                         progress: Callable[[str], None] | None = None, **kw) -> CompiledLibrary:
    """Compile a bundle's trees into its `cache/native/` (user cache if the bundle is read-only)
    at build time, so the first `uwrt serve` starts warm. For `uwrt build-demo` / `bundle create`.
    Raises TreeCompileError."""
    from uwrt.runtime.trees.base import load_booster
    from uwrt.runtime.trees.cache import default_cache_dirs
    booster = load_booster(bundle.tree_model_bytes(), nthread=1)
    return compile_tl2cgen(booster, default_cache_dirs(bundle.path), training_rows=training_rows,
                           progress=progress, **kw)
