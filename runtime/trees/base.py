"""The tree stage: tabular + embedding row -> margin (log-odds of default).

`TreeStage` is the interface the pipeline calls; the compiled Treelite/TL2cgen stage (trees
issue) implements it too. `XGBoostTreeStage` is the reference path. `TreeExplainer` computes
exact TreeSHAP contributions (xgboost `pred_contribs`), which the policy groups into reasons.
"""
from __future__ import annotations

import logging
import pathlib
from typing import Protocol

import numpy as np
import xgboost as xgb

from uwrt.runtime.errors import BundleError


class TreeStage(Protocol):
    """Margin (log-odds) per row for float32 rows [B, num_features]; NaN means missing.

    Must be batch invariant (a row's margin does not depend on the other rows) and must not
    mutate its input. Thread safety is per implementation.
    """
    name: str
    num_features: int

    def predict_margin(self, rows: np.ndarray) -> np.ndarray: ...


class Explainer(Protocol):
    """Exact TreeSHAP contributions [B, F + 1] for rows [B, F] (last column: the bias); each row
    sums to the margin. `TreeExplainer`, `FallbackExplainer` and the compiled NativeExplainer."""

    def contributions(self, rows: np.ndarray) -> np.ndarray: ...


def load_booster(model: str | pathlib.Path | bytes | bytearray, *, nthread: int = 1) -> xgb.Booster:
    """A Booster from a model file or its (already verified) bytes, with an explicit thread count."""
    try:
        booster = xgb.Booster(model_file=bytearray(model) if isinstance(model, (bytes, bytearray)) else str(model))
    except xgb.core.XGBoostError as e:
        raise BundleError(f"cannot load tree model: {e}") from e
    booster.set_param({"nthread": nthread})
    return booster


def check_rows(rows: np.ndarray, num_features: int) -> np.ndarray:
    """C-contiguous float32 view of `rows` (a copy only if needed); raises on a bad shape."""
    if rows.ndim != 2 or rows.shape[1] != num_features:
        raise ValueError(f"expected rows [B, {num_features}], got {rows.shape}")
    if rows.dtype != np.float32 or not rows.flags.c_contiguous:
        rows = np.ascontiguousarray(rows, dtype=np.float32)
    return rows


class XGBoostTreeStage:
    """xgboost `inplace_predict` with explicit thread count (1 by default: latency, and the
    encoder owns the other core). Safe to call from several threads (xgboost's predictor is
    thread safe for inplace prediction)."""
    name = "xgboost"

    def __init__(self, booster: xgb.Booster) -> None:
        self.booster = booster
        self.num_features = booster.num_features()

    def predict_margin(self, rows: np.ndarray) -> np.ndarray:
        if rows.ndim != 2 or rows.shape[1] != self.num_features:
            raise ValueError(f"expected rows [B, {self.num_features}], got {rows.shape}")
        if rows.shape[0] == 0:
            return np.zeros(0, np.float64)
        out = self.booster.inplace_predict(rows, predict_type="margin", missing=np.nan)
        return np.asarray(out, dtype=np.float64).reshape(-1)


class TreeExplainer:
    """Exact TreeSHAP contributions [B, F + 1] (last column: the bias / baseline).

    Rows sum to the margin. Costs milliseconds per row at depth 6 (see shared notes), so the
    pipeline only calls it for adverse outcomes.
    """

    def __init__(self, booster: xgb.Booster) -> None:
        self.booster = booster

    def contributions(self, rows: np.ndarray) -> np.ndarray:
        if rows.shape[0] == 0:
            return np.zeros((0, self.booster.num_features() + 1))
        dm = xgb.DMatrix(rows, missing=np.nan)
        return np.asarray(self.booster.predict(dm, pred_contribs=True), dtype=np.float64)


class FallbackExplainer:
    """Exact TreeSHAP from a fast explainer (the compiled one, runtime/trees/native.py), falling
    back to another (xgboost `pred_contribs`) when it raises: logged with the traceback and
    counted, never a lost reason. Thread safety: as the wrapped explainers; counters are plain
    ints updated from the one pipeline worker."""

    def __init__(self, primary: Explainer, fallback: Explainer, *, name: str = "native") -> None:
        self.primary, self.fallback, self.name = primary, fallback, name
        self.fallbacks = 0

    def contributions(self, rows: np.ndarray) -> np.ndarray:
        try:
            return self.primary.contributions(rows)
        except Exception:  # noqa: BLE001 - the reasons must still come out
            self.fallbacks += 1
            logging.getLogger("uwrt.trees").exception(
                "%s TreeSHAP failed on %d rows; computing reasons with xgboost instead (fallback #%d)",
                self.name, len(rows), self.fallbacks)
            return self.fallback.contributions(rows)
