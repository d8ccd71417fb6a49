"""The offline decision pipeline end to end on a small demo bundle built from scratch."""
import json
import shutil

import numpy as np
import pytest
import xgboost as xgb

from uwrt.demo.synth import generate
from uwrt.demo.train import DemoConfig, build_demo
from uwrt.runtime.cli.main import main
from uwrt.runtime.errors import InvalidRequest
from uwrt.runtime.featurize import featurize
from uwrt.runtime.jsonl import read_jsonl, write_jsonl
from uwrt.runtime.pb import pb
from uwrt.runtime.policy import outcome_for


def test_every_request_gets_a_complete_decision(pipe, traffic):
    res = pipe.decide(traffic)
    assert all(isinstance(r, pb.DecisionResponse) for r in res)
    assert [r.request_id for r in res] == [q.request_id for q in traffic]
    outcomes = set()
    for q, r in zip(traffic, res, strict=True):
        assert 0.0 < r.probability_of_default < 1.0
        assert r.outcome == outcome_for(r.probability_of_default, pipe.policy)
        outcomes.add(r.outcome)
        assert r.path == pb.MODEL
        assert r.model == pipe.bundle.identity() and r.model.bundle_digest == pipe.bundle.bundle_digest
        if r.outcome in (pb.DECLINE, pb.COUNTEROFFER):
            assert 1 <= len(r.reasons) <= 4 and all(x.contribution > 0 and x.text for x in r.reasons)
        else:
            assert not r.reasons
        if r.outcome == pb.COUNTEROFFER:
            assert 0 < r.counteroffer_amount_minor < q.purchase.amount_minor
        assert r.timing.total_us >= r.timing.encode_us > 0
        if len(q.history.type) > pipe.encoder_config.max_history:
            assert pb.HISTORY_TRUNCATED in [w.code for w in r.warnings]
        missing = {f.name for f in pipe.schema.applicant} - set(q.features)
        assert {w.detail for w in r.warnings if w.code == pb.FEATURE_IMPUTED} == missing
    assert pb.APPROVE in outcomes and (pb.DECLINE in outcomes or pb.COUNTEROFFER in outcomes)


def test_batch_invariance(pipe, traffic, rng):
    """A customer's decision does not depend on who else is in the batch."""
    reqs = traffic[:120]
    alone = [pipe.decide([q])[0] for q in reqs]
    for _ in range(4):
        rows = rng.permutation(len(reqs))[: int(rng.integers(2, len(reqs)))]
        got = pipe.decide([reqs[i] for i in rows])
        for i, r in zip(rows, got, strict=True):
            a = alone[i]
            assert abs(r.probability_of_default - a.probability_of_default) <= 1e-6
            assert r.outcome == a.outcome
            assert [x.code for x in r.reasons] == [x.code for x in a.reasons]


def _rows(pipe, reqs):
    fb, errors = featurize(reqs, pipe.schema, pipe.encoder_config)
    assert not errors
    return pipe.model_rows(fb, pipe.encoder.encode(fb.events))


def test_reasons_are_exact_treeshap_top4(pipe, small_bundle, traffic):
    """Reasons == top-4 positive groups of exact TreeSHAP, computed here independently per row."""
    res = pipe.decide(traffic)
    rows = _rows(pipe, traffic)
    booster = xgb.Booster(model_file=str(small_bundle / "trees.ubj"))
    codes = [f.reason_code for f in pipe.schema.features]
    checked = 0
    for j, r in enumerate(res):
        if r.outcome not in (pb.DECLINE, pb.COUNTEROFFER):
            continue
        contrib = booster.predict(xgb.DMatrix(rows[j:j + 1], missing=np.nan), pred_contribs=True)[0]
        margin = booster.predict(xgb.DMatrix(rows[j:j + 1], missing=np.nan), output_margin=True)[0]
        assert contrib.sum() == pytest.approx(margin, abs=1e-4)       # contributions sum to the margin
        groups = {}
        for c, code in zip(contrib[:-1], codes, strict=True):
            groups[code] = groups.get(code, 0.0) + float(c)
        want = sorted(((v, k) for k, v in groups.items() if v > 0), key=lambda t: (-t[0], t[1]))[:4]
        assert [x.code for x in r.reasons] == [k for _, k in want]
        assert [x.contribution for x in r.reasons] == pytest.approx([v for v, _ in want], abs=1e-5)
        checked += 1
    assert checked >= 5


