"""Our own compiled tree layout and exact TreeSHAP, generated as C from xgboost's JSON model.

`build_native(booster, cache_dirs)` parses `booster.save_raw("json")`, generates a C header
(`uwrt_model.h`) holding the model as constant arrays, compiles it with the fixed runtime in
`native_runtime.c` (next to this module) into a shared library
that needs only libc/libm (cached on disk by source, compiler and flags), checks it against
xgboost on a golden set and returns `(NativeTreeStage, NativeExplainer)`.

Semantics are xgboost's (checked by the golden-set gate and tests/runtime/trees/test_native.py): a split
sends a row left when `x < threshold` in float32, NaN follows the node's default direction,
+-inf are ordinary values (+inf right, -inf left). Margins accumulate in float32 in tree order
starting from the base margin, as xgboost's CPU predictor does, so they match it bit for bit.

Layout: a tree of depth D <= `max_padded_depth` is padded to a complete binary tree (a shallow
leaf is copied into every slot below it), so a walk is exactly D steps of
`pos = 2*pos + 1 + go_right` with no leaf test; the C loop is tree-major over a block of rows
and steps all rows of the block level by level (independent loads overlap). Deeper trees are
walked node by node. Exact TreeSHAP is Lundberg et al. 2018, Algorithm 2 (path EXTEND/UNWIND,
cover = xgboost's `sum_hessian`), accumulated in double; bias column = base margin + the
cover-weighted mean of every tree. Since a leaf's path is fixed and only its one-fractions
(0/1) depend on the row, `NativeExplainer` by default precomputes every leaf's contributions for
all 2^k hot/cold patterns with that same code (a float32 table, capped by
`SHAP_TABLE_MAX_BYTES`) and a row then costs one pass over the splits; the plain recursion is
kept as the fallback for big tables and as a second tested path.

Thread safety: the generated library has no mutable global state (scratch lives on the stack),
and ctypes releases the GIL for each call, so both classes are safe to call from several threads.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import math
import os
import pathlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from uwrt.runtime.trees.cache import CachedLibrary, build_shared_library

log = logging.getLogger("uwrt.trees")

#: Objectives whose base_score (xgboost 3.x stores it in output space) we can map to a margin.
_LINKS = {"binary:logistic": "logit", "reg:logistic": "logit", "binary:logitraw": "identity",
          "reg:squarederror": "identity"}
CFLAGS = ("-O3", "-fPIC", "-std=c99", "-fno-strict-aliasing")  # no -ffast-math: NaN tests matter
MARGIN_TOL = 1e-6    # max |probability| (and margin) difference to xgboost in the golden gate
SHAP_TOL = 1e-5      # max elementwise contribution difference to xgboost pred_contribs


class UnsupportedTreeModel(ValueError):
    """The xgboost model uses something the native path does not implement."""


class NativeParityError(RuntimeError):
    """The compiled library disagrees with xgboost on the golden set."""


@dataclass
class Tree:
    """One tree in xgboost's node numbering; leaves have left == -1 and `value` set."""
    left: np.ndarray       # int32 [N]
    right: np.ndarray      # int32 [N]
    feature: np.ndarray    # int32 [N]
    threshold: np.ndarray  # float32 [N]  (leaf value at leaves)
    default_left: np.ndarray  # bool [N]
    cover: np.ndarray      # float32 [N]  sum_hessian

    def depth(self) -> int:
        d, stack = 0, [(0, 0)]
        while stack:
            n, k = stack.pop()
            if self.left[n] < 0:
                d = max(d, k)
            else:
                stack += [(int(self.left[n]), k + 1), (int(self.right[n]), k + 1)]
        return d

    def mean_value(self) -> float:
        """Cover-weighted mean leaf value (TreeSHAP's expected value of this tree), in double."""
        def rec(n: int) -> float:
            if self.left[n] < 0:
                return float(self.threshold[n])
            lo, hi = int(self.left[n]), int(self.right[n])
            return (rec(lo) * float(self.cover[lo]) + rec(hi) * float(self.cover[hi])) / float(self.cover[n])
        return rec(0)


