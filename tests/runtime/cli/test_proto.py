"""`uwrt proto export`: the API and the standard health service as a FileDescriptorSet that
protoc, buf and grpcurl accept, plus the .proto source from a checkout."""
from __future__ import annotations

import shutil
import subprocess

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool

from tests.factories import ROOT
from uwrt.runtime.cli.main import main
from uwrt.runtime.cli.proto import PROTO_FILES


@pytest.fixture
def exported(tmp_path, capsys):
    assert main(["proto", "export", "--out", str(tmp_path / "api")]) == 0
    capsys.readouterr()
    return tmp_path / "api"


def test_protoset_holds_the_api_the_health_service_and_their_imports(exported):
    fds = descriptor_pb2.FileDescriptorSet.FromString((exported / "uwrt.protoset").read_bytes())
    names = [f.name for f in fds.file]
    assert set(names) == {"google/protobuf/timestamp.proto", "uwrt/v1/underwriting.proto",
                          "grpc/health/v1/health.proto"}
    for i, f in enumerate(fds.file):                      # every file after the files it imports
        assert set(f.dependency) <= set(names[:i]), f.name
    pool = descriptor_pool.DescriptorPool()
    for f in fds.file:
        pool.Add(f)
    uw = pool.FindServiceByName("uwrt.v1.Underwriting")
    assert {m.name for m in uw.methods} == {"Decide", "DecideStream", "GetModelInfo", "Explain"}
    health = pool.FindServiceByName("grpc.health.v1.Health")
    assert {"Check", "Watch"} <= {m.name for m in health.methods}
    assert pool.FindMessageTypeByName("uwrt.v1.DecisionRequest").fields_by_name["as_of"].message_type.full_name \
        == "google.protobuf.Timestamp"


def test_the_proto_source_is_the_repository_file(exported):
    assert (exported / "uwrt/v1/underwriting.proto").read_text() == \
        (ROOT / "proto/uwrt/v1/underwriting.proto").read_text()


@pytest.mark.parametrize("lang", ["python", "cpp", "java"])
def test_protoc_generates_code_from_the_set_alone(exported, tmp_path, lang):
    """protoc --descriptor_set_in: no .proto file on disk, no include path needed. Python with
    grpcio-tools' protoc (always installed); C++ and Java with the system protoc (Debian's
    protobuf-compiler, 3.21: an old protoc reads the set too)."""
    out = tmp_path / f"gen-{lang}"
    out.mkdir()
    argv = [f"--descriptor_set_in={exported / 'uwrt.protoset'}", f"--{lang}_out={out}", *PROTO_FILES]
    if lang == "python":
        from grpc_tools import protoc
        assert protoc.main(["protoc", *argv]) == 0
    else:
        if shutil.which("protoc") is None:
            pytest.skip("protoc is not installed (apt-get install protobuf-compiler)")
        r = subprocess.run(["protoc", *argv], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
    generated = sorted(p.name for p in out.rglob("*") if p.is_file())
    assert any("underwriting" in n.lower() for n in generated) and any("health" in n.lower() for n in generated)


@pytest.mark.skipif(shutil.which("grpcurl") is None,
                    reason="grpcurl is not installed (not packaged in Debian 12; github.com/fullstorydev/grpcurl)")
def test_grpcurl_reads_the_set_offline(exported):
    r = subprocess.run(["grpcurl", "-protoset", str(exported / "uwrt.protoset"), "list"], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0 and {"uwrt.v1.Underwriting", "grpc.health.v1.Health"} <= set(r.stdout.split())
