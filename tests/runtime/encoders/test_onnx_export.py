"""The exported ONNX encoder graph is clean (no initializer without a reader, so ONNX Runtime has
nothing to warn about at start), and what ORT itself prints reaches our log instead of the
terminal in raw ANSI colour (issue 14)."""
from __future__ import annotations

import os
import subprocess
import sys

import onnx
import pytest

from tests.factories import ROOT
from tests.runtime.encoders.test_torch_encoder import CFG, random_state
from uwrt.runtime.encoders.onnx_encoder import export_onnx


@pytest.mark.parametrize("attention", ["mha", "matmul"])
def test_every_initializer_is_read_by_a_node(attention):
    model = onnx.load_from_string(export_onnx(CFG, random_state(CFG, 7), attention=attention))
    used = {i for n in model.graph.node for i in n.input}
    unused = [t.name for t in model.graph.initializer if t.name not in used]
    assert not unused and len(model.graph.initializer) > 20


def _run(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(
        os.pathsep) if p])}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["mha", "matmul"])
def test_encoder_start_prints_nothing_from_onnxruntime(attention):
    """A fresh process building the ONNX encoder (export, ORT_ENABLE_ALL session) writes no ORT
    warning and no ANSI escape to stderr."""
    r = _run(f"""
import logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
from tests.runtime.encoders.test_torch_encoder import CFG, random_state
from uwrt.runtime.encoders.onnx_encoder import OnnxEncoderBackend
be = OnnxEncoderBackend(CFG, random_state(CFG, 7), optimization="ort", attention={attention!r})
print("ok", be.session.get_providers()[0])
""")
    assert r.returncode == 0 and "ok CPUExecutionProvider" in r.stdout, r.stderr
    assert "\x1b[" not in r.stderr and "Removing initializer" not in r.stderr, r.stderr
    assert "onnxruntime" not in r.stderr.replace("uwrt.encoder.onnx", ""), r.stderr


def test_what_onnxruntime_prints_is_routed_through_our_log():
    """The routing is not vacuous: a graph ORT does warn about (an unused initializer) gives one
    WARNING record of "uwrt.encoder.onnx.ort" without colour codes, and nothing raw on stderr."""
    r = _run("""
import logging, sys
import numpy as np, onnx.helper as oh, onnxruntime as ort
from onnx import TensorProto, numpy_helper
from uwrt.runtime.encoders.onnx_encoder import ort_session
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(levelname)s %(name)s: %(message)s")
g = oh.make_graph([oh.make_node("Identity", ["x"], ["y"])], "g",
                  [oh.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                  [oh.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
                  initializer=[numpy_helper.from_array(np.ones(3, np.float32), "unused_w")])
m = oh.make_model(g, opset_imports=[oh.make_opsetid("", 17)])
m.ir_version = 8
s = ort_session(m.SerializeToString(), ort.SessionOptions(), ["CPUExecutionProvider"])
print("ran", s.run(None, {"x": np.ones(2, np.float32)})[0].tolist())
""")
    assert r.returncode == 0 and "ran [1.0, 1.0]" in r.stdout, r.stderr
    assert r.stderr == "", r.stderr
    records = [line for line in r.stdout.splitlines() if line.startswith("WARNING uwrt.encoder.onnx.ort:")]
    assert len(records) == 1 and "Removing initializer 'unused_w'" in records[0] and "\x1b" not in records[0]
