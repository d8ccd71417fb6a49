"""`uwrt proto export --out DIR`: the API in the forms other languages' tools read.

Writes into DIR:

    uwrt.protoset                a FileDescriptorSet (binary protobuf) of uwrt/v1/underwriting.proto
                                 with everything it and the server use: google/protobuf/timestamp.proto
                                 and the standard health service grpc/health/v1/health.proto
    uwrt/v1/underwriting.proto   the API's source, comments included (when this installation
                                 has it: a source checkout or an editable install)

The descriptor set is built at run time from the descriptors this installation serves with
(`uwrt.runtime.pb` and the grpcio-health-checking package), so it is exactly what the server
speaks. `protoc --descriptor_set_in=uwrt.protoset --go_out=. uwrt/v1/underwriting.proto
grpc/health/v1/health.proto` generates code from it, `grpcurl -protoset uwrt.protoset ...`
calls the server with it, and buf reads it as an image (`uwrt.protoset#format=binpb`).
The health proto itself is gRPC's (github.com/grpc/grpc-proto, grpc/health/v1/health.proto);
most gRPC languages ship its stubs (README: Calling uwrt from other languages).
"""
from __future__ import annotations

import argparse
import pathlib
import shutil
import sys
from typing import Any

__all__ = ["register", "descriptor_set", "PROTO_FILES"]

#: The files of the exported set that a client compiles (their dependencies come with them).
PROTO_FILES = ("uwrt/v1/underwriting.proto", "grpc/health/v1/health.proto")
#: grpcio-health-checking compiles the standard health proto under its own package path; the set
#: names it by the standard path (the one grpc-proto publishes and other languages import).
_STANDARD_NAMES = {"grpc_health/v1/health.proto": "grpc/health/v1/health.proto"}


def _file_descriptors() -> list[Any]:
    """Our API's and the health service's file descriptors with every dependency, each file
    after the files it imports (the order a FileDescriptorSet for protoc must have)."""
    from grpc_health.v1 import health_pb2

    from uwrt.runtime.pb import pb
    out: list[Any] = []
    seen: set[str] = set()

    def visit(fd: Any) -> None:
        if fd.name in seen:
            return
        seen.add(fd.name)
        for dep in fd.dependencies:
            visit(dep)
        out.append(fd)

    for fd in (pb.DESCRIPTOR, health_pb2.DESCRIPTOR):
        visit(fd)
    return out


def descriptor_set() -> Any:
    """A google.protobuf.FileDescriptorSet of the API, the health service and their imports."""
    from google.protobuf import descriptor_pb2
    fds = descriptor_pb2.FileDescriptorSet()
    for fd in _file_descriptors():
        fp = fds.file.add()
        fd.CopyToProto(fp)
        fp.name = _STANDARD_NAMES.get(fp.name, fp.name)
    return fds


def _proto_source() -> pathlib.Path | None:
    """proto/uwrt/v1/underwriting.proto of the source tree this package runs from, if present."""
    import uwrt.runtime
    root = pathlib.Path(uwrt.runtime.__file__).resolve().parents[1]
    path = root / "proto" / "uwrt" / "v1" / "underwriting.proto"
    return path if path.is_file() else None


def cmd_export(args: argparse.Namespace) -> int:
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fds = descriptor_set()
    (out / "uwrt.protoset").write_bytes(fds.SerializeToString())
    print(f"wrote {out / 'uwrt.protoset'}: {', '.join(f.name for f in fds.file)}")
    src = _proto_source()
    if src is not None:
        dest = out / "uwrt" / "v1" / "underwriting.proto"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
        print(f"wrote {dest}")
    else:
        print("this installation has no .proto sources (not a source checkout); uwrt.protoset carries the "
              "same definitions", file=sys.stderr)
    print(f"generate code:  protoc --descriptor_set_in={out / 'uwrt.protoset'} --<lang>_out=OUT "
          + " ".join(PROTO_FILES))
    print(f"call a server:  grpcurl -plaintext -protoset {out / 'uwrt.protoset'} 127.0.0.1:50051 list")
    return 0


def register(sub) -> None:
    p = sub.add_parser("proto", help="write the API's .proto and a descriptor set for clients in other languages",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    psub = p.add_subparsers(dest="proto_command", metavar="{export}", required=True)
    e = psub.add_parser("export", help="write uwrt.protoset (and the .proto source) into a directory",
                        description="Write uwrt.protoset (FileDescriptorSet: uwrt/v1/underwriting.proto, "
                                    "grpc/health/v1/health.proto, google/protobuf/timestamp.proto) and, from a "
                                    "source checkout, uwrt/v1/underwriting.proto into --out.")
    e.add_argument("--out", required=True, help="directory to write into (created if missing)")
    e.set_defaults(func=cmd_export)
