"""The EFTService gRPC servicer (thin: the gateway does the work) and its server."""

import grpc

from eft_core import EFTError, InvalidArgumentError
from services.errors import aborts_on_errors, status_of
from services.gateway.connections import Connections
from services.gateway.gateway import Gateway
from services.grpc_server import start_grpc_server
from services.pb.eft.v1 import eft_pb2, eft_pb2_grpc
from services.security import Security

SERVICE_NAME = eft_pb2.DESCRIPTOR.services_by_name["EFTService"].full_name


class Undecodable:
    """What a request's bytes became when they are not a valid message (truncated, or a
    string field that is not UTF-8): the servicer answers INVALID_ARGUMENT, where gRPC's
    own deserializer would have answered INTERNAL for the client's mistake."""

    def __init__(self, message_class, error: Exception):
        self.message_class, self.error = message_class, error

    def check(self) -> None:
        raise InvalidArgumentError(f"not a valid {self.message_class.DESCRIPTOR.full_name}: {self.error}", field="request")


def _tolerant(message_class):
    def parse(data: bytes):
        try:
            return message_class.FromString(data)
        except Exception as error:  # protobuf's DecodeError, and its UTF-8 checks
            return Undecodable(message_class, error)

    return parse


def _decoded(request):
    if isinstance(request, Undecodable):
        request.check()
    return request


class EFTServicer(eft_pb2_grpc.EFTServiceServicer):
    def __init__(self, gateway: Gateway):
        self.gateway = gateway

    @aborts_on_errors
    def ListCompositions(self, request, context):
        _decoded(request)
        return self.gateway.list_compositions()

    @aborts_on_errors
    def Generate(self, request, context):
        request = _decoded(request)
        reply = eft_pb2.GenerateResponse()
        for chunk in self._stream(request, context):
            reply.text += chunk.text
            reply.token_ids.extend(chunk.token_ids)
            reply.logprobs.extend(chunk.logprobs)
            reply.rewards.extend(chunk.rewards)
            reply.top_logprobs.extend(chunk.top_logprobs)
            reply.model_logprobs.extend(chunk.model_logprobs)
            reply.prompt_token_ids.extend(chunk.prompt_token_ids)
            reply.prompt_logprobs.extend(chunk.prompt_logprobs)
            reply.prompt_top_logprobs.extend(chunk.prompt_top_logprobs)
            if chunk.finish_reason:
                reply.finish_reason = chunk.finish_reason
                reply.usage.CopyFrom(chunk.usage)
                reply.stats.CopyFrom(chunk.stats)
        return reply

    def GenerateStream(self, request, context):
        try:
            yield from self._stream(_decoded(request), context)
        except EFTError as error:
            context.abort(status_of(error), str(error))

    def _stream(self, request, context):
        handle, replies = self.gateway.generate(request, context.time_remaining())
        if not context.add_callback(handle.cancel):  # the client went away or the RPC ended: stop generating
            handle.cancel()  # it already had
        return replies


SPARE_THREADS = 16  # beyond the streams the scheduler admits: health checks, listings, refusals


def create_server(gateway: Gateway, address: str = "127.0.0.1:0", security: Security = Security(), connections: Connections = Connections()) -> tuple[grpc.Server, int]:
    """A started EFTService server with health (SERVING) and reflection, TLS and a bearer
    token if ``security`` asks; returns it and its port.

    Every admitted request (running or queued) holds a server thread until it ends, so the
    pool has one per place in the scheduler plus spares: a request over the limit then
    reaches the scheduler and is refused at once (RESOURCE_EXHAUSTED), instead of waiting
    unseen in gRPC's queue for a free thread."""
    scheduler = gateway.scheduler
    return start_grpc_server(
        lambda server: _add_servicer(EFTServicer(gateway), server),
        SERVICE_NAME,
        address,
        max_message_bytes=gateway.limits.max_request_bytes,
        threads=scheduler.max_running + scheduler.max_waiting + SPARE_THREADS,
        credentials=security.grpc_credentials(),
        interceptors=security.grpc_interceptors(),
        health_of=lambda: health_service_names(gateway.health()),
        options=connections.grpc_options(),
        health_changed=gateway.health_changed,
    )


def health_service_names(health: dict[str, bool]) -> dict[str, bool]:
    """grpc.health.v1 names: "" and the service, whether any composition serves; and
    ``eft.v1.EFTService/<composition>`` for each."""
    overall = health.pop("")
    return {"": overall, SERVICE_NAME: overall, **{f"{SERVICE_NAME}/{name}": serving for name, serving in health.items()}}


def _add_servicer(servicer: EFTServicer, server: grpc.Server) -> None:
    """As the generated add_EFTServiceServicer_to_server, with tolerant request parsing."""
    unary, stream = grpc.unary_unary_rpc_method_handler, grpc.unary_stream_rpc_method_handler
    handlers = {
        "Generate": unary(servicer.Generate, _tolerant(eft_pb2.GenerateRequest), eft_pb2.GenerateResponse.SerializeToString),
        "GenerateStream": stream(servicer.GenerateStream, _tolerant(eft_pb2.GenerateRequest), eft_pb2.GenerateStreamResponse.SerializeToString),
        "ListCompositions": unary(servicer.ListCompositions, _tolerant(eft_pb2.ListCompositionsRequest), eft_pb2.ListCompositionsResponse.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)
