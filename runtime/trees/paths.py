"""Tree-stage implementations besides the xgboost reference (runtime/trees/base.py).

Each has `name`, `num_features` and `predict_margin(rows float32 [B, F]) -> float64 [B]`
(NaN = missing, the input is never mutated) and is parity-tested against xgboost:

* `TL2cgenPredictorStage` ("tl2cgen_predictor"): tl2cgen.Predictor + DMatrix on the same
  library; benchmark only. One call at a time (internal lock).
* `GTILStage` ("gtil"): Treelite's interpreter, nthread=1. Thread safe.
* `ONNXTreeStage` ("onnx"): xgboost -> ONNX (onnxmltools, opset 15) rewritten from the
  classifier to a TreeEnsembleRegressor that outputs the raw margin, run by onnxruntime with
  one intra/inter-op thread. Thread safe (InferenceSession.run is).
"""
from __future__ import annotations

import threading

import numpy as np

from uwrt.runtime.trees.base import check_rows
from uwrt.runtime.trees.tl2cgen import CompiledLibrary, TreeCompileError, to_treelite

__all__ = ["TL2cgenPredictorStage", "GTILStage", "ONNXTreeStage", "ONNX_OPSET"]

ONNX_OPSET = 15  # onnxmltools 1.16 converts up to opset 15


class TL2cgenPredictorStage:
    """tl2cgen.Predictor on the compiled library (the wrapper path; benchmark only).
    tl2cgen's Predictor is one-call-at-a-time: calls are serialised by a lock."""
    name = "tl2cgen_predictor"

    def __init__(self, lib: CompiledLibrary) -> None:
        import tl2cgen
        self._tl2cgen = tl2cgen
        self.num_features = lib.num_features
        self._pred = tl2cgen.Predictor(str(lib.cached.path), nthread=1)
        self._lock = threading.Lock()

    def predict_margin(self, rows: np.ndarray) -> np.ndarray:
        rows = check_rows(rows, self.num_features)
        if rows.shape[0] == 0:
            return np.zeros(0, np.float64)
        dm = self._tl2cgen.DMatrix(rows)  # dense float32 (CSR / dtype= casts break under numpy 2)
        with self._lock:
            out = self._pred.predict(dm, pred_margin=True)
        return np.asarray(out, np.float64).reshape(-1)


class GTILStage:
    """Treelite's GTIL interpreter, one thread. Thread safe."""
    name = "gtil"

    def __init__(self, booster) -> None:
        import treelite
        self._gtil = treelite.gtil
        self.model = to_treelite(booster)
        self.num_features = booster.num_features()

    def predict_margin(self, rows: np.ndarray) -> np.ndarray:
        rows = check_rows(rows, self.num_features)
        if rows.shape[0] == 0:
            return np.zeros(0, np.float64)
        out = self._gtil.predict(self.model, rows, nthread=1, pred_margin=True)
        return np.asarray(out, np.float64).reshape(-1)


def booster_to_onnx_margin(booster):
    """onnx.ModelProto: input "x" float [N, F] -> "margin" float [N, 1] (raw margin, base score
    included). onnxmltools emits a TreeEnsembleClassifier with a LOGISTIC post-transform; we
    rebuild it as a TreeEnsembleRegressor (same nodes, leaf weights as targets, no transform)
    so no precision is lost inverting a float32 probability."""
    import onnx
    from onnx import helper
    from onnxmltools.convert import convert_xgboost
    from onnxmltools.convert.common.data_types import FloatTensorType
    nf = booster.num_features()
    try:
        clf = convert_xgboost(booster, initial_types=[("x", FloatTensorType([None, nf]))], target_opset=ONNX_OPSET)
    except Exception as e:
        raise TreeCompileError(f"onnxmltools cannot convert the model: {e}") from e
    nodes = [n for n in clf.graph.node if n.op_type == "TreeEnsembleClassifier"]
    if len(nodes) != 1:
        raise TreeCompileError(f"unexpected ONNX graph from onnxmltools: {[n.op_type for n in clf.graph.node]}")
    attrs = {a.name: helper.get_attribute_value(a) for a in nodes[0].attribute}
    if len(attrs.get("classlabels_int64s", [])) != 2 or set(attrs.get("class_ids", [])) - {0}:
        raise TreeCompileError("ONNX rewrite supports binary models with one class score only")
    kw = {k: v for k, v in attrs.items() if k.startswith("nodes_")}
    kw.update(target_ids=attrs["class_ids"], target_nodeids=attrs["class_nodeids"],
              target_treeids=attrs["class_treeids"], target_weights=attrs["class_weights"],
              n_targets=1, aggregate_function="SUM", post_transform="NONE")
    if "base_values" in attrs:
        kw["base_values"] = attrs["base_values"]
    node = helper.make_node("TreeEnsembleRegressor", ["x"], ["margin"], domain="ai.onnx.ml", **kw)
    graph = helper.make_graph([node], "uwrt_trees_margin",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None, nf])],
                              [helper.make_tensor_value_info("margin", onnx.TensorProto.FLOAT, [None, 1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET),
                                                    helper.make_opsetid("ai.onnx.ml", 1)])
    model.ir_version = clf.ir_version
    onnx.checker.check_model(model)
    return model


class ONNXTreeStage:
    """onnxruntime TreeEnsembleRegressor (margin), float32 input, 1 intra + 1 inter-op thread.
    Thread safe."""
    name = "onnx"

    def __init__(self, booster, *, threads: int = 1) -> None:
        import onnxruntime as ort
        self.num_features = booster.num_features()
        self.model = booster_to_onnx_margin(booster)
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = threads
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self._sess = ort.InferenceSession(self.model.SerializeToString(), so, providers=["CPUExecutionProvider"])

    def predict_margin(self, rows: np.ndarray) -> np.ndarray:
        rows = check_rows(rows, self.num_features)  # ORT rejects float64
        if rows.shape[0] == 0:
            return np.zeros(0, np.float64)
        (out,) = self._sess.run(["margin"], {"x": rows})
        return np.asarray(out, np.float64).reshape(-1)
