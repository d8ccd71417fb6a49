"""Our own compiled tree layout and exact TreeSHAP, generated as C from xgboost's JSON model.

`build_native(booster, cache_dirs)` parses `booster.save_raw("json")`, generates one C file
holding the model as constant arrays plus a fixed runtime, compiles it into a shared library
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
            l, r = int(self.left[n]), int(self.right[n])
            return (rec(l) * float(self.cover[l]) + rec(r) * float(self.cover[r])) / float(self.cover[n])
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
            out.append((float(tree.threshold[n]), list(zip(feats, z)),
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


_RUNTIME_C = r"""
static inline int go_right(float v, float thr, int32_t fi) {
  /* xgboost: left iff v < thr; NaN takes the default direction; +-inf compare as values */
  return (!(v < thr)) & !((v != v) & (fi & 1));
}

static float base_margin(void) {
#if LINK_LOGIT
  /* xgboost: -log(1/p - 1) in float with the C library's logf at run time. volatile stops gcc
     from folding it with MPFR (correctly rounded), which differs from glibc's logf by 1 ulp for
     ~1% of base scores and would break bit-identical margins. */
  volatile float p = BASE_SCORE;
  return -logf(1.0f / p - 1.0f);
#else
  return BASE_SCORE;
#endif
}

static float sparse_leaf(int t, const float* x) {
  int n = T_ROOT[t];
  while (S_LEFT[n] >= 0) {
    int32_t fi = S_FI[n];
    n = go_right(x[fi >> 1], S_THR[n], fi) ? S_RIGHT[n] : S_LEFT[n];
  }
  return S_THR[n];
}

int num_features(void) { return NF; }
int num_trees(void) { return NT; }

int predict_margin(const float* rows, int n_rows, int n_features, double* out) {
  if (n_features != NF || n_rows < 0) return -1;
  const float base = base_margin();
  for (int r0 = 0; r0 < n_rows; r0 += BLOCK) {
    const int nb = n_rows - r0 < BLOCK ? n_rows - r0 : BLOCK;
    const float* xb = rows + (size_t)r0 * NF;
    float acc[BLOCK];
#if WALK_LEVELS
    int32_t pos[BLOCK];
#endif
    for (int r = 0; r < nb; ++r) acc[r] = base;
    for (int t = 0; t < NT; ++t) {
      const int d = T_DEPTH[t];
      if (d < 0) {
        for (int r = 0; r < nb; ++r) acc[r] += sparse_leaf(t, xb + (size_t)r * NF);
        continue;
      }
      const PNode* nodes = P_NODES + T_PNODE[t];
      const float* leaves = P_LEAF + T_PLEAF[t];
      const int first_leaf = (1 << d) - 1;
#if WALK_LEVELS
      for (int r = 0; r < nb; ++r) pos[r] = 0;
      for (int k = 0; k < d; ++k) {
        for (int r = 0; r < nb; ++r) {
          const PNode nd = nodes[pos[r]];
          pos[r] = 2 * pos[r] + 1 + go_right(xb[(size_t)r * NF + (nd.fi >> 1)], nd.thr, nd.fi);
        }
      }
      for (int r = 0; r < nb; ++r) acc[r] += leaves[pos[r] - first_leaf];
#else
      for (int r = 0; r < nb; ++r) {
        const float* x = xb + (size_t)r * NF;
        int p = 0;
        for (int k = 0; k < d; ++k) {
          const PNode nd = nodes[p];
          p = 2 * p + 1 + go_right(x[nd.fi >> 1], nd.thr, nd.fi);
        }
        acc[r] += leaves[p - first_leaf];
      }
#endif
    }
    for (int r = 0; r < nb; ++r) out[r0 + r] = (double)acc[r];
  }
  return 0;
}

/* ---- exact TreeSHAP (Lundberg et al. 2018, Algorithm 2) ----
   A path holds elements 0..u (element 0 is the root dummy). w[i] is the permutation weight of
   the subsets with i "one" features, times their fractions. */
typedef struct { int d; double z, o, w; } PathElem;

/* INV[i] = 1/i: the recurrences below multiply instead of dividing (divisions dominated). */
static const double INV[MAXD + 4] = INV_TABLE;