@dataclass
class NativeModel:
    num_features: int
    base_score: np.float32  # as stored (output space)
    link: str               # "logit" or "identity": base margin = link(base_score)
    trees: list[Tree]
    objective: str


def _parse_float(s) -> float:
    if isinstance(s, str):
        s = s.strip().strip("[]")
        if "," in s:
            raise UnsupportedTreeModel(f"vector base_score {s!r} (multi-target) is not supported")
    return float(s)


def parse_model(booster) -> NativeModel:
    """The model from xgboost's own JSON; raises UnsupportedTreeModel for anything we don't implement."""
    j = json.loads(bytes(booster.save_raw("json")))
    learner = j["learner"]
    obj = learner["objective"]["name"]
    lmp = learner["learner_model_param"]
    if int(lmp.get("num_class", "0")) > 1 or int(lmp.get("num_target", "1")) != 1:
        raise UnsupportedTreeModel(f"multi-class / multi-target models ({obj}) are not supported")
    if obj not in _LINKS:
        raise UnsupportedTreeModel(f"objective {obj!r} is not supported (supported: {sorted(_LINKS)})")
    gb = learner["gradient_booster"]
    if gb["name"] != "gbtree":
        raise UnsupportedTreeModel(f"booster {gb['name']!r} is not supported (only gbtree; dart has tree weights)")
    model = gb["model"]
    if any(int(t) != 0 for t in model.get("tree_info", [])):
        raise UnsupportedTreeModel("trees for more than one output group are not supported")
    trees = []
    for t in model["trees"]:
        if any(int(s) != 0 for s in t.get("split_type", [])) or t.get("categories_nodes"):
            raise UnsupportedTreeModel(f"tree {t['id']}: categorical splits are not supported")
        if int(t["tree_param"].get("size_leaf_vector", "1")) > 1:
            raise UnsupportedTreeModel(f"tree {t['id']}: vector leaves are not supported")
        tr = Tree(left=np.asarray(t["left_children"], np.int32), right=np.asarray(t["right_children"], np.int32),
                  feature=np.asarray(t["split_indices"], np.int32),
                  threshold=np.asarray(t["split_conditions"], np.float64).astype(np.float32),
                  default_left=np.asarray(t["default_left"], np.int64) != 0,
                  cover=np.asarray(t["sum_hessian"], np.float64).astype(np.float32))
        internal = tr.left >= 0
        if np.isnan(tr.threshold).any():
            raise UnsupportedTreeModel(f"tree {t['id']}: NaN threshold or leaf value")
        if (tr.cover[internal] <= 0).any():
            raise UnsupportedTreeModel(f"tree {t['id']}: non-positive cover at a split (TreeSHAP undefined)")
        trees.append(tr)
    return NativeModel(num_features=int(lmp["num_feature"]), base_score=np.float32(_parse_float(lmp["base_score"])),
                       link=_LINKS[obj], trees=trees, objective=obj)


# ----------------------------------------------------------------------------------------------
# C generation

def _f32(x) -> str:
    x = float(np.float32(x))
    if math.isinf(x):
        return "INFINITY" if x > 0 else "(-INFINITY)"
    return x.hex() + "f"


def _f64(x) -> str:
    return float(x).hex()


def _arr(ctype: str, name: str, items: list[str]) -> str:
    items = items or ["0"]  # C forbids empty arrays
    body = ",".join(items)
    return f"static const {ctype} {name}[{len(items)}] = {{{body}}};\n"


