"""Model bundle: round trip, determinism, tamper detection, compatibility checks, CLI."""
from __future__ import annotations

import argparse
import json
import logging

import numpy as np
import pytest
import torch
import xgboost as xgb
from safetensors.torch import save_file

from tests.runtime.bundle.helpers import CFG, EMB_DIM, POLICY, SCHEMA
from tests.runtime.bundle.helpers import booster as _booster
from tests.runtime.bundle.helpers import flip_byte as _flip_byte
from tests.runtime.bundle.helpers import manifest as _manifest
from tests.runtime.bundle.helpers import save_manifest as _save_manifest
from tests.runtime.bundle.helpers import write_test_bundle as _write
from uwrt.runtime.bundle import bundle as bmod
from uwrt.runtime.bundle.bundle import export_parts, load_bundle
from uwrt.runtime.bundle.schema import FeatureSchema, Policy, RequestLimits
from uwrt.runtime.cli.bundle import register
from uwrt.runtime.errors import BundleError

# ---------------------------------------------------------------------------- round trip

def test_round_trip(bundle, parts):
    loaded = load_bundle(bundle.path)
    assert loaded == bundle
    assert (loaded.schema, loaded.encoder_config, loaded.policy) == (SCHEMA, CFG, POLICY)
    assert loaded.tree_version == "trees-1" and loaded.bundle_id == "b-test"
    ident = loaded.identity()
    assert (ident.bundle_id, ident.bundle_digest, ident.encoder_version, ident.tree_version,
            ident.feature_schema_version, ident.policy_version) == (
        "b-test", loaded.bundle_digest, "enc-test", "trees-1", "fs-test", POLICY.version)
    state = loaded.encoder_state()
    assert state.keys() == parts["encoder_state"].keys()
    for k, v in parts["encoder_state"].items():
        assert torch.equal(state[k], v), k
    x = xgb.DMatrix(np.random.default_rng(1).normal(size=(5, len(SCHEMA.features))).astype(np.float32))
    for booster in (xgb.Booster(model_file=str(loaded.tree_model_path())),
                    xgb.Booster(model_file=loaded.tree_model_bytes())):
        np.testing.assert_array_equal(booster.predict(x), parts["tree_model"].predict(x))
    m = _manifest(bundle.path)
    assert set(m["files"]) == {"encoder.safetensors", "trees.ubj", "model_card.json", "model_card.md"}
    assert m["components"]["trees"] == {"file": "trees.ubj", "version": "trees-1",
                                        "num_features": len(SCHEMA.features), "objective": "binary:logistic"}
    assert m["created_at"].endswith("Z")
    assert (bundle.path / "manifest.json").read_text() == json.dumps(m, indent=2, sort_keys=True) + "\n"


def test_digest_stable_and_ignores_created_at(tmp_path, parts, bundle):
    again = _write(tmp_path / "again", parts)
    assert again.bundle_digest == bundle.bundle_digest
    m = _manifest(again.path)
    m["created_at"] = "1999-01-01T00:00:00Z"
    _save_manifest(again.path, m, redigest=False)
    assert load_bundle(again.path).bundle_digest == bundle.bundle_digest
    other = _write(tmp_path / "other", parts, policy=Policy(version="policy-2"))
    assert other.bundle_digest != bundle.bundle_digest


def test_tree_model_from_path_json_or_ubj(tmp_path, parts, bundle):
    for suffix in ("json", "ubj"):
        p = tmp_path / f"model.{suffix}"
        parts["tree_model"].save_model(str(p))
        b = _write(tmp_path / f"from_{suffix}", parts, tree_model=p)
        assert b.bundle_digest == bundle.bundle_digest


