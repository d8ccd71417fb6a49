"""Generated protobuf / gRPC stubs for proto/uwrt/v1 (see scripts/gen_proto.py)."""
from uwrt.runtime.pb import underwriting_pb2 as pb  # noqa: F401
from uwrt.runtime.pb import underwriting_pb2_grpc as pb_grpc  # noqa: F401
