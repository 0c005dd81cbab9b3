"""The EFTService gRPC servicer (thin: the gateway does the work) and its server."""

import grpc

from eft_core import EFTError
from services.errors import aborts_on_errors, status_of
from services.gateway.gateway import Gateway
from services.grpc_server import start_grpc_server
from services.pb.eft.v1 import eft_pb2, eft_pb2_grpc
from services.security import Security

SERVICE_NAME = eft_pb2.DESCRIPTOR.services_by_name["EFTService"].full_name


class EFTServicer(eft_pb2_grpc.EFTServiceServicer):
    def __init__(self, gateway: Gateway):
        self.gateway = gateway

    @aborts_on_errors
    def ListCompositions(self, request, context):
        return self.gateway.list_compositions()

    @aborts_on_errors
    def Generate(self, request, context):
        reply = eft_pb2.GenerateResponse()
        for chunk in self._stream(request, context):
            reply.text += chunk.text
            reply.token_ids.extend(chunk.token_ids)
            reply.logprobs.extend(chunk.logprobs)
            reply.rewards.extend(chunk.rewards)
            if chunk.finish_reason:
                reply.finish_reason = chunk.finish_reason
                reply.usage.CopyFrom(chunk.usage)
                reply.stats.CopyFrom(chunk.stats)
        return reply

    def GenerateStream(self, request, context):
        try:
            yield from self._stream(request, context)
        except EFTError as error:
            context.abort(status_of(error), str(error))

    def _stream(self, request, context):
        handle, replies = self.gateway.generate(request, context.time_remaining())
        if not context.add_callback(handle.cancel):  # the client went away or the RPC ended: stop generating
            handle.cancel()  # it already had
        return replies


def create_server(gateway: Gateway, address: str = "127.0.0.1:0", security: Security = Security()) -> tuple[grpc.Server, int]:
    """A started EFTService server with health (SERVING) and reflection, TLS and a bearer
    token if ``security`` asks; returns it and its port."""
    add = lambda server: eft_pb2_grpc.add_EFTServiceServicer_to_server(EFTServicer(gateway), server)  # noqa: E731
    return start_grpc_server(add, SERVICE_NAME, address, credentials=security.grpc_credentials(), interceptors=security.grpc_interceptors())
