"""Small bundle parts and manifest helpers shared by the bundle tests (fixtures: conftest.py)."""
from __future__ import annotations

import hashlib
import json
import pathlib

import numpy as np

from uwrt.runtime.bundle.bundle import Bundle, compute_digest, write_bundle
from uwrt.runtime.bundle.schema import EncoderConfig, FeatureSchema, FeatureSpec, Policy

EMB_DIM = 4
CFG = EncoderConfig(version="enc-test", d_model=16, n_layers=1, n_heads=2, d_ff=32, emb_dim=EMB_DIM,
                    type_emb_dim=4, mcc_buckets=8, mcc_emb_dim=4, max_history=16)
SCHEMA = FeatureSchema.build("fs-test", [
    FeatureSpec("bureau_score", "applicant", 650.0, "CREDIT_SCORE", 300.0, 850.0),
    FeatureSpec("dti", "applicant", 0.3, "DEBT_TO_INCOME"),
], EMB_DIM)
POLICY = Policy(reason_texts={"CREDIT_SCORE": "Credit score too low"})
CARD = {"name": "test model", "intended_use": "tests only"}


def booster(n_features: int, seed: int = 0):
    import xgboost as xgb
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(64, n_features)).astype(np.float32)
    y = (x[:, 0] + rng.normal(size=64) > 0).astype(np.float32)
    return xgb.train({"objective": "binary:logistic", "max_depth": 2, "nthread": 1},
                     xgb.DMatrix(x, y), num_boost_round=3)


def make_parts() -> dict:
    import torch

    from uwrt.runtime.encoders.torch_encoder import SequenceEncoder
    torch.manual_seed(0)
    return {"encoder_state": SequenceEncoder(CFG).state_dict(), "tree_model": booster(len(SCHEMA.features))}


def write_test_bundle(out: pathlib.Path, parts, **kw) -> Bundle:
    args = dict(bundle_id="b-test", encoder_state=parts["encoder_state"], encoder_config=CFG,
                tree_model=parts["tree_model"], tree_version="trees-1", schema=SCHEMA, policy=POLICY,
                extra_files={"model_card.json": json.dumps(CARD), "model_card.md": "# Test model\n"})
    args.update(kw)
    return write_bundle(out, **args)


def manifest(path: pathlib.Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def save_manifest(path: pathlib.Path, m: dict, *, redigest: bool) -> None:
    """Rewrite manifest.json; with redigest, refresh files' hashes and the digest, as a hand-built
    (internally consistent but incompatible) bundle, or a forger, would have them."""
    if redigest:
        for rel in m["files"]:
            data = (path / rel).read_bytes()
            m["files"][rel] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        m["bundle_digest"] = compute_digest(m)
    (path / "manifest.json").write_text(json.dumps(m, indent=2, sort_keys=True))


def flip_byte(p: pathlib.Path) -> None:
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))
