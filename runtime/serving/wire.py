"""Requests off the wire: a gRPC service registered with raw-bytes request handlers, so a
request that is not a valid protobuf message is a client error we answer, never a gRPC-internal
deserialization failure (which the generated stubs' registration turns into UNKNOWN with the
Python exception's name and a logged traceback per request).

* `parse(data, cls, max_bytes)`: the size check on the raw bytes (before anything is parsed),
  then the parse; a failure is `InvalidRequest` naming the field `request`:
  `request: 2097189 bytes exceeds the limit of 1048576`,
  `request: not a valid uwrt.v1.DecisionRequest`.
* `add_service(server, servicer, service)`: registers every method of the service descriptor
  with a raw-bytes deserializer. Methods named in `raw` receive the bytes (or an iterator of
  bytes) and parse them themselves (Decide and DecideStream: the handler parses in the same
  place it used to be handed the message, so the request path costs what it did); every other
  method is wrapped: its request is parsed here and an undecodable one aborts with
  INVALID_ARGUMENT (a streaming request aborts the stream: only DecideStream answers in-band).
  Methods added to the proto later are covered without a change here.

Thread safety: pure functions; handlers run on the server's event loop.
"""
from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Collection
from typing import Any

import grpc
from google.protobuf import descriptor, message, message_factory

from uwrt.runtime.errors import InvalidRequest

__all__ = ["Undecodable", "add_service", "parse"]


class Undecodable(InvalidRequest):
    """The request's bytes are not a valid message of the method's request type."""

    def __init__(self, type_name: str) -> None:
        super().__init__("request", f"not a valid {type_name}")


def parse(data: bytes, cls: Any, max_bytes: int | None = None) -> Any:
    """`data` as a message of `cls`, after the size check (InvalidRequest naming `request`)."""
    if max_bytes is not None and len(data) > max_bytes:
        raise InvalidRequest("request", f"{len(data)} bytes exceeds the limit of {max_bytes}")
    try:
        return cls.FromString(data)
    except message.DecodeError:
        raise Undecodable(cls.DESCRIPTOR.full_name) from None


def _identity(data: bytes) -> bytes:
    return data


def add_service(server: grpc.aio.Server, servicer: object, service: descriptor.ServiceDescriptor, *,
                raw: Collection[str] = (), max_bytes: int | None = None,
                on_undecodable: Callable[[str, grpc.aio.ServicerContext, InvalidRequest], None] | None = None
                ) -> dict[str, grpc.RpcMethodHandler]:
    """Register `servicer`'s methods for `service` on `server` with raw-bytes deserializers (see
    the module docstring). `on_undecodable(method, context, error)` is told of every request
    refused here (for rate-limited logging). Returns the method handlers by method name."""
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for m in service.methods:
        behavior = getattr(servicer, m.name)
        req_cls = message_factory.GetMessageClass(m.input_type)
        serialize = message_factory.GetMessageClass(m.output_type).SerializeToString
        if m.name not in raw:
            behavior = _parsing(behavior, m, req_cls, max_bytes, on_undecodable)
        make = {(False, False): grpc.unary_unary_rpc_method_handler,
                (False, True): grpc.unary_stream_rpc_method_handler,
                (True, False): grpc.stream_unary_rpc_method_handler,
                (True, True): grpc.stream_stream_rpc_method_handler}[(m.client_streaming, m.server_streaming)]
        handlers[m.name] = make(behavior, request_deserializer=_identity, response_serializer=serialize)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)
    return handlers


def _parsing(behavior: Callable[..., Any], m: descriptor.MethodDescriptor, cls: Any, max_bytes: int | None,
             on_undecodable: Callable[[str, grpc.aio.ServicerContext, InvalidRequest], None] | None
             ) -> Callable[..., Any]:
    """`behavior` taking parsed messages, as a handler taking bytes. A request that does not
    parse aborts the call with INVALID_ARGUMENT (AbortError out of the request iterator, for a
    client stream)."""

    async def parsed(data: bytes, context: grpc.aio.ServicerContext) -> Any:
        try:
            return parse(data, cls, max_bytes)
        except InvalidRequest as e:
            if on_undecodable is not None:
                on_undecodable(m.name, context, e)
            await context.abort(e.code, str(e))

    async def messages(it: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async for data in it:
            yield await parsed(data, context)

    async def request_of(request: Any, context: grpc.aio.ServicerContext) -> Any:
        return messages(request, context) if m.client_streaming else await parsed(request, context)

    if not m.server_streaming:
        async def unary_response(request: Any, context: grpc.aio.ServicerContext) -> Any:
            return await behavior(await request_of(request, context), context)
        return unary_response

    async def stream_response(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async for resp in behavior(await request_of(request, context), context):
            yield resp
    return stream_response
