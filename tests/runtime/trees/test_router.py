"""Batch-size routing: deterministic calibration with fake stages on a fake clock (never real
timings), fallback on errors (logged and counted, never a lost result), and the factory on a
real model (routed output == xgboost)."""
from __future__ import annotations

import logging
import sys

import numpy as np
import pytest

from uwrt.runtime.errors import BackendError
from uwrt.runtime.trees.router import RoutedTreeStage, build_tree_stage
from uwrt.runtime.trees.tl2cgen import PROB_TOL, xgboost_margin

NF = 7


class FakeClock:
    def __init__(self) -> None:
        self.ns = 0

    def __call__(self) -> int:
        return self.ns


class FakeStage:
    """Costs `fixed_us + per_row_us * B` on the fake clock; margin = row sum * scale (+ offset)."""

    def __init__(self, name, clock, fixed_us, per_row_us, *, offset=0.0, fail=False):
        self.name, self.clock, self.fixed_us, self.per_row_us = name, clock, fixed_us, per_row_us
        self.num_features, self.offset, self.fail, self.calls = NF, offset, fail, 0

    def predict_margin(self, rows):
        self.calls += 1
        self.clock.ns += int(1000 * (self.fixed_us + self.per_row_us * rows.shape[0]))
        if self.fail:
            raise RuntimeError(f"{self.name} is broken")
        return np.nansum(rows, axis=1).astype(np.float64) * 0.01 + self.offset


def reference(rows):
    return np.nansum(rows, axis=1).astype(np.float64) * 0.01


@pytest.fixture
def clock():
    return FakeClock()


def test_routing_picks_each_path(rng, clock):
    single = FakeStage("single", clock, 5, 40)      # best at 1 row
    blocked = FakeStage("blocked", clock, 60, 4)    # best from a few rows up
    big = FakeStage("big", clock, 400, 0.5)         # best for large batches
    slow = FakeStage("xgboost", clock, 300, 10)     # the reference, never fastest
    r = RoutedTreeStage([slow, single, blocked, big], clock=clock)
    table = r.calibrate(rng.standard_normal((9, NF)).astype(np.float32), repeats=6)
    best = {row["batch"]: row["best"] for row in table}
    # 5+40b vs 60+4b vs 400+0.5b: single for b=1, blocked up to 64, big from 128
    assert best == {1: "single", 2: "blocked", 4: "blocked", 8: "blocked", 16: "blocked", 32: "blocked",
                    64: "blocked", 128: "big", 256: "big"}
    assert r.crossovers() == [{"from_batch": 1, "path": "single"}, {"from_batch": 2, "path": "blocked"},
                              {"from_batch": 128, "path": "big"}]
    assert table[0]["median_us"]["single"] == pytest.approx(45) and table[-1]["median_us"]["big"] == pytest.approx(528)
    for b, want in [(1, "single"), (3, "blocked"), (64, "blocked"), (65, "big"), (1000, "big")]:
        assert r.route(b)[0] == want
        rows = rng.standard_normal((b, NF)).astype(np.float32)
        before = {s.name: s.calls for s in (single, blocked, big, slow)}
        np.testing.assert_allclose(r.predict_margin(rows), reference(rows))
        called = [s.name for s in (single, blocked, big, slow) if s.calls != before[s.name]]
        assert called == [want]
    assert r.stats()["calls"] == {"xgboost": 0, "single": 1, "blocked": 2, "big": 2}
    desc = r.describe()
    assert desc["calibrated"] and desc["crossovers"] == r.crossovers() and len(desc["table"]) == 9


def test_uncalibrated_uses_preference_order(rng, clock):
    a, b = FakeStage("a", clock, 1, 1), FakeStage("b", clock, 0, 0)
    r = RoutedTreeStage([a, b], reference=None, clock=clock)
    rows = rng.standard_normal((5, NF)).astype(np.float32)
    r.predict_margin(rows)
    assert (a.calls, b.calls) == (1, 0) and r.route(5) == ["a", "b"]
    assert r.predict_margin(rows[:0]).shape == (0,)
    a.predict_margin = lambda x: (_ for _ in ()).throw(ValueError("bad shape"))  # as a real stage would
    with pytest.raises(ValueError, match="expected rows"):
        r.predict_margin(rows[:, :-1])
    assert r.stats()["failures"] == {"a": 0, "b": 0}  # a bad input is not a stage failure


def test_broken_path_falls_back_logged_and_counted(rng, clock, caplog):
    fast = FakeStage("fast", clock, 1, 1)
    ref = FakeStage("xgboost", clock, 100, 10)
    r = RoutedTreeStage([ref, fast], clock=clock, disable_after=3)
    r.calibrate(rng.standard_normal((4, NF)).astype(np.float32), batch_sizes=(1, 8), repeats=5)
    assert r.route(1) == ["fast", "xgboost"]
    fast.fail = True
    rows = rng.standard_normal((6, NF)).astype(np.float32)
    with caplog.at_level(logging.WARNING, logger="uwrt.trees"):
        out = r.predict_margin(rows)
    np.testing.assert_allclose(out, reference(rows))  # the result is not lost
    assert "tree stage 'fast' failed" in caplog.text and "fast is broken" in caplog.text
    s = r.stats()
    assert s["failures"]["fast"] == 1 and s["fallbacks"] == 1 and s["calls"]["xgboost"] == 1
    for _ in range(2):
        r.predict_margin(rows)
    assert "fast" in r.stats()["disabled"] and "taken out of routing" in caplog.text
    n = fast.calls
    r.predict_margin(rows)
    assert fast.calls == n and r.route(6) == ["xgboost"]  # no longer tried
    ref.fail = True
    with pytest.raises(BackendError):
        r.predict_margin(rows)