def _leaf_paths(tree: Tree) -> list[tuple[float, list[tuple[int, float]], list[tuple[int, int, int]]]]:
    """Per leaf (DFS order): value, unique path features [(feature, z = product of cover
    fractions)] in first-seen order, and the splits on the way [(node, went_right, slot)]."""
    out = []
    stack: list[tuple[int, list[tuple[int, int, int]]]] = [(0, [])]
    while stack:
        n, conds = stack.pop()
        if tree.left[n] < 0:
            feats: list[int] = []
            z: list[float] = []
            for node, right, _ in conds:
                f = int(tree.feature[node])
                child = int(tree.right[node] if right else tree.left[node])
                frac = float(tree.cover[child]) / float(tree.cover[node])
                if f in feats:
                    z[feats.index(f)] *= frac
                else:
                    feats.append(f)
                    z.append(frac)
            out.append((float(tree.threshold[n]), list(zip(feats, z, strict=True)),
                        [(node, right, feats.index(int(tree.feature[node]))) for node, right, _ in conds]))
            continue
        stack.append((int(tree.right[n]), conds + [(n, 1, 0)]))
        stack.append((int(tree.left[n]), conds + [(n, 0, 0)]))
    return out


def shap_table_bytes(model: NativeModel) -> int:
    """Bytes of the float32 table behind the table-driven TreeSHAP: sum over leaves of 2^k * k * 4."""
    return 4 * sum((1 << len(e)) * len(e) for t in model.trees for _, e, _ in _leaf_paths(t))


def _pad(tree: Tree, depth: int) -> tuple[list[tuple[float, int]], list[float]]:
    """Complete layout of `depth` levels: internal slots (threshold, feature << 1 | default_left), leaves."""
    nodes: list[tuple[float, int]] = [(0.0, 0)] * ((1 << depth) - 1)
    leaves: list[float] = [0.0] * (1 << depth)
    stack = [(0, 0, 0)]  # (xgb node, slot, level)
    while stack:
        n, pos, k = stack.pop()
        if k == depth:
            leaves[pos - len(nodes)] = float(tree.threshold[n])
            continue
        if tree.left[n] < 0:  # shallow leaf: any direction reaches a copy of it
            stack += [(n, 2 * pos + 1, k + 1), (n, 2 * pos + 2, k + 1)]
        else:
            nodes[pos] = (float(tree.threshold[n]), int(tree.feature[n]) << 1 | int(tree.default_left[n]))
            stack += [(int(tree.left[n]), 2 * pos + 1, k + 1), (int(tree.right[n]), 2 * pos + 2, k + 1)]
    return nodes, leaves




