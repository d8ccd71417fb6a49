"""Compiled tree stage (Treelite -> TL2cgen), the native compile cache and the parity gate.

Every path is compared with xgboost on fresh random rows with NaN, +-inf, huge values, values
exactly at split thresholds and all-missing rows. The compile cache is checked for hit, miss,
corrupt entries (rebuilt), unwritable dirs and concurrent builders.
"""
from __future__ import annotations

import json
import pathlib
import threading

import numpy as np
import pytest
import xgboost as xgb

from uwrt.runtime.trees import cache as native_cache
from uwrt.runtime.trees.base import load_booster
from uwrt.runtime.trees.cache import build_shared_library, cache_stats
from uwrt.runtime.trees.paths import GTILStage, ONNXTreeStage, TL2cgenPredictorStage
from uwrt.runtime.trees.tl2cgen import (
    PROB_TOL,
    CompiledTreeStage,
    TreeCompileError,
    _split_thresholds,
    compile_tl2cgen,
    golden_rows,
    parity_check,
    xgboost_margin,
)

NF = 11


def train_model(seed: int, n_trees: int = 24, depth: int = 4, nf: int = NF) -> xgb.Booster:
    g = np.random.default_rng(seed)
    x = g.standard_normal((600, nf)).astype(np.float32)
    x[g.random(x.shape) < 0.15] = np.nan
    logit = np.nan_to_num(x[:, 0]) - 0.7 * np.nan_to_num(x[:, 1]) + 0.4 * np.isnan(x[:, 2])
    y = (logit + g.standard_normal(600) > 0).astype(np.float32)
    return xgb.train({"objective": "binary:logistic", "max_depth": depth, "eta": 0.3, "nthread": 1,
                      "base_score": 0.3}, xgb.DMatrix(x, y, missing=np.nan), n_trees)


def edge_rows(rng, booster, n: int = 300) -> np.ndarray:
    """Random rows: normals at several scales, split thresholds (and neighbours), NaN, +-inf,
    +-1e30/3e38, plus all-missing and all-infinite rows."""
    nf = booster.num_features()
    x = (rng.standard_normal((n, nf)) * rng.choice([0.5, 3.0, 1e3], size=(n, 1))).astype(np.float32)
    thr = _split_thresholds(booster)
    for f, t in thr.items():
        m = rng.random(n) < 0.3
        pick = t[rng.integers(0, t.size, int(m.sum()))]
        x[m, f] = np.where(rng.random(pick.size) < 0.5, pick, np.nextafter(pick, np.float32(np.inf)))
    specials = np.array([np.nan, np.inf, -np.inf, 1e30, -1e30, 3e38, -3e38], np.float32)
    m = rng.random(x.shape) < 0.2
    x[m] = specials[rng.integers(0, specials.size, int(m.sum()))]
    extra = np.stack([np.full(nf, np.nan), np.full(nf, np.inf), np.full(nf, -np.inf), np.full(nf, np.nan)])
    return np.ascontiguousarray(np.concatenate([x, extra.astype(np.float32)]))


def prob_diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(1 / (1 + np.exp(-a)) - 1 / (1 + np.exp(-b)))


def assert_parity(got: np.ndarray, booster, rows: np.ndarray) -> None:
    want = xgboost_margin(booster, rows)
    d = prob_diff(got, want)
    bad = np.flatnonzero(~(d <= PROB_TOL))
    assert bad.size == 0, f"rows {bad[:10]} differ: got {got[bad[:5]]}, xgboost {want[bad[:5]]}, max {d.max():.3g}"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> pathlib.Path:
    return tmp_path_factory.mktemp("native_cache")


@pytest.fixture(scope="module")
def model() -> xgb.Booster:
    return train_model(1)


@pytest.fixture(scope="module")
def compiled(model, cache_dir):
    return compile_tl2cgen(model, [cache_dir], progress=lambda m: None)


def test_compiled_matches_xgboost_and_keeps_input(rng, model, compiled):
    stage = CompiledTreeStage(compiled)
    rows = edge_rows(rng, model)
    before = rows.copy()
    assert_parity(stage.predict_margin(rows), model, rows)
    assert np.array_equal(rows, before, equal_nan=True), "caller's rows were mutated"
    assert compiled.parity["max_prob_diff"] <= PROB_TOL and compiled.parity["rows"] > 500