def test_calibration_drops_failing_and_disagreeing_stages(rng, clock, caplog):
    ref = FakeStage("xgboost", clock, 100, 10)
    wrong = FakeStage("wrong", clock, 1, 0, offset=1e-3)   # fastest but off by ~2.5e-4 in probability
    broken = FakeStage("broken", clock, 1, 0, fail=True)
    ok = FakeStage("ok", clock, 10, 1)
    r = RoutedTreeStage([ref, wrong, broken, ok], clock=clock)
    with caplog.at_level(logging.WARNING, logger="uwrt.trees"):
        table = r.calibrate(rng.standard_normal((8, NF)).astype(np.float32), batch_sizes=(1, 16), repeats=5)
    assert all(set(row["order"]) == {"xgboost", "ok"} for row in table)
    assert set(r.stats()["disabled"]) == {"wrong", "broken"}
    assert "disagrees with xgboost" in caplog.text and "raised during calibration" in caplog.text


def test_constructor_checks(clock):
    with pytest.raises(ValueError):
        RoutedTreeStage([])
    a = FakeStage("a", clock, 1, 1)
    with pytest.raises(ValueError, match="unique"):
        RoutedTreeStage([a, FakeStage("a", clock, 1, 1)])
    other = FakeStage("b", clock, 1, 1)
    other.num_features = NF + 1
    with pytest.raises(ValueError, match="num_features"):
        RoutedTreeStage([a, other])


# ------------------------------------------------------------------------------------------
# factory on a real model

@pytest.fixture(scope="module")
def real_model():
    from tests.runtime.trees.test_tl2cgen import train_model
    return train_model(7, n_trees=16, depth=3)


@pytest.fixture(scope="module")
def real_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("router_cache")


def test_build_tree_stage_routed_equals_xgboost(rng, real_model, real_cache):
    from tests.runtime.trees.test_tl2cgen import edge_rows
    stage, report = build_tree_stage(real_model, None, paths=("native", "tl2cgen", "xgboost", "onnx"),
                                     cache_dirs=[real_cache], batch_sizes=(1, 4, 32), repeats=5,
                                     progress=lambda m: None)
    import importlib.util
    want = {"tl2cgen", "xgboost"} | ({"onnx"} if importlib.util.find_spec("onnxmltools") else set())
    assert stage.name == "auto" and want <= set(report["built"])
    assert report["routing"]["calibrated"] and report["paths"]["tl2cgen"]["parity"]["max_prob_diff"] <= PROB_TOL
    for b in (1, 3, 32, 77):
        rows = edge_rows(rng, real_model, b)
        before = rows.copy()
        got = stage.predict_margin(rows)
        want = xgboost_margin(real_model, rows)
        assert np.abs(1 / (1 + np.exp(-got)) - 1 / (1 + np.exp(-want))).max() <= PROB_TOL
        assert np.array_equal(rows, before, equal_nan=True)
    assert sum(stage.stats()["calls"].values()) == 4 and not stage.stats()["failures"]["tl2cgen"]


def test_build_tree_stage_skips_failed_paths(real_model, real_cache, monkeypatch, caplog):
    import uwrt.runtime.trees.tl2cgen as tc
    from uwrt.runtime.trees.tl2cgen import TreeCompileError

    def broken(*a, **k):
        raise TreeCompileError("injected compile failure")

    monkeypatch.setattr(tc, "compile_tl2cgen", broken)
    monkeypatch.setitem(sys.modules, "uwrt.runtime.trees.native", None)  # import fails -> skipped
    with caplog.at_level(logging.INFO, logger="uwrt.trees"):
        stage, report = build_tree_stage(real_model, None, paths=("native", "tl2cgen", "xgboost"),
                                         cache_dirs=[real_cache], calibrate=False)
    assert report["built"] == ["xgboost"] and set(report["failures"]) == {"native", "tl2cgen"}
    assert "injected compile failure" in caplog.text and "'native' skipped" in caplog.text
    assert stage.name == "auto" and not report["routing"]["calibrated"]
    with pytest.raises(BackendError, match="requested but cannot be built"):  # explicit request: raise
        build_tree_stage(real_model, None, paths=("tl2cgen",), cache_dirs=[real_cache])
    single, _ = build_tree_stage(real_model, None, paths=("xgboost",), cache_dirs=[real_cache])
    assert single.name == "xgboost"
    with pytest.raises(ValueError, match="unknown tree path"):
        build_tree_stage(real_model, None, paths=("fpga",))