def generate_model_header(model: NativeModel, *, block_rows: int = 64, max_padded_depth: int = 8,
                          walk_levels: bool = True) -> str:
    """`uwrt_model.h` for `model`: its sizes as macros and its trees as const arrays, the data
    `native_runtime.c` is compiled against (deterministic: same model and options, same text).

    block_rows: rows per tree-major block; max_padded_depth: deeper trees are walked node by
    node instead of padded (a padded tree has 2^D leaves); walk_levels: step the block's rows
    level by level (True) or finish one row's walk before the next."""
    if not 0 <= max_padded_depth <= 16 or not 1 <= block_rows <= 4096:
        raise ValueError(f"max_padded_depth must be in [0, 16] and block_rows in [1, 4096], "
                         f"got {max_padded_depth}, {block_rows}")
    depths = [t.depth() for t in model.trees]
    p_nodes: list[str] = []
    p_leaves: list[str] = []
    t_pnode: list[int] = []
    t_pleaf: list[int] = []
    t_depth: list[int] = []
    t_root: list[int] = []
    s_left: list[str] = []
    s_right: list[str] = []
    s_fi: list[str] = []
    s_thr: list[str] = []
    s_cover: list[str] = []
    for t, d in zip(model.trees, depths, strict=True):
        off = len(s_left)
        t_root.append(off)
        s_left += [str(int(c) + off if c >= 0 else -1) for c in t.left]
        s_right += [str(int(c) + off if c >= 0 else -1) for c in t.right]
        s_fi += [str(int(f) << 1 | int(dl)) if c >= 0 else "0"
                 for f, dl, c in zip(t.feature, t.default_left, t.left, strict=True)]
        s_thr += [_f32(v) for v in t.threshold]
        s_cover += [_f64(float(c)) for c in t.cover]
        t_pnode.append(len(p_nodes))
        t_pleaf.append(len(p_leaves))
        if d <= max_padded_depth:
            nodes, leaves = _pad(t, d)
            p_nodes += [f"{{{_f32(thr)},{fi}}}" for thr, fi in nodes]
            p_leaves += [_f32(v) for v in leaves]
            t_depth.append(d)
        else:
            t_depth.append(-1)
    t_leaf: list[int] = [0]
    t_nnodes: list[int] = []
    l_coff: list[int] = [0]
    l_value: list[str] = []
    l_k: list[str] = []
    l_eoff: list[str] = []
    l_toff: list[str] = []
    e_feat: list[str] = []
    e_z: list[str] = []
    c_node: list[str] = []
    c_info: list[str] = []
    toff = 0
    for t in model.trees:
        t_nnodes.append(len(t.left))
        for value, elems, conds in _leaf_paths(t):
            l_value.append(_f32(value))
            l_k.append(str(len(elems)))
            l_eoff.append(str(len(e_feat)))
            l_toff.append(str(toff))
            toff += (1 << len(elems)) * len(elems)
            e_feat += [str(f) for f, _ in elems]
            e_z += [_f64(z) for _, z in elems]
            c_node += [str(node) for node, _, _ in conds]
            c_info += [str(slot << 1 | right) for _, right, slot in conds]
            l_coff.append(len(c_node))
        t_leaf.append(len(l_value))
    tree_mean = math.fsum(t.mean_value() for t in model.trees)
    maxd = max(depths, default=0)
    head = [
        f"/* uwrt_model.h, generated by runtime/trees/native.py: {len(model.trees)} trees, "
        f"{model.num_features} features, objective {model.objective}; compiled with native_runtime.c */",
        f"#define NF {model.num_features}", f"#define NT {len(model.trees)}", f"#define BLOCK {int(block_rows)}",
        f"#define MAXD {maxd}", f"#define BASE_SCORE {_f32(model.base_score)}",
        f"#define LINK_LOGIT {1 if model.link == 'logit' else 0}",
        f"#define SHAP_TREE_MEANS {_f64(tree_mean)}", f"#define WALK_LEVELS {1 if walk_levels else 0}",
        "#define INV_TABLE {0.0," + ",".join(_f64(1.0 / i) for i in range(1, maxd + 4)) + "}",
        f"#define NL {len(l_value)}", f"#define MAXNODES {max(t_nnodes, default=1)}", f"#define TABLE_FLOATS {toff}LL",
    ]
    if model.link == "logit" and not (0.0 < float(model.base_score) < 1.0):
        raise UnsupportedTreeModel(f"base_score {model.base_score} is not a probability")
    data = [
        "typedef struct { float thr; int32_t fi; } PNode;  /* fi = feature << 1 | default_left */",
        _arr("int32_t", "T_DEPTH", [str(d) for d in t_depth]), _arr("int32_t", "T_PNODE", [str(v) for v in t_pnode]),
        _arr("int32_t", "T_PLEAF", [str(v) for v in t_pleaf]), _arr("int32_t", "T_ROOT", [str(v) for v in t_root]),
        _arr("PNode", "P_NODES", p_nodes or ["{0.0f,0}"]), _arr("float", "P_LEAF", p_leaves),
        _arr("int32_t", "S_LEFT", s_left), _arr("int32_t", "S_RIGHT", s_right), _arr("int32_t", "S_FI", s_fi),
        _arr("float", "S_THR", s_thr), _arr("double", "S_COVER", s_cover),
        _arr("int32_t", "T_LEAF", [str(v) for v in t_leaf]), _arr("int32_t", "T_NNODES", [str(v) for v in t_nnodes]),
        _arr("float", "L_VALUE", l_value), _arr("int32_t", "L_K", l_k), _arr("int32_t", "L_EOFF", l_eoff),
        _arr("int32_t", "L_COFF", [str(v) for v in l_coff]), _arr("int64_t", "L_TOFF", l_toff),
        _arr("int32_t", "E_FEAT", e_feat), _arr("double", "E_Z", e_z),
        _arr("int32_t", "C_NODE", c_node), _arr("int32_t", "C_INFO", c_info),
    ]
    return "\n".join(head) + "\n" + "".join(d if d.endswith("\n") else d + "\n" for d in data)


