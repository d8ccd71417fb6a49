/* uwrt native tree runtime: margins and exact TreeSHAP over one model's constant arrays.

   Compiled together with "uwrt_model.h", which runtime/trees/native.py generates per model
   (generate_model_header): the model's sizes as macros (NF features, NT trees, NL leaves, MAXD
   max depth, MAXNODES, BLOCK rows per block, BASE_SCORE, LINK_LOGIT, WALK_LEVELS,
   SHAP_TREE_MEANS, INV_TABLE, TABLE_FLOATS) and its trees as const arrays:
     T_DEPTH/T_PNODE/T_PLEAF/T_ROOT   per tree: padded depth (-1 = walk sparsely), offsets
     P_NODES/P_LEAF                   padded complete trees (PNode = {thr, feature << 1 | default_left})
     S_LEFT/S_RIGHT/S_FI/S_THR/S_COVER  sparse nodes (leaf: S_LEFT = -1, S_THR = leaf value)
     T_LEAF, T_NNODES, L_..., E_..., C_...  per-leaf TreeSHAP path tables (see shap_tabled)
   Entry points (all pure functions of their arguments; no global mutable state, thread safe):
     int num_features(void); int num_trees(void);
     int predict_margin(const float* rows, int n_rows, int n_features, double* out);
     int shap(const float* rows, int n_rows, int n_features, double* out);  (the recursion)
     long long shap_table_floats(void); int shap_fill_table(float* table);
     int shap_tabled(const float* table, const float* rows, int n_rows, int n_features, double* out);
   Semantics are xgboost's (see native.py's docstring); no -ffast-math: NaN handling matters. */
#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include "uwrt_model.h"

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