def test_tree_stage_equals_xgboost(pipe, small_bundle, traffic):
    rows = _rows(pipe, traffic)
    booster = xgb.Booster(model_file=str(small_bundle / "trees.ubj"))
    want = booster.predict(xgb.DMatrix(rows, missing=np.nan))
    got = [r.probability_of_default for r in pipe.decide(traffic)]
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_invalid_requests_are_isolated(pipe, traffic):
    reqs = [pb.DecisionRequest() for _ in range(3)]
    for r, q in zip(reqs, traffic[:3], strict=True):
        r.CopyFrom(q)
    reqs[1].history.type[0] = 99
    reqs[2].features["debt_to_income"] = float("nan")
    res = pipe.decide(reqs + traffic[3:10])
    assert isinstance(res[1], InvalidRequest) and res[1].field == "history.type[0]"
    assert isinstance(res[2], InvalidRequest) and res[2].field == 'features["debt_to_income"]'
    clean = pipe.decide([traffic[0]] + traffic[3:10])
    assert [r.probability_of_default for r in [res[0]] + res[3:]] == [r.probability_of_default for r in clean]


def test_model_card(small_bundle):
    card = json.loads((small_bundle / "model_card.json").read_text())
    for k in ("auc_tabular_only", "auc_with_encoder"):
        assert 0.0 <= card[k] <= 1.0
    assert card["encoder_lift"] == card["auc_with_encoder"] - card["auc_tabular_only"]
    # the small preset runs no shuffled-order control, and its card says so instead of a number
    assert card["controls"] == {"tabular_only": True, "shuffled_event_order": False}
    assert card["auc_shuffled_control"] is None and card["acceptance"]["shuffled_control_loses_most"] is None
    md = (small_bundle / "model_card.md").read_text()
    assert "Encoder lift" in md and "| not run |" in md and "--with-controls" in md


def test_build_is_deterministic(small_bundle, tmp_path):
    again = build_demo(tmp_path / "again", DemoConfig.preset("small"))
    first = json.loads((small_bundle / "manifest.json").read_text())
    assert again.bundle_digest == first["bundle_digest"]


def test_score_cli_end_to_end(small_bundle, tmp_path, capsys):
    req_file = tmp_path / "req.jsonl"
    assert main(["generate", "--n", "25", "--seed", "5", "--out", str(req_file)]) == 0
    out_file = tmp_path / "out.jsonl"
    assert main(["score", "--bundle", str(small_bundle), "--input", str(req_file), "--output", str(out_file),
                 "--score-batch-size", "7"]) == 0
    with open(req_file) as fh:
        reqs = list(read_jsonl(fh))
    with open(out_file) as fh:
        res = list(read_jsonl(fh, pb.DecisionResponse))
    assert [r.request_id for r in res] == [q.request_id for q in reqs]
    assert "scored 25 of 25" in capsys.readouterr().err


def test_score_cli_reports_invalid_requests(small_bundle, tmp_path, capsys):
    reqs = generate(4, 9).requests
    reqs[2].purchase.amount_minor = -5
    f = tmp_path / "req.jsonl"
    with open(f, "w") as fh:
        write_jsonl(reqs, fh)
    assert main(["score", "--bundle", str(small_bundle), "--input", str(f), "--json"]) == 1
    cap = capsys.readouterr()
    assert [json.loads(line)["requestId"] for line in cap.out.strip().splitlines()] == [
        r.request_id for k, r in enumerate(reqs) if k != 2]
    assert "request 3" in cap.err and "purchase.amount_minor" in cap.err
    f.write_text('{"requestId": "x", "bogusField": 1}\n')
    assert main(["score", "--bundle", str(small_bundle), "--input", str(f)]) == 2
    assert "line 1" in capsys.readouterr().err


def test_score_cli_refuses_tampered_bundle(small_bundle, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(small_bundle, bad)
    data = bytearray((bad / "trees.ubj").read_bytes())
    data[len(data) // 2] ^= 0x01
    (bad / "trees.ubj").write_bytes(bytes(data))
    req = tmp_path / "r.jsonl"
    with open(req, "w") as fh:
        write_jsonl(generate(2, 1).requests, fh)
    assert main(["score", "--bundle", str(bad), "--input", str(req)]) == 2
    err = capsys.readouterr().err
    assert "trees.ubj" in err and "error" in err


def test_generate_cli_is_deterministic(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    assert main(["generate", "--n", "30", "--seed", "4", "--out", str(a)]) == 0
    assert main(["generate", "--n", "30", "--seed", "4", "--out", str(b)]) == 0
    assert a.read_bytes() == b.read_bytes() and a.stat().st_size > 0