#: The fixed C runtime compiled with every model header (package data next to this module).
RUNTIME_C_PATH = pathlib.Path(__file__).with_name("native_runtime.c")


def generate_sources(model: NativeModel, **options: Any) -> dict[str, str]:
    """The translation unit for `model`: the generated `uwrt_model.h` and `native_runtime.c`."""
    return {"uwrt_model.h": generate_model_header(model, **options), "native_runtime.c": RUNTIME_C_PATH.read_text()}


# ----------------------------------------------------------------------------------------------
# Python wrappers

_F32P = ctypes.POINTER(ctypes.c_float)
_F64P = ctypes.POINTER(ctypes.c_double)


def _bind(lib: ctypes.CDLL) -> None:
    for fn in (lib.predict_margin, lib.shap):
        fn.argtypes = [_F32P, ctypes.c_int, ctypes.c_int, _F64P]
        fn.restype = ctypes.c_int
    lib.shap_tabled.argtypes = [_F32P, _F32P, ctypes.c_int, ctypes.c_int, _F64P]
    lib.shap_tabled.restype = ctypes.c_int
    lib.shap_fill_table.argtypes, lib.shap_fill_table.restype = [_F32P], ctypes.c_int
    lib.shap_table_floats.argtypes, lib.shap_table_floats.restype = [], ctypes.c_longlong
    lib.num_features.argtypes, lib.num_features.restype = [], ctypes.c_int
    lib.num_trees.argtypes, lib.num_trees.restype = [], ctypes.c_int


def _as_rows(rows: np.ndarray, num_features: int) -> np.ndarray:
    """C-contiguous float32 [B, F] (a copy only when needed; the caller's array is never written)."""
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    if rows.ndim != 2 or rows.shape[1] != num_features:
        raise ValueError(f"expected rows [B, {num_features}], got {rows.shape}")
    return rows


class NativeTreeStage:
    """TreeStage over the generated library: float32 rows [B, F] -> float64 margins [B].

    Bit-identical to xgboost's inplace_predict margins (float32 accumulation in tree order).
    Thread safe; the GIL is released during the C call."""
    name = "native"

    def __init__(self, library: CachedLibrary) -> None:
        self.library = library
        self._lib = library.lib
        _bind(self._lib)
        self.num_features = int(self._lib.num_features())
        self.num_trees = int(self._lib.num_trees())
        #: the golden-set parity report (build_native sets it; None when the gate was skipped)
        self.parity: dict | None = None

    def predict_margin(self, rows: np.ndarray) -> np.ndarray:
        x = _as_rows(rows, self.num_features)
        out = np.empty(x.shape[0], np.float64)
        if x.shape[0]:
            rc = self._lib.predict_margin(x.ctypes.data_as(_F32P), x.shape[0], x.shape[1], out.ctypes.data_as(_F64P))
            if rc != 0:
                raise RuntimeError(f"native predict_margin failed (rc={rc})")
        return out


#: Largest per-leaf pattern table NativeExplainer builds (float32); beyond it, the recursion.
SHAP_TABLE_MAX_BYTES = 64 << 20


