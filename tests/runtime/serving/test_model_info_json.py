"""GetModelInfo's settings map: every value is JSON text (issue 14: values were Python reprs such
as "(8, 32, 128)" and "True", which a client in another language cannot parse)."""
from __future__ import annotations

import json

import numpy as np

from uwrt.runtime.config import RuntimeConfig
from uwrt.runtime.serving.server import ServingRuntime, json_value


def test_json_value():
    assert json_value((8, 32, 128)) == "[8,32,128]" and json_value(True) == "true" and json_value(None) == "null"
    assert json_value("cpu") == '"cpu"' and json_value(2.5) == "2.5"
    assert json_value({"b": 1, "a": [1]}) == '{"a":[1],"b":1}'
    assert json_value(np.int64(3)) == "3" and json_value(np.float32(0.5)) == "0.5"
    assert json_value(np.bool_(True)) == "true"
    assert json.loads(json_value(object())).startswith("<object")          # anything else: its string


def test_every_setting_is_json_with_its_knob_type(pipe):
    cfg = RuntimeConfig()
    rt = ServingRuntime(pipe, cfg, profile="cpu", profile_reason="cpu profile requested")
    try:
        info = rt.model_info()
    finally:
        rt.executor.shutdown(wait=False)
    settings = {k: json.loads(v) for k, v in info.settings.items()}      # raises if any is not JSON
    flat = cfg.flat()
    assert {k: settings[k] for k in flat} == flat
    assert settings["batching.length_buckets"] == [8, 32, 128] and settings["tree_path"] == "auto"
    assert isinstance(settings["grace_s"], float) and isinstance(settings["port"], int)
    assert settings["profile.reason"] == "cpu profile requested" and info.tree_backend == "auto"
    assert any(k.startswith("stats.") for k in settings) and any(k.startswith("trees.") for k in settings)