static void extend(PathElem* p, int u, double z, double o, int d) {
  p[u].d = d; p[u].z = z; p[u].o = o; p[u].w = u == 0 ? 1.0 : 0.0;
  const double inv = INV[u + 1];
  for (int i = u - 1; i >= 0; --i) {
    p[i + 1].w += o * p[i].w * (double)(i + 1) * inv;
    p[i].w = z * p[i].w * (double)(u - i) * inv;
  }
}

/* Undo the extension of element k (path 0..u), then drop it: the path becomes 0..u-1. */
static void unwind(PathElem* p, int u, int k) {
  const double z = p[k].z, o = p[k].o, inv = INV[u + 1];
  double next = p[u].w;
  if (o != 0.0) {
    const double inv_o = 1.0 / o;
    for (int j = u - 1; j >= 0; --j) {
      const double t = p[j].w;
      p[j].w = next * (double)(u + 1) * INV[j + 1] * inv_o;
      next = t - p[j].w * z * (double)(u - j) * inv;
    }
  } else {
    const double inv_z = 1.0 / z;
    for (int j = u - 1; j >= 0; --j) p[j].w = p[j].w * (double)(u + 1) * inv_z * INV[u - j];
  }
  for (int j = k; j < u; ++j) { p[j].d = p[j + 1].d; p[j].z = p[j + 1].z; p[j].o = p[j + 1].o; }
}

/* A leaf with value v adds, for each path element i >= 1, (sum of the weights left after
   unwinding i) * (o_i - z_i) * v to phi[d_i]. Unwinding only reads the full path's weights and
   (z_i, o_i), so for every element with o_i == 0 the sum is (u+1)/z_i * S0 with one shared
   S0 = sum_j w_j / (u - j), and its term is -(u+1) * S0 * v. Elements with o_i != 0 need the
   backward recurrence; their chains are independent and are stepped together. */
static void leaf_contrib(const PathElem* p, int u, double v, double* phi) {
  const double inv = INV[u + 1];
  double s0 = 0.0;
  for (int j = u - 1; j >= 0; --j) s0 += p[j].w * INV[u - j];
  const double cold_term = -(double)(u + 1) * s0 * v;
  int hot[MAXD + 2];
  double next[MAXD + 2], tot[MAXD + 2], ko[MAXD + 2];
  int nh = 0;
  for (int i = 1; i <= u; ++i) {
    if (p[i].o != 0.0) {
      hot[nh] = i; next[nh] = p[u].w; tot[nh] = 0.0; ko[nh] = (double)(u + 1) / p[i].o; ++nh;
    } else {
      phi[p[i].d] += cold_term;
    }
  }
  for (int j = u - 1; j >= 0; --j) {
    const double pj = p[j].w, c1 = INV[j + 1], c2 = (double)(u - j) * inv;
    for (int h = 0; h < nh; ++h) {
      const double a = ko[h] * c1;
      tot[h] += next[h] * a;
      next[h] = pj - next[h] * (a * p[hot[h]].z * c2);
    }
  }
  for (int h = 0; h < nh; ++h) phi[p[hot[h]].d] += tot[h] * (p[hot[h]].o - p[hot[h]].z) * v;
}

/* `parent` holds elements 0..pu; this node's path is built right after it. */
static void shap_recurse(int n, const float* x, double* phi, PathElem* parent, int pu,
                         double pz, double po, int pd) {
  PathElem* p = parent + pu + 1;
  for (int i = 0; i <= pu; ++i) p[i] = parent[i];
  int u = pu + 1;
  extend(p, u, pz, po, pd);
  if (S_LEFT[n] < 0) {
    leaf_contrib(p, u, (double)S_THR[n], phi);
    return;
  }
  const int32_t fi = S_FI[n];
  const int f = fi >> 1;
  const int right = go_right(x[f], S_THR[n], fi);
  const int hot = right ? S_RIGHT[n] : S_LEFT[n], cold = right ? S_LEFT[n] : S_RIGHT[n];
  double iz = 1.0, io = 1.0;
  for (int k = 1; k <= u; ++k) {
    if (p[k].d == f) { iz = p[k].z; io = p[k].o; unwind(p, u, k); --u; break; }
  }
  const double c = S_COVER[n];
  shap_recurse(hot, x, phi, p, u, iz * S_COVER[hot] / c, io, f);
  shap_recurse(cold, x, phi, p, u, iz * S_COVER[cold] / c, 0.0, f);
}

