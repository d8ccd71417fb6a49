"""Generated protobuf / gRPC stubs for proto/uwrt/v1 (see scripts/gen_proto.py)."""
from uwrt.runtime.pb import admin_pb2 as admin_pb  # noqa: F401
from uwrt.runtime.pb import admin_pb2_grpc as admin_grpc  # noqa: F401
from uwrt.runtime.pb import records_pb2 as rec  # noqa: F401
from uwrt.runtime.pb import underwriting_pb2 as pb  # noqa: F401
from uwrt.runtime.pb import underwriting_pb2_grpc as pb_grpc  # noqa: F401