class NativeExplainer:
    """Exact TreeSHAP contributions [B, F + 1] (last column: bias = expected margin), the same
    contract as uwrt.runtime.trees.base.TreeExplainer: rows sum to the margin.

    mode "table" (default when the table fits `table_max_bytes`): per-leaf contributions for
    every hot/cold pattern, filled once here by the same C code; "recursive": Algorithm 2 per
    row. Both are tested against xgboost. Thread safe (the table is read-only after __init__),
    GIL released."""

    def __init__(self, library: CachedLibrary, *, table_max_bytes: int = SHAP_TABLE_MAX_BYTES) -> None:
        self.library = library
        self._lib = library.lib
        _bind(self._lib)
        self.num_features = int(self._lib.num_features())
        n = int(self._lib.shap_table_floats())
        self.table_bytes = 4 * n
        self.table: np.ndarray | None = None
        if self.table_bytes <= table_max_bytes:
            self.table = np.empty(max(n, 1), np.float32)
            self._lib.shap_fill_table(self.table.ctypes.data_as(_F32P))
            self.table.flags.writeable = False
        self.mode = "table" if self.table is not None else "recursive"

    def contributions(self, rows: np.ndarray) -> np.ndarray:
        x = _as_rows(rows, self.num_features)
        out = np.empty((x.shape[0], self.num_features + 1), np.float64)
        if x.shape[0]:
            args = (x.ctypes.data_as(_F32P), x.shape[0], x.shape[1], out.ctypes.data_as(_F64P))
            if self.table is not None:
                rc = self._lib.shap_tabled(self.table.ctypes.data_as(_F32P), *args)
            else:
                rc = self._lib.shap(*args)
            if rc != 0:
                raise RuntimeError(f"native shap failed (rc={rc})")
        return out


# ----------------------------------------------------------------------------------------------
# golden set + parity gate

def golden_rows(model: NativeModel, n_rows: int = 256, seed: int = 20261125) -> np.ndarray:
    """Deterministic rows that probe the split semantics: values at, just below and just above
    real thresholds, NaN, +-inf, +-1e30, +-FLT_MAX, all-missing and all-inf rows."""
    rng = np.random.default_rng(seed)
    F = model.num_features
    thr_by_f: list[list[float]] = [[] for _ in range(F)]
    for t in model.trees:
        for f, thr, c in zip(t.feature, t.threshold, t.left, strict=True):
            if c >= 0:
                thr_by_f[int(f)].append(float(thr))
    x = rng.normal(size=(n_rows, F)).astype(np.float32)
    for f in range(F):
        if thr_by_f[f]:
            thr = np.asarray(thr_by_f[f], np.float32)[rng.integers(0, len(thr_by_f[f]), n_rows)]
            kind = rng.integers(0, 4, n_rows)
            vals = np.where(kind == 0, thr, np.where(kind == 1, np.nextafter(thr, np.float32(-np.inf)),
                            np.where(kind == 2, np.nextafter(thr, np.float32(np.inf)), x[:, f])))
            x[:, f] = vals.astype(np.float32)
    specials = np.array([np.nan, np.inf, -np.inf, 1e30, -1e30, np.finfo(np.float32).max, -np.finfo(np.float32).max],
                        np.float32)
    mask = rng.random(x.shape) < 0.15
    x[mask] = specials[rng.integers(0, len(specials), int(mask.sum()))]
    x[rng.random(x.shape) < 0.1] = np.nan
    x[0] = np.nan
    x[1] = np.inf
    x[2] = -np.inf
    x[3] = 1e30
    return x


def _finite_for_dmatrix(x: np.ndarray) -> np.ndarray:
    """xgboost's DMatrix rejects inf; +-FLT_MAX takes the same branch at every finite threshold."""
    big = np.finfo(np.float32).max
    return np.where(np.isposinf(x), big, np.where(np.isneginf(x), -big, x)).astype(np.float32)


