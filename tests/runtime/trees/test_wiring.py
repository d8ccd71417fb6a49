"""The tree stage and reasons as the pipeline and server build them from the configuration:
tree_path routes, compiled reasons == xgboost's, fallbacks logged and counted, GetModelInfo."""
import json
import logging

import pytest

from uwrt.runtime.config import RuntimeConfig
from uwrt.runtime.errors import InvalidRequest
from uwrt.runtime.pipeline import Pipeline
from uwrt.runtime.trees.base import FallbackExplainer, TreeExplainer
from uwrt.runtime.trees.build import TREE_PATHS


@pytest.fixture(scope="module")
def xgb_pipe(small_bundle):
    """The reference: xgboost for margins and pred_contribs for reasons."""
    return Pipeline.from_dir(small_bundle, config=RuntimeConfig(tree_path="xgboost", reasons_path="xgboost"))


def _decide(pipe, reqs, size):
    out = []
    for i in range(0, len(reqs), size):
        out += pipe.decide(reqs[i:i + size])
    return out


def test_default_pipeline_routes_bit_identical_paths_with_compiled_reasons(pipe, xgb_pipe, traffic):
    assert pipe.trees.name == "auto" and [s.name for s in pipe.trees.stages] == list(TREE_PATHS["auto"])
    assert isinstance(pipe.explainer, FallbackExplainer) and pipe.tree_stats()["reasons"] == "native"
    fast, ref = _decide(pipe, traffic, 32), _decide(xgb_pipe, traffic, 32)
    adverse = 0
    for a, b in zip(fast, ref, strict=True):
        assert not isinstance(a, InvalidRequest)
        # same bits: the score of a request never depends on the path its batch size chose
        assert a.probability_of_default == b.probability_of_default and a.outcome == b.outcome
        assert [r.code for r in a.reasons] == [r.code for r in b.reasons]
        adverse += bool(len(a.reasons))
    assert adverse > 10, "the traffic must exercise reasons"


def test_score_does_not_depend_on_batch_size_route(pipe, traffic):
    """Batch sizes 1, 3 and 64 may route to different tree paths: the PD must be identical."""
    by1, by3, by64 = (_decide(pipe, traffic[:64], n) for n in (1, 3, 64))
    for a, b, c in zip(by1, by3, by64, strict=True):
        assert a.probability_of_default == b.probability_of_default == c.probability_of_default
        assert [r.code for r in a.reasons] == [r.code for r in b.reasons] == [r.code for r in c.reasons]


def test_calibrated_routing_is_reported(small_bundle, traffic):
    p = Pipeline.from_dir(small_bundle)
    p.calibrate_trees([traffic[:8], traffic[8:40]], batch_sizes=[1, 8, 32])
    st = p.tree_stats()
    assert st["calibrated"] is True and st["crossovers"].startswith("b>=1:")
    assert st["paths"] == "native,xgboost" and st["fallbacks"] == 0


@pytest.mark.parametrize("path", ["native", "tl2cgen", "xgboost"])
def test_forced_tree_paths_agree_with_xgboost(small_bundle, xgb_pipe, traffic, path):
    p = Pipeline.from_dir(small_bundle, config=RuntimeConfig(tree_path=path))
    assert p.trees.name == path
    for a, b in zip(_decide(p, traffic[:100], 16), _decide(xgb_pipe, traffic[:100], 16), strict=True):
        assert abs(a.probability_of_default - b.probability_of_default) <= 1e-6


class _Broken:
    def contributions(self, rows):
        raise RuntimeError("injected TreeSHAP fault")


def test_broken_compiled_reasons_fall_back_logged_and_counted(small_bundle, xgb_pipe, traffic, caplog):
    p = Pipeline.from_dir(small_bundle)
    p.explainer = FallbackExplainer(_Broken(), TreeExplainer(p.explainer.fallback.booster))
    with caplog.at_level(logging.ERROR, logger="uwrt.trees"):
        got = _decide(p, traffic[:64], 16)
    ref = _decide(xgb_pipe, traffic[:64], 16)
    assert [[r.code for r in a.reasons] for a in got] == [[r.code for r in b.reasons] for b in ref]
    n = p.tree_stats()["reasons_fallbacks"]
    assert n > 0 and "injected TreeSHAP fault" in caplog.text


def test_reasons_fall_back_to_xgboost_when_native_cannot_build(small_bundle, monkeypatch, caplog):
    import uwrt.runtime.trees.native as tn

    def boom(*a, **k):
        raise tn.UnsupportedTreeModel("injected: unsupported")
    monkeypatch.setattr(tn, "build_native", boom)
    with caplog.at_level(logging.WARNING):
        p = Pipeline.from_dir(small_bundle, config=RuntimeConfig(tree_path="xgboost"))
    assert isinstance(p.explainer, TreeExplainer) and p.tree_stats()["reasons"] == "xgboost"
    assert "compiled TreeSHAP unavailable" in caplog.text and "injected" in p.tree_report["reasons_error"]


def test_model_info_reports_trees(pipe):
    from tests.runtime.serving.test_server import Harness, run
    from uwrt.runtime.pb import pb

    async def main():
        async with Harness(pipe) as h:
            return await h.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5)
    info = run(main())
    settings = {k: json.loads(v) for k, v in info.settings.items()}       # every value is JSON text
    assert info.tree_backend == "auto" == settings["tree_path"] and settings["trees.reasons"] == "native"
    assert settings["trees.paths"] == "native,xgboost" and "trees.crossovers" in settings
