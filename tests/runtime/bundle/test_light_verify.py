"""Verifying a bundle without torch, ONNX Runtime or xgboost: the UBJSON tree header, the numpy view
of the weights, and `bundle inspect` / `verify` in a fresh interpreter."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.factories import ROOT
from tests.runtime.bundle.helpers import SCHEMA, booster, manifest, save_manifest
from uwrt.runtime.bundle import ubjson
from uwrt.runtime.bundle.bundle import _numpy_state, load_bundle
from uwrt.runtime.errors import BundleError


def _header_via_xgboost(b):
    names = b.feature_names
    return (b.num_features(), json.loads(b.save_config())["learner"]["objective"]["name"],
            tuple(names) if names else None, b.num_boosted_rounds())


@pytest.mark.parametrize("named", [False, True])
@pytest.mark.parametrize("fmt", ["ubj", "json"])
def test_tree_header_matches_xgboost(rng, named, fmt):
    import xgboost as xgb
    n = int(rng.integers(2, 12))
    x = rng.normal(size=(80, n)).astype(np.float32)
    y = (x[:, 0] + rng.normal(size=80) > 0).astype(np.float32)
    names = [f"f_{i}" for i in range(n)] if named else None
    b = xgb.train({"objective": "binary:logistic", "max_depth": int(rng.integers(1, 5)), "nthread": 1},
                  xgb.DMatrix(x, y, feature_names=names), num_boost_round=int(rng.integers(1, 9)))
    h = ubjson.tree_header(bytes(b.save_raw(fmt)))
    assert (h.num_features, h.objective, h.feature_names, h.num_trees) == _header_via_xgboost(b)


def test_ubjson_decodes_like_json():
    b = booster(5)
    doc, ref = ubjson.loads(bytes(b.save_raw("ubj"))), json.loads(bytes(b.save_raw("json")))

    def same(a, r, path="$"):
        if isinstance(a, np.ndarray):
            np.testing.assert_allclose(a.astype(np.float64), np.asarray(r, np.float64), rtol=1e-6, err_msg=path)
        elif isinstance(a, dict):
            assert a.keys() == r.keys(), path
            for k in a:
                same(a[k], r[k], f"{path}.{k}")
        elif isinstance(a, list):
            assert len(a) == len(r), path
            for i, (u, v) in enumerate(zip(a, r, strict=True)):
                same(u, v, f"{path}[{i}]")
        else:
            assert a == r or a == pytest.approx(r, rel=1e-6), path
    same(doc, ref)


def test_malformed_ubjson_raises_value_error_only(rng):
    """Truncated, bit-flipped and random inputs give ValueError (or a value), never another
    exception, a hang or a huge allocation."""
    good = bytes(booster(4).save_raw("ubj"))
    cases = [good[:k] for k in rng.integers(0, len(good), 60)]
    for _ in range(200):
        bad = bytearray(good)
        for pos in rng.integers(0, len(bad), int(rng.integers(1, 4))):
            bad[pos] = int(rng.integers(0, 256))
        cases.append(bytes(bad))
    cases += [bytes(rng.integers(0, 256, int(rng.integers(0, 64)), dtype=np.uint8)) for _ in range(100)]
    cases += [b"[#L\x7f\xff\xff\xff\xff\xff\xff\xff", b"[$d#L\x00\x00\x10\x00\x00\x00\x00\x00", b"[" * 100 + b"]" * 100,
              b"{L\x00\x00\x00\x00\x00\x00\x00\x01aZ}extra"]
    for data in cases:
        try:
            ubjson.tree_header(data)
        except ValueError:
            pass


def test_light_and_full_load_agree(bundle):
    light = load_bundle(bundle.path, check_trees_with_xgboost=False)
    assert light == load_bundle(bundle.path)


def test_light_load_still_refuses_incompatible_trees(bundle):
    (bundle.path / "trees.ubj").write_bytes(bytes(booster(len(SCHEMA.features) + 2).save_raw("ubj")))
    m = manifest(bundle.path)
    save_manifest(bundle.path, m, redigest=True)
    with pytest.raises(BundleError, match="num_features"):
        load_bundle(bundle.path, check_trees_with_xgboost=False)
    (bundle.path / "trees.ubj").write_bytes(b"{L\x00\x00\x00\x00\x00\x00\x00\x07learner}")
    save_manifest(bundle.path, manifest(bundle.path), redigest=True)
    with pytest.raises(BundleError, match="trees.ubj: not a readable XGBoost model"):
        load_bundle(bundle.path, check_trees_with_xgboost=False)


def test_numpy_weights_view_all_float_dtypes(rng):
    import torch
    from safetensors.torch import save
    ref = {f"w{i}": torch.from_numpy(rng.normal(size=(3, 4)).astype(np.float32)) for i in range(4)}
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        blob = save({k: v.to(dtype) for k, v in ref.items()})
        got = _numpy_state(blob, "w.safetensors")
        for k, v in ref.items():
            np.testing.assert_array_equal(got[k].astype(np.float64), v.to(dtype).double().numpy())
    with pytest.raises(BundleError, match="must be floating point"):
        _numpy_state(save({"i": torch.arange(3)}), "w.safetensors")
    with pytest.raises(BundleError, match="not a readable safetensors file"):
        _numpy_state(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage", "w.safetensors")


@pytest.mark.parametrize("command", ["inspect", "verify"])
def test_inspect_and_verify_import_no_torch_onnxruntime_or_xgboost(bundle, command):
    code = ("import sys; from uwrt.runtime.cli.main import main; "
            f"rc = main(['bundle', '{command}', sys.argv[1]]); "
            "heavy = [m for m in ('torch', 'xgboost', 'onnxruntime') if m in sys.modules]; "
            "assert rc == 0 and not heavy, (rc, heavy)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "")
                                                                       .split(os.pathsep) if p]))
    r = subprocess.run([sys.executable, "-c", code, str(bundle.path)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert ("verification OK" if command == "inspect" else "files match manifest.json") in r.stdout
