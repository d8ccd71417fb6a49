import subprocess
import sys
from pathlib import Path

from google.protobuf import json_format

from uwrt.runtime.pb import pb

ROOT = Path(__file__).resolve().parents[2]


def test_committed_stubs_are_fresh():
    """Fails when proto/ changed and runtime/pb/ was not regenerated (python scripts/gen_proto.py)."""
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_service_shape():
    svc = pb.DESCRIPTOR.services_by_name["Underwriting"]
    m = {x.name: x for x in svc.methods}
    assert set(m) == {"Decide", "DecideStream", "GetModelInfo", "Explain"}
    assert m["DecideStream"].client_streaming and m["DecideStream"].server_streaming
    for unary in ("Decide", "GetModelInfo", "Explain"):
        assert not m[unary].client_streaming and not m[unary].server_streaming
    assert m["Explain"].input_type.name == "ExplainRequest" and m["Explain"].output_type.name == "ExplainResponse"


def test_history_columns_are_packed():
    h = pb.EventHistory.DESCRIPTOR
    for f in h.fields:
        assert f.is_repeated and f.is_packed, f.name


def test_json_mapping_round_trip():
    r = pb.DecisionRequest(request_id="x", priority=2)
    r.as_of.FromJsonString("2026-01-02T03:04:05Z")
    r.history.type.extend([pb.PAID_LATE, pb.ORIGINATION])
    r.features["bureau_score"] = 701.5
    back = json_format.Parse(json_format.MessageToJson(r), pb.DecisionRequest())
    assert back == r