def test_compiled_batch_invariant_and_input_forms(rng, model, compiled):
    stage = CompiledTreeStage(compiled)
    rows = edge_rows(rng, model, 64)
    full = stage.predict_margin(rows)
    singles = np.concatenate([stage.predict_margin(rows[i:i + 1]) for i in range(len(rows))])
    assert np.array_equal(full, singles)
    wide = np.asfortranarray(rows.astype(np.float64))  # float64 + non-contiguous: converted, not mutated
    assert np.array_equal(stage.predict_margin(wide), full)
    assert np.array_equal(stage.predict_margin(rows[::2]), full[::2])
    assert stage.predict_margin(rows[:0]).shape == (0,)
    with pytest.raises(ValueError):
        stage.predict_margin(rows[:, :-1])


@pytest.mark.parametrize("path", ["tl2cgen_predictor", "gtil", "onnx"])
def test_other_paths_match_xgboost(rng, model, compiled, path):
    if path == "onnx":
        pytest.importorskip("onnxmltools")  # optional: the ONNX tree path is benchmark/fallback only
    stage = {"tl2cgen_predictor": lambda: TL2cgenPredictorStage(compiled), "gtil": lambda: GTILStage(model),
             "onnx": lambda: ONNXTreeStage(model)}[path]()
    rows = edge_rows(rng, model, 200)
    before = rows.copy()
    assert_parity(stage.predict_margin(rows), model, rows)
    assert np.array_equal(rows, before, equal_nan=True)
    assert stage.predict_margin(rows[:0]).shape == (0,)


def test_onnx_conversion_failure_is_a_tree_compile_error(model, monkeypatch):
    """A model onnxmltools cannot convert raises TreeCompileError naming the cause (not NameError)."""
    convert = pytest.importorskip("onnxmltools.convert")

    def refuse(*a, **kw):
        raise RuntimeError("injected conversion failure")
    monkeypatch.setattr(convert, "convert_xgboost", refuse)
    with pytest.raises(TreeCompileError, match="injected conversion failure"):
        ONNXTreeStage(model)


def test_annotated_build_matches(rng, model, cache_dir):
    train = edge_rows(np.random.default_rng(5), model, 400)
    lib = compile_tl2cgen(model, [cache_dir], training_rows=train, progress=lambda m: None)
    assert lib.cached.built and "annotation_rows_sha256" in lib.cached.meta["key_parts"]
    rows = edge_rows(rng, model)
    assert_parity(CompiledTreeStage(lib).predict_margin(rows), model, rows)


def test_small_bundle_trees(rng, small_bundle, cache_dir):
    booster = load_booster(pathlib.Path(small_bundle) / "trees.ubj")
    lib = compile_tl2cgen(booster, [cache_dir], progress=lambda m: None)
    rows = edge_rows(rng, booster)
    assert_parity(CompiledTreeStage(lib).predict_margin(rows), booster, rows)


def test_golden_rows_cover_edge_cases(model):
    g = golden_rows(model)
    assert np.isnan(g).all(axis=1).any() and np.isposinf(g).any() and np.isneginf(g).any()
    assert (np.abs(g[np.isfinite(g)]) >= 1e30).any()
    thr = _split_thresholds(model)
    assert any(np.isin(g[:, f], t).any() for f, t in thr.items())
    assert np.array_equal(g, golden_rows(model), equal_nan=True)  # deterministic gate


# ------------------------------------------------------------------------------------------
# parity gate

def test_parity_gate_rejects_wrong_model(rng, model, compiled):
    other = train_model(2)
    with pytest.raises(TreeCompileError, match="parity gate failed"):
        parity_check(CompiledTreeStage(compiled).predict_margin, other)


def test_parity_gate_rejects_wrong_library(model, compiled, cache_dir, monkeypatch):
    """compile_tl2cgen never hands out a library that disagrees: inject model 1's library
    while compiling model 2."""
    import uwrt.runtime.trees.tl2cgen as tc
    other = train_model(3)
    monkeypatch.setattr(tc, "build_shared_library", lambda *a, **k: compiled.cached)
    with pytest.raises(TreeCompileError, match="parity gate failed"):
        compile_tl2cgen(other, [cache_dir], progress=lambda m: None)


def test_parity_gate_rejects_mutation_and_nan(model):
    def mutating(rows):
        out = xgboost_margin(model, rows)
        rows[0, 0] = 123.0
        return out

    with pytest.raises(TreeCompileError, match="mutated"):
        parity_check(mutating, model)
    with pytest.raises(TreeCompileError, match="parity gate failed"):
        parity_check(lambda r: np.full(len(r), np.nan), model)


