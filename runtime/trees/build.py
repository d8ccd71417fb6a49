"""Tree-stage factory: `RuntimeConfig.tree_path` / `tree_cache_dir` / `reasons_path` -> (stage,
explainer, report). Thread safety: call at load time, from one thread.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from uwrt.runtime.config import RuntimeConfig
from uwrt.runtime.trees.base import Explainer, FallbackExplainer, TreeExplainer, TreeStage, load_booster

if TYPE_CHECKING:
    from uwrt.runtime.bundle.bundle import Bundle

log = logging.getLogger("uwrt.trees")


#: tree_path -> the paths built, in preference order (runtime/trees/router.py routes between them).
TREE_PATHS = {"auto": ("native", "xgboost"), "all": ("native", "tl2cgen", "xgboost", "onnx"),
              "native": ("native",), "tl2cgen": ("tl2cgen",), "xgboost": ("xgboost",), "onnx": ("onnx",)}


def build_trees(bundle: Bundle, cfg: RuntimeConfig, *, tree_threads: int | None = None
                ) -> tuple[TreeStage, Explainer, dict[str, Any]]:
    """(tree stage, explainer, report) as configured by tree_path / tree_cache_dir / reasons_path.

    Several paths -> a RoutedTreeStage (uncalibrated: preference order until `calibrate`, which
    the server runs at warm-up); a path that cannot be built is skipped with a warning (in the
    report). One forced path that cannot be built raises. Reasons: the compiled exact TreeSHAP
    when reasons_path is "native" (built with the native tree path, or on its own), wrapped so a
    failure falls back to xgboost pred_contribs; if it cannot be built at all, xgboost, logged."""
    from uwrt.runtime.trees.cache import default_cache_dirs
    from uwrt.runtime.trees.router import build_tree_stage
    threads = cfg.tree_threads if tree_threads is None else tree_threads
    cache_dirs = [cfg.tree_cache_dir] if cfg.tree_cache_dir else default_cache_dirs(bundle.path)
    # the factory sets nthread on the booster it gets: the stage and the explainer each own one
    stage, report = build_tree_stage(load_booster(bundle.tree_model_bytes(), nthread=threads), bundle,
                                     paths=TREE_PATHS[cfg.tree_path], cache_dirs=cache_dirs, tree_threads=threads,
                                     calibrate=False, label=cfg.tree_path)
    booster = load_booster(bundle.tree_model_bytes(), nthread=threads)
    xgb_explainer = TreeExplainer(booster)
    explainer: Explainer = xgb_explainer
    report["reasons"] = "xgboost"
    if cfg.reasons_path == "native":
        native = report.pop("native_explainer", None)
        if native is None:
            try:
                from uwrt.runtime.trees.native import build_native
                _, native = build_native(booster, cache_dirs)
            except Exception as e:  # noqa: BLE001 - reasons must still work: slower, and said so
                log.warning("compiled TreeSHAP unavailable (%s: %s); reasons via xgboost pred_contribs (ms a row)",
                            type(e).__name__, e)
                report["reasons_error"] = f"{type(e).__name__}: {e}"
        if native is not None:
            explainer = FallbackExplainer(native, xgb_explainer)
            report["reasons"] = "native"
    report.pop("native_explainer", None)
    return stage, explainer, report