def parity_report(booster, stage: NativeTreeStage, explainer: NativeExplainer, rows: np.ndarray) -> dict:
    """Max differences to xgboost on `rows`: margins, probabilities, contributions, SHAP row sums."""
    import xgboost as xgb
    ref_m = np.asarray(booster.inplace_predict(rows, predict_type="margin", missing=np.nan), np.float64).reshape(-1)
    m = stage.predict_margin(rows)
    sig = lambda v: 1.0 / (1.0 + np.exp(-v))  # noqa: E731
    ref_c = np.asarray(booster.predict(xgb.DMatrix(_finite_for_dmatrix(rows), missing=np.nan), pred_contribs=True),
                       np.float64)
    c = explainer.contributions(rows)
    return {"rows": int(rows.shape[0]), "margin_max_abs": float(np.max(np.abs(m - ref_m))),
            "margin_bit_identical": bool(np.array_equal(m, ref_m)),
            "prob_max_abs": float(np.max(np.abs(sig(m) - sig(ref_m)))),
            "shap_max_abs": float(np.max(np.abs(c - ref_c))),
            "shap_sum_vs_margin_max_abs": float(np.max(np.abs(c.sum(1) - m)))}


def check_parity(booster, stage: NativeTreeStage, explainer: NativeExplainer, rows: np.ndarray) -> dict:
    """parity_report, raising NativeParityError when a bound is exceeded."""
    rep = parity_report(booster, stage, explainer, rows)
    bad = [k for k, lim in (("prob_max_abs", MARGIN_TOL), ("margin_max_abs", MARGIN_TOL * 10),
                            ("shap_max_abs", SHAP_TOL), ("shap_sum_vs_margin_max_abs", SHAP_TOL)) if not rep[k] <= lim]
    if bad:
        raise NativeParityError(f"native trees disagree with xgboost on the golden set ({', '.join(bad)}): {rep}")
    return rep


def _generator_digest() -> str:
    """The generator (this module) and the C runtime it compiles with: either changing is a new key."""
    h = hashlib.sha256(pathlib.Path(__file__).read_bytes())
    h.update(RUNTIME_C_PATH.read_bytes())
    return h.hexdigest()


def build_native(booster, cache_dirs: Sequence[str | os.PathLike], *, progress: Callable[[str], None] | None = None,
                 block_rows: int = 64, max_padded_depth: int = 8, cflags: Sequence[str] = CFLAGS,
                 golden: int = 256, shap_table_max_bytes: int = SHAP_TABLE_MAX_BYTES
                 ) -> tuple[NativeTreeStage, NativeExplainer]:
    """Generate, compile (or load from cache) and verify the native stage + explainer for `booster`.

    Steps: parse_model (UnsupportedTreeModel) -> generate_sources -> cache.build_shared_library
    (NativeBuildError) -> check_parity on `golden` rows (NativeParityError). The parity report
    is kept on `stage.parity`. Safe to call from several threads/processes (the cache locks)."""
    progress = progress or (lambda msg: log.info("%s", msg))
    raw = bytes(booster.save_raw("json"))
    model = parse_model(booster)
    key_parts = {"model_sha256": hashlib.sha256(raw).hexdigest(), "generator_sha256": _generator_digest(),
                 "block_rows": str(block_rows), "max_padded_depth": str(max_padded_depth)}
    lib = build_shared_library(
        "uwrt_trees", lambda: generate_sources(model, block_rows=block_rows, max_padded_depth=max_padded_depth),
        key_parts, cache_dirs, cflags=cflags, ldflags=("-lm",), progress=progress)
    stage, explainer = NativeTreeStage(lib), NativeExplainer(lib, table_max_bytes=shap_table_max_bytes)
    if stage.num_features != model.num_features or stage.num_trees != len(model.trees):
        raise NativeParityError(f"library {lib.path} has {stage.num_features} features / {stage.num_trees} trees, "
                                f"model has {model.num_features} / {len(model.trees)}")
    progress(f"native TreeSHAP mode {explainer.mode!r} (pattern table {explainer.table_bytes / 2**20:.1f} MiB, "
             f"cap {shap_table_max_bytes / 2**20:.0f} MiB)")
    if golden:
        stage.parity = check_parity(booster, stage, explainer, golden_rows(model, golden))
        progress(f"native trees verified against xgboost on {golden} golden rows: {stage.parity}")
    return stage, explainer