def test_overwrite_and_atomic_write(tmp_path, parts, bundle):
    with pytest.raises(BundleError, match="not empty"):
        _write(bundle.path, parts)
    (bundle.path / "cache").mkdir()
    b2 = _write(bundle.path, parts, bundle_id="b-2", overwrite=True)
    assert b2.bundle_id == "b-2" and not (bundle.path / "cache").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _write(empty, parts).bundle_digest == bundle.bundle_digest
    # A failed validation writes nothing, and no temporary directories are left behind.
    with pytest.raises(BundleError):
        _write(tmp_path / "bad", parts, tree_model=_booster(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "empty"]


def test_bad_extra_file_names(tmp_path, parts):
    for name in ("../escape", "/abs", "manifest.json", "trees.ubj", "cache/x"):
        with pytest.raises(BundleError):
            _write(tmp_path / "b", parts, extra_files={name: b"x"})
    with pytest.raises(BundleError, match="model_card.json: not valid JSON"):
        _write(tmp_path / "b", parts, extra_files={"model_card.json": "{nope"})


# ---------------------------------------------------------------------------- tamper detection

@pytest.mark.parametrize("name", ["encoder.safetensors", "trees.ubj", "model_card.json", "model_card.md"])
def test_flipped_byte_names_file(bundle, name):
    _flip_byte(bundle.path / name)
    with pytest.raises(BundleError, match=rf"{name}.*SHA-256.*tampered or corrupt"):
        load_bundle(bundle.path)


@pytest.mark.parametrize("name", ["encoder.safetensors", "trees.ubj", "model_card.md"])
def test_size_change_names_file(bundle, name):
    with open(bundle.path / name, "ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match=rf"{name}: .*bytes on disk.*tampered or corrupt"):
        load_bundle(bundle.path)


def test_encoder_state_rechecks_file(bundle):
    _flip_byte(bundle.path / "encoder.safetensors")
    with pytest.raises(BundleError, match="encoder.safetensors"):
        bundle.encoder_state()


def test_flipped_byte_in_manifest(bundle):
    text = (bundle.path / "manifest.json").read_text()
    (bundle.path / "manifest.json").write_text(text.replace('"b-test"', '"b-tesu"'))
    with pytest.raises(BundleError, match="manifest.json: bundle_digest mismatch"):
        load_bundle(bundle.path)
    (bundle.path / "manifest.json").write_text(text[:-10])
    with pytest.raises(BundleError, match="manifest.json: not valid JSON"):
        load_bundle(bundle.path)


def test_edited_policy_is_digest_mismatch(bundle):
    m = _manifest(bundle.path)
    m["policy"]["approve_max_pd"] = 0.12
    _save_manifest(bundle.path, m, redigest=False)
    with pytest.raises(BundleError, match="bundle_digest mismatch"):
        load_bundle(bundle.path)


@pytest.mark.parametrize("name", ["encoder.safetensors", "trees.ubj", "model_card.json"])
def test_deleted_file(bundle, name):
    (bundle.path / name).unlink()
    with pytest.raises(BundleError, match=rf"{name}: listed in manifest.json but missing"):
        load_bundle(bundle.path)


def test_missing_dir_and_manifest(tmp_path, bundle):
    with pytest.raises(BundleError, match="bundle directory not found"):
        load_bundle(tmp_path / "nope")
    (bundle.path / "manifest.json").unlink()
    with pytest.raises(BundleError, match="manifest.json is missing"):
        load_bundle(bundle.path)


@pytest.mark.parametrize("redigest", [False, True])
def test_format_version(bundle, redigest):
    m = _manifest(bundle.path)
    m["format_version"] = 2
    _save_manifest(bundle.path, m, redigest=redigest)
    with pytest.raises(BundleError, match="format_version 2 is newer.*upgrade uwrt"):
        load_bundle(bundle.path)
    m["format_version"] = 0
    _save_manifest(bundle.path, m, redigest=redigest)
    with pytest.raises(BundleError, match="unsupported format_version 0"):
        load_bundle(bundle.path)
    m["format_version"], m["format"] = 1, "something-else"
    _save_manifest(bundle.path, m, redigest=redigest)
    with pytest.raises(BundleError, match="not a uwrt bundle"):
        load_bundle(bundle.path)


def test_undeclared_files_refused_cache_ignored(bundle, caplog):
    (bundle.path / "cache" / "inductor").mkdir(parents=True)
    (bundle.path / "cache" / "inductor" / "blob.bin").write_bytes(b"x")
    with caplog.at_level(logging.WARNING, logger="uwrt.bundle"):
        load_bundle(bundle.path)
    assert not caplog.records
    (bundle.path / "notes.txt").write_text("stray")
    with pytest.raises(BundleError, match=r"^notes.txt: not declared in manifest.json"):
        load_bundle(bundle.path)
    (bundle.path / "notes.txt").unlink()
    (bundle.path / "extra" / "deep").mkdir(parents=True)
    with pytest.raises(BundleError, match=r"^extra/: not declared"):
        load_bundle(bundle.path)
    (bundle.path / "extra" / "deep").rmdir()
    (bundle.path / "extra").rmdir()
    load_bundle(bundle.path)


def test_symlinked_file_refused(bundle, tmp_path):
    real = tmp_path / "card.md"
    real.write_bytes((bundle.path / "model_card.md").read_bytes())
    (bundle.path / "model_card.md").unlink()
    (bundle.path / "model_card.md").symlink_to(real)
    with pytest.raises(BundleError, match="model_card.md: must be a regular file, not a symbolic link"):
        load_bundle(bundle.path)


# ---------------------------------------------------------------------------- compatibility

def test_num_features_mismatch(tmp_path, parts, bundle):
    with pytest.raises(BundleError,
                       match=rf"trees.ubj: tree model expects 5 features but .* lists {len(SCHEMA.features)}"):
        _write(tmp_path / "b", parts, tree_model=_booster(5))
    assert not (tmp_path / "b").exists()
    # A hand-built bundle whose manifest is self-consistent but whose trees do not fit.
    (bundle.path / "trees.ubj").write_bytes(bytes(_booster(5).save_raw("ubj")))
    m = _manifest(bundle.path)
    m["components"]["trees"]["num_features"] = 5
    _save_manifest(bundle.path, m, redigest=True)
    with pytest.raises(BundleError, match="trees.ubj: tree model expects 5 features"):
        load_bundle(bundle.path)


def test_tree_objective_and_feature_names(tmp_path, parts):
    n = len(SCHEMA.features)
    x, y = np.random.default_rng(0).normal(size=(32, n)), np.arange(32) % 2
    reg = xgb.train({"objective": "reg:squarederror"}, xgb.DMatrix(x, y), 2)
    with pytest.raises(BundleError, match="objective is 'reg:squarederror'"):
        _write(tmp_path / "b", parts, tree_model=reg)
    named = xgb.train({"objective": "binary:logistic"},
                      xgb.DMatrix(x, y, feature_names=[f"f{i}" for i in range(n)]), 2)
    with pytest.raises(BundleError, match="feature names differ"):
        _write(tmp_path / "b", parts, tree_model=named)
    ok = xgb.train({"objective": "binary:logistic"}, xgb.DMatrix(x, y, feature_names=SCHEMA.names), 2)
    _write(tmp_path / "b", parts, tree_model=ok)


def test_encoder_weights_wrong_shape(tmp_path, parts, bundle):
    bad = dict(parts["encoder_state"])
    key = next(k for k, v in bad.items() if v.dim() == 2)
    bad[key] = torch.zeros(bad[key].shape[0] + 1, bad[key].shape[1])
    with pytest.raises(BundleError, match=rf"encoder.safetensors: weights do not fit .*{key}"):
        _write(tmp_path / "b", parts, encoder_state=bad)
    save_file(bad, str(bundle.path / "encoder.safetensors"))
    _save_manifest(bundle.path, _manifest(bundle.path), redigest=True)
    with pytest.raises(BundleError, match=rf"encoder.safetensors: weights do not fit .*{key}"):
        load_bundle(bundle.path)


def test_emb_dim_mismatch(tmp_path, parts):
    schema = FeatureSchema.build("fs-x", list(SCHEMA.applicant), EMB_DIM + 1)
    with pytest.raises(BundleError, match="emb_dim=4 but feature_schema 'fs-x' has 5 embedding columns"):
        _write(tmp_path / "b", parts, schema=schema, tree_model=_booster(len(schema.features)))


# ---------------------------------------------------------------------------- CLI

def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="uwrt")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_create_from_parts_and_inspect(tmp_path, bundle, capsys):
    parts = export_parts(bundle, tmp_path / "parts")
    out = tmp_path / "created"
    argv = ["bundle", "create", "--out", str(out), "--trees", str(parts["trees"]),
            "--encoder-weights", str(parts["encoder_weights"]),
            "--encoder-config", str(parts["encoder_config"]),
            "--feature-schema", str(parts["feature_schema"]), "--policy", str(parts["policy"]),
            "--model-card", str(parts["model_card"]), "--model-card-md", str(parts["model_card_md"]),
            "--bundle-id", "b-test", "--tree-version", "trees-1"]
    assert _cli(argv) == 0
    created = load_bundle(out)
    volatile = ("created_at", "created_by", "bundle_digest")  # the CLI stamps its own created_by
    assert ({k: v for k, v in created.manifest.items() if k not in volatile}
            == {k: v for k, v in bundle.manifest.items() if k not in volatile})
    assert created.manifest["created_by"].endswith("bundle create")
    assert created.bundle_digest in capsys.readouterr().out
    assert _cli(argv) == 2 and "not empty" in capsys.readouterr().err
    assert _cli(argv + ["--overwrite"]) == 0

    assert _cli(["bundle", "inspect", str(out)]) == 0
    text = capsys.readouterr().out
    for needle in ("b-test", created.bundle_digest, "trees-1", "enc-test", "fs-test",
                   "bureau_score", "emb_0..emb_3", "REPAYMENT_HISTORY", "model_card.md", "verification OK"):
        assert needle in text, needle
    assert "emb_1 " not in text
    assert _cli(["bundle", "inspect", str(out), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["verified"] and doc["identity"]["bundle_digest"] == created.bundle_digest
    assert doc["model_identity"]["tree_version"] == "trees-1"


def test_export_parts_round_trip(tmp_path, bundle):
    parts = export_parts(bundle, tmp_path / "parts")
    again = bmod.create_from_parts(tmp_path / "again", bundle_id=bundle.bundle_id,
                                   tree_version=bundle.tree_version,
                                   created_by=bundle.manifest["created_by"], **parts)
    assert again.bundle_digest == bundle.bundle_digest  # same parts -> same digest


def test_cli_create_defaults_and_validation(tmp_path, bundle, capsys):
    parts = export_parts(bundle, tmp_path / "parts")
    base = ["bundle", "create", "--trees", str(parts["trees"]),
            "--encoder-weights", str(parts["encoder_weights"]),
            "--encoder-config", str(parts["encoder_config"]),
            "--feature-schema", str(parts["feature_schema"]), "--policy", str(parts["policy"])]
    assert _cli(base + ["--out", str(tmp_path / "a")]) == 0
    assert _cli(base + ["--out", str(tmp_path / "b")]) == 0
    a, b = load_bundle(tmp_path / "a"), load_bundle(tmp_path / "b")
    assert a.bundle_id == b.bundle_id and a.bundle_id.startswith("uwrt-")
    assert a.tree_version.startswith("trees-")
    capsys.readouterr()
    # Incompatible parts are refused before anything is written.
    schema = FeatureSchema.build("fs-x", list(SCHEMA.applicant)[:1], EMB_DIM)
    (tmp_path / "schema_x.json").write_text(json.dumps(schema.to_dict()))
    argv = base + ["--out", str(tmp_path / "c")]
    argv[argv.index("--feature-schema") + 1] = str(tmp_path / "schema_x.json")
    assert _cli(argv) == 2
    assert "error: trees.ubj: tree model expects" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
    argv[argv.index("--feature-schema") + 1] = str(tmp_path / "missing.json")
    assert _cli(argv) == 2 and "missing.json" in capsys.readouterr().err


def test_cli_inspect_tampered(bundle, capsys):
    _flip_byte(bundle.path / "trees.ubj")
    assert _cli(["bundle", "inspect", str(bundle.path)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: trees.ubj") and "tampered or corrupt" in captured.err
    assert _cli(["bundle", "inspect", str(bundle.path), "--json"]) == 2
    doc = json.loads(capsys.readouterr().out)
    assert doc["verified"] is False and "trees.ubj" in doc["error"]


def test_cli_create_with_request_limits_and_inspect_shows_them(tmp_path, bundle, capsys):
    parts = export_parts(bundle, tmp_path / "parts")
    assert json.loads(parts["feature_schema"].read_text())["limits"]["currencies"] == {"USD": 2}
    limits = {"currencies": {"EUR": 2, "USD": 2}, "amount_min_major": 5, "amount_max_major": 2500,
              "installments": {"PAY_IN_4": [4, 4]}, "required_features": ["bureau_score"], "max_imputed_share": 0.25}
    (tmp_path / "limits.json").write_text(json.dumps(limits))
    base = ["bundle", "create", "--trees", str(parts["trees"]), "--encoder-weights", str(parts["encoder_weights"]),
            "--encoder-config", str(parts["encoder_config"]), "--feature-schema", str(parts["feature_schema"]),
            "--policy", str(parts["policy"])]
    assert _cli(base + ["--out", str(tmp_path / "b"), "--request-limits", str(tmp_path / "limits.json")]) == 0
    b = load_bundle(tmp_path / "b")
    assert b.schema.limits.required_features == ("bureau_score",) and b.schema.limits.amount_range_minor() == (
        500, 250_000)
    capsys.readouterr()
    assert _cli(["bundle", "inspect", str(tmp_path / "b")]) == 0
    text = capsys.readouterr().out
    for needle in ("request limits", "EUR (exponent 2), USD (exponent 2)", "5 .. 2500 major units", "PAY_IN_4 4",
                   "required       bureau_score", "at most 0.25"):
        assert needle in text, needle
    assert _cli(["bundle", "inspect", str(tmp_path / "b"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["request_limits"]["installments"] == {"PAY_IN_4": [4, 4]} and doc["request_limits_declared"]
    # a bundle from before request limits (no "limits" in its manifest): the defaults, said so
    m = _manifest(bundle.path)
    del m["feature_schema"]["limits"]
    _save_manifest(bundle.path, m, redigest=True)
    assert load_bundle(bundle.path).schema.limits == RequestLimits()
    assert _cli(["bundle", "inspect", str(bundle.path)]) == 0
    assert "request limits (defaults: the manifest declares none)" in capsys.readouterr().out
    # bad limits are refused before anything is written, naming the problem
    (tmp_path / "bad.json").write_text(json.dumps({"currencies": {"USD": 2, "JPY": 0}}))
    assert _cli(base + ["--out", str(tmp_path / "c"), "--request-limits", str(tmp_path / "bad.json")]) == 2
    assert "share one minor-unit exponent" in capsys.readouterr().err and not (tmp_path / "c").exists()