int shap(const float* rows, int n_rows, int n_features, double* out) {
  if (n_features != NF || n_rows < 0) return -1;
  PathElem buf[(MAXD + 2) * (MAXD + 3) / 2 + 1];
  for (int r = 0; r < n_rows; ++r) {
    const float* x = rows + (size_t)r * NF;
    double* phi = out + (size_t)r * (NF + 1);
    for (int i = 0; i < NF; ++i) phi[i] = 0.0;
    for (int t = 0; t < NT; ++t) shap_recurse(T_ROOT[t], x, phi, buf, -1, 1.0, 1.0, -1);
    phi[NF] = (double)base_margin() + SHAP_TREE_MEANS;
  }
  return 0;
}

/* ---- table-driven TreeSHAP (same numbers, precomputed per leaf) ----
   At a leaf the path (after merging repeated features) is static: k unique features with cover
   fractions z_e; only the one-fractions o_e in {0,1} depend on the row (o_e = 1 iff the row
   satisfies every split on feature e along the way). So each leaf's contributions for all 2^k
   patterns are computed once with the same EXTEND / leaf step (shap_fill_table), and a row
   costs one pass over the tree's splits plus, per leaf, its pattern and k table reads. */
long long shap_table_floats(void) { return TABLE_FLOATS; }

int shap_fill_table(float* table) {
  PathElem path[MAXD + 2];
  double phi_local[MAXD + 1];
  for (int l = 0; l < NL; ++l) {
    const int k = L_K[l];
    float* dst = table + L_TOFF[l];
    for (int pat = 0; pat < (1 << k); ++pat) {
      extend(path, 0, 1.0, 1.0, -1);
      for (int e = 0; e < k; ++e) extend(path, e + 1, E_Z[L_EOFF[l] + e], ((pat >> e) & 1) ? 1.0 : 0.0, e);
      for (int e = 0; e < k; ++e) phi_local[e] = 0.0;
      leaf_contrib(path, k, (double)L_VALUE[l], phi_local);
      for (int e = 0; e < k; ++e) dst[pat * k + e] = (float)phi_local[e];
    }
  }
  return 0;
}

int shap_tabled(const float* table, const float* rows, int n_rows, int n_features, double* out) {
  if (n_features != NF || n_rows < 0) return -1;
  unsigned char dir[MAXNODES];
  for (int r = 0; r < n_rows; ++r)
    for (int i = 0; i < NF; ++i) out[(size_t)r * (NF + 1) + i] = 0.0;
  /* tree-major: a tree's slice of the table stays in cache for every row of the batch; each
     row still adds its trees in tree order, so results do not depend on the batch */
  for (int t = 0; t < NT; ++t) {
    for (int r = 0; r < n_rows; ++r) {
      const float* x = rows + (size_t)r * NF;
      double* phi = out + (size_t)r * (NF + 1);
      const int n0 = T_ROOT[t], nn = T_NNODES[t];
      for (int i = 0; i < nn; ++i) {  /* leaves compute a harmless dummy */
        const int32_t fi = S_FI[n0 + i];
        dir[i] = (unsigned char)go_right(x[fi >> 1], S_THR[n0 + i], fi);
      }
      for (int l = T_LEAF[t]; l < T_LEAF[t + 1]; ++l) {
        const int k = L_K[l];
        unsigned pat = (1u << k) - 1u;
        for (int c = L_COFF[l]; c < L_COFF[l + 1]; ++c) {
          const int32_t info = C_INFO[c];  /* slot << 1 | required direction */
          pat &= ~((unsigned)(dir[C_NODE[c]] != (info & 1)) << (info >> 1));
        }
        const float* tv = table + L_TOFF[l] + (size_t)pat * k;
        const int32_t* ef = E_FEAT + L_EOFF[l];
        for (int e = 0; e < k; ++e) phi[ef[e]] += (double)tv[e];
      }
    }
  }
  for (int r = 0; r < n_rows; ++r) out[(size_t)r * (NF + 1) + NF] = (double)base_margin() + SHAP_TREE_MEANS;
  return 0;
}
"""


def generate_c(model: NativeModel, *, block_rows: int = 64, max_padded_depth: int = 8, walk_levels: bool = True) -> str:
    """The complete C source for `model` (deterministic: same model and options, same text).

    block_rows: rows per tree-major block; max_padded_depth: deeper trees are walked node by
    node instead of padded (a padded tree has 2^D leaves); walk_levels: step the block's rows
    level by level (True) or finish one row's walk before the next."""
    if not 0 <= max_padded_depth <= 16 or not 1 <= block_rows <= 4096:
        raise ValueError(f"max_padded_depth must be in [0, 16] and block_rows in [1, 4096], "
                         f"got {max_padded_depth}, {block_rows}")
    depths = [t.depth() for t in model.trees]
    p_nodes, p_leaves, t_pnode, t_pleaf, t_depth, t_root = [], [], [], [], [], []
    s_left, s_right, s_fi, s_thr, s_cover = [], [], [], [], []
    for t, d in zip(model.trees, depths):
        off = len(s_left)
        t_root.append(off)
        s_left += [str(int(c) + off if c >= 0 else -1) for c in t.left]
        s_right += [str(int(c) + off if c >= 0 else -1) for c in t.right]
        s_fi += [str(int(f) << 1 | int(dl)) if c >= 0 else "0" for f, dl, c in zip(t.feature, t.default_left, t.left)]
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
    t_leaf, t_nnodes, l_value, l_k, l_eoff, l_coff, l_toff = [0], [], [], [], [], [0], []
    e_feat, e_z, c_node, c_info = [], [], [], []
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
        f"/* generated by runtime/trees/native.py: {len(model.trees)} trees, {model.num_features} features,"
        f" objective {model.objective} */",
        "#include <math.h>", "#include <stddef.h>", "#include <stdint.h>",
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
    return "\n".join(head) + "\n" + "".join(d if d.endswith("\n") else d + "\n" for d in data) + _RUNTIME_C


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
        for f, thr, c in zip(t.feature, t.threshold, t.left):
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
    return hashlib.sha256(pathlib.Path(__file__).read_bytes()).hexdigest()


