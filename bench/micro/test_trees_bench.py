"""The tree stage per path (xgboost reference; the compiled paths of uwrt.runtime.trees.router when they
build here) per batch size, each checked against xgboost's margins."""
import os

import numpy as np
import pytest

from uwrt.runtime.trees.base import XGBoostTreeStage


def _paths():
    env = os.environ.get("UWRT_MICRO_TREE_PATHS")
    if env:
        return [p.strip() for p in env.split(",") if p.strip()]
    try:
        from uwrt.runtime.trees.router import KNOWN_PATHS
        return list(KNOWN_PATHS)
    except ImportError:
        return ["xgboost"]


_stages = {}


def stage_for(path, booster, bundle, tmp_path_factory):
    if path not in _stages:
        if path == "xgboost":
            _stages[path] = XGBoostTreeStage(booster)
        else:
            router = pytest.importorskip("uwrt.runtime.trees.router")
            try:
                st, _ = router.build_tree_stage(booster, bundle, paths=(path,), calibrate=False,
                                                cache_dirs=[tmp_path_factory.mktemp(f"trees-{path}")])
            except Exception as e:  # noqa: BLE001 - a path that cannot build here is reported as a skip
                _stages[path] = e
            else:
                _stages[path] = st
    st = _stages[path]
    if isinstance(st, Exception):
        pytest.skip(f"tree path {path!r} unavailable here: {type(st).__name__}: {st}")
    return st


@pytest.mark.parametrize("batch", [1, 8, 32, 128])
@pytest.mark.parametrize("path", _paths())
def test_tree_stage(benchmark, booster, bundle, rows_by_batch, tmp_path_factory, path, batch):
    benchmark.group = f"trees batch {batch}"
    st = stage_for(path, booster, bundle, tmp_path_factory)
    rows = rows_by_batch[batch]
    ref = XGBoostTreeStage(booster).predict_margin(rows)
    out = benchmark(st.predict_margin, rows)
    assert out.shape == (batch,)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