# ------------------------------------------------------------------------------------------
# cache

def test_tree_cache_hit_and_miss(model, compiled, cache_dir):
    so = compiled.cached.entry
    mtime = so.stat().st_mtime_ns
    before = cache_stats()
    again = compile_tl2cgen(model, [cache_dir], progress=lambda m: None)
    after = cache_stats()
    assert not again.cached.built and again.cached.entry == so and so.stat().st_mtime_ns == mtime
    assert again.cached.path == compiled.cached.path != so    # loaded from the same verified private copy
    assert after["hits"] == before["hits"] + 1 and after["builds"] == before["builds"]
    other = compile_tl2cgen(model, [cache_dir], parallel_comp=2, progress=lambda m: None)  # another key
    assert other.cached.built and other.cached.key != compiled.cached.key
    assert cache_stats()["builds"] == after["builds"] + 1


def test_tree_cache_corrupt_so_rebuilt(rng, model, compiled, tmp_path, caplog):
    import shutil
    entry = compiled.cached.entry.parent
    shutil.copytree(entry, tmp_path / entry.name)
    so = tmp_path / entry.name / compiled.cached.entry.name
    data = bytearray(so.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different hash
    so.unlink()
    so.write_bytes(bytes(data))
    before = cache_stats()["corrupt"]
    lib = compile_tl2cgen(model, [tmp_path], progress=lambda m: None)
    assert lib.cached.built and cache_stats()["corrupt"] == before + 1
    assert "rejected" in caplog.text and "sha256" in caplog.text
    rows = edge_rows(rng, model, 50)
    assert_parity(CompiledTreeStage(lib).predict_margin(rows), model, rows)


TOY = {"toy.c": "#include \"toy.h\"\nint toy_value(void) { return TOY_K; }\n", "toy.h": "#define TOY_K 41\n"}


def toy_sources(k: int) -> dict:
    return {"toy.c": TOY["toy.c"], "toy.h": f"#define TOY_K {k}\n"}


def test_native_cache_meta_corruption_rebuilt(tmp_path, caplog, rng):
    k = int(rng.integers(1, 1000))
    first = build_shared_library("toy", toy_sources(k), {"v": "1"}, [tmp_path], progress=lambda m: None)
    assert first.built and first.lib.toy_value() == k
    meta_path = first.entry.parent / "meta.json"
    meta = json.loads(meta_path.read_text())
    for corrupt in ("not json{", json.dumps({**meta, "so_sha256": "0" * 64}), json.dumps({**meta, "key": "x"}), None):
        if corrupt is None:
            meta_path.unlink()
        else:
            meta_path.write_text(corrupt)
        n = cache_stats()["corrupt"]
        again = build_shared_library("toy", toy_sources(k), {"v": "1"}, [tmp_path], progress=lambda m: None)
        assert again.built and cache_stats()["corrupt"] == n + 1, corrupt
        meta_path = again.entry.parent / "meta.json"
    assert caplog.text.count("rejected") == 4
    hit = build_shared_library("toy", toy_sources(k), {"v": "1"}, [tmp_path], progress=lambda m: None)
    assert not hit.built and hit.lib.toy_value() == k


def test_native_cache_sources_and_key(tmp_path, rng):
    k = int(rng.integers(1, 1000))
    calls = []

    def gen():
        calls.append(1)
        return toy_sources(k)

    a = build_shared_library("toy", gen, {"model": str(k)}, [tmp_path], progress=lambda m: None)
    b = build_shared_library("toy", gen, {"model": str(k)}, [tmp_path], progress=lambda m: None)
    assert a.built and not b.built and len(calls) == 1  # the generator only runs on a miss
    c = build_shared_library("toy", toy_sources(k + 1), {"model": str(k)}, [tmp_path], progress=lambda m: None)
    assert c.built and c.lib.toy_value() == k + 1  # dict sources are part of the key
    d = build_shared_library("toy", toy_sources(k), {"model": str(k)}, [tmp_path], cflags=["-O1", "-fPIC"],
                             progress=lambda m: None)
    assert d.built and d.key != a.key  # flags are part of the key
    assert {"so_sha256", "so_bytes", "cc", "cflags", "key_parts"} <= set(a.meta)
    with pytest.raises(native_cache.NativeBuildError, match="failed"):
        build_shared_library("bad", {"bad.c": "int f( {"}, {"v": "1"}, [tmp_path], progress=lambda m: None)


def test_native_cache_relative_dir(tmp_path, monkeypatch, rng):
    monkeypatch.chdir(tmp_path)
    k = int(rng.integers(1, 1000))
    lib = build_shared_library("toy", toy_sources(k), {"v": "1"}, ["rel/cache"], progress=lambda m: None)
    assert lib.built and lib.lib.toy_value() == k and lib.cache_dir == tmp_path / "rel" / "cache"


def test_native_cache_unwritable_dir_falls_through(tmp_path, rng, caplog):
    bad, rw = tmp_path / "not_a_dir", tmp_path / "rw"  # a file where the cache dir should be (chmod
    bad.write_text("x")                               # would not stop root, who runs CI here)
    n = cache_stats()["unwritable_dirs"]
    lib = build_shared_library("toy", toy_sources(int(rng.integers(1, 99))), {"v": "1"}, [bad, rw],
                               progress=lambda m: None)
    assert lib.cache_dir == rw and lib.built and cache_stats()["unwritable_dirs"] == n + 1
    assert "not writable" in caplog.text
    # no usable cache dir at all: built uncached in the process's private directory, said and counted
    n = cache_stats()["uncached_builds"]
    lib = build_shared_library("toy", toy_sources(3), {"v": "1"}, [bad], progress=lambda m: None)
    assert lib.built and lib.lib.toy_value() == 3 and cache_stats()["uncached_builds"] == n + 1
    assert "building toy uncached" in caplog.text and not (bad.is_dir())


def test_native_cache_concurrent_builders_agree(tmp_path, rng):
    k = int(rng.integers(1, 1000))
    results, errors = [], []
    builds = []

    def gen():
        builds.append(1)
        return toy_sources(k)

    def worker():
        try:
            results.append(build_shared_library("toy", gen, {"k": str(k)}, [tmp_path], progress=lambda m: None))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 4 and len(builds) == 1
    assert {r.path for r in results} == {results[0].path} and all(r.lib.toy_value() == k for r in results)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_compiled_thread_safe(rng, model, compiled):
    from concurrent.futures import ThreadPoolExecutor
    stage = CompiledTreeStage(compiled)
    batches = [edge_rows(rng, model, int(n)) for n in rng.integers(1, 40, 16)]
    want = [stage.predict_margin(b) for b in batches]
    with ThreadPoolExecutor(4) as ex:
        got = list(ex.map(stage.predict_margin, batches * 4))
    for i, g in enumerate(got):
        assert np.array_equal(g, want[i % len(batches)])


def test_compiled_matches_xgboost_hypothesis(model, compiled):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from hypothesis.extra.numpy import arrays
    stage = CompiledTreeStage(compiled)
    thr = np.concatenate(list(_split_thresholds(model).values()))
    cell = st.one_of(st.floats(width=32, allow_nan=True, allow_infinity=True), st.sampled_from(thr.tolist()))

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(arrays(np.float32, st.tuples(st.integers(1, 6), st.just(NF)), elements=cell))
    def check(rows):
        assert_parity(stage.predict_margin(rows), model, rows)

    check()


def test_compile_bundle_cache(small_bundle, tmp_path, monkeypatch, rng):
    import shutil

    from uwrt.runtime.bundle.bundle import load_bundle
    from uwrt.runtime.trees.tl2cgen import compile_bundle_cache
    bundle_dir = tmp_path / "b"
    shutil.copytree(small_bundle, bundle_dir, ignore=shutil.ignore_patterns("cache"))
    monkeypatch.setenv("UWRT_CACHE_DIR", str(tmp_path / "user"))
    lib = compile_bundle_cache(load_bundle(bundle_dir), progress=lambda m: None)
    assert lib.cached.cache_dir == bundle_dir / "cache" / "native" and lib.parity["max_prob_diff"] <= PROB_TOL
    bundle = load_bundle(bundle_dir)  # cache/ is not part of the digest
    assert not compile_bundle_cache(bundle, progress=lambda m: None).cached.built
    # a bundle whose cache/ cannot be written: the user cache is used
    ro_dir = tmp_path / "ro"
    shutil.copytree(small_bundle, ro_dir, ignore=shutil.ignore_patterns("cache"))
    (ro_dir / "cache").write_text("not a directory")
    lib2 = compile_bundle_cache(load_bundle(ro_dir), progress=lambda m: None)
    assert lib2.cached.cache_dir == tmp_path / "user" / "native"