def build_native(booster, cache_dirs: Sequence[str | os.PathLike], *, progress: Callable[[str], None] | None = None,
                 block_rows: int = 64, max_padded_depth: int = 8, cflags: Sequence[str] = CFLAGS,
                 golden: int = 256, shap_table_max_bytes: int = SHAP_TABLE_MAX_BYTES
                 ) -> tuple[NativeTreeStage, NativeExplainer]:
    """Generate, compile (or load from cache) and verify the native stage + explainer for `booster`.

    Steps: parse_model (UnsupportedTreeModel) -> generate_c -> native_cache.build_shared_library
    (NativeBuildError) -> check_parity on `golden` rows (NativeParityError). The parity report
    is kept on `stage.parity`. Safe to call from several threads/processes (the cache locks)."""
    progress = progress or (lambda msg: log.info("%s", msg))
    raw = bytes(booster.save_raw("json"))
    model = parse_model(booster)
    key_parts = {"model_sha256": hashlib.sha256(raw).hexdigest(), "generator_sha256": _generator_digest(),
                 "block_rows": str(block_rows), "max_padded_depth": str(max_padded_depth)}
    lib = build_shared_library(
        "uwrt_trees", lambda: {"trees.c": generate_c(model, block_rows=block_rows, max_padded_depth=max_padded_depth)},
        key_parts, cache_dirs, cflags=cflags, ldflags=("-lm",), progress=progress)
    stage, explainer = NativeTreeStage(lib), NativeExplainer(lib, table_max_bytes=shap_table_max_bytes)
    if stage.num_features != model.num_features or stage.num_trees != len(model.trees):
        raise NativeParityError(f"library {lib.path} has {stage.num_features} features / {stage.num_trees} trees, "
                                f"model has {model.num_features} / {len(model.trees)}")
    progress(f"native TreeSHAP mode {explainer.mode!r} (pattern table {explainer.table_bytes / 2**20:.1f} MiB, "
             f"cap {shap_table_max_bytes / 2**20:.0f} MiB)")
    stage.parity = None
    if golden:
        stage.parity = check_parity(booster, stage, explainer, golden_rows(model, golden))
        progress(f"native trees verified against xgboost on {golden} golden rows: {stage.parity}")
    return stage, explainer
