"""The ModelWorker gRPC service: a thin servicer, the server factory, and a process entry.

    python -m services.worker.server --model large-base=/path/to/large-base --port 50051
"""

import argparse
import logging
import sys
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from eft_core import EFTError
from services.errors import aborts_on_errors
from services.pb.eft.v1 import worker_pb2, worker_pb2_grpc
from services.wire import DTYPE_NAMES, wire_dtype
from services.worker import convert
from services.worker.worker import ModelWorker, load_hosted_model

SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["ModelWorker"].full_name
DEFAULT_MAX_MESSAGE_BYTES = 512 * 1024 * 1024  # batch x positions x vocab x 4 bytes, with room


class ModelWorkerServicer(worker_pb2_grpc.ModelWorkerServicer):
    def __init__(self, worker: ModelWorker):
        self.worker = worker

    @aborts_on_errors
    def Info(self, request, context):
        return convert.info_response(self.worker.info())

    @aborts_on_errors
    def Extend(self, request, context):
        dtype = wire_dtype(request.logits_dtype)
        return convert.extend_response(self.worker.extend(convert.extend_items_from_proto(request), dtype), dtype)

    @aborts_on_errors
    def Draft(self, request, context):
        dtype = wire_dtype(request.logits_dtype)
        return convert.draft_response(self.worker.draft(convert.draft_items_from_proto(request), dtype), dtype)

    @aborts_on_errors
    def Truncate(self, request, context):
        return worker_pb2.TruncateResponse(cache_length=self.worker.truncate(request.session_id, request.model, request.length))

    @aborts_on_errors
    def Release(self, request, context):
        return worker_pb2.ReleaseResponse(released=self.worker.release(list(request.session_ids)))


def create_server(worker: ModelWorker, address: str = "127.0.0.1:0", max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, threads: int = 8) -> tuple[grpc.Server, int]:
    """A started server with the worker, grpc.health.v1 (SERVING) and reflection; returns the bound port."""
    options = [("grpc.max_send_message_length", max_message_bytes), ("grpc.max_receive_message_length", max_message_bytes)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=threads), options=options)
    worker_pb2_grpc.add_ModelWorkerServicer_to_server(ModelWorkerServicer(worker), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"could not bind {address}")
    server.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, port


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.worker.server", description="Serve models over the eft.v1.ModelWorker gRPC service.")
    parser.add_argument("--model", action="append", required=True, metavar="NAME=PATH", help="a model to host (repeatable): a local folder or a hub id")
    parser.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default="float32", help="weights' dtype (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda:N (default: %(default)s)")
    parser.add_argument("--address", default="127.0.0.1:0", help="host:port to bind; port 0 picks a free one (default: %(default)s)")
    parser.add_argument("--max-sessions", type=int, default=256, help="(session, model) caches held at once (default: %(default)s)")
    parser.add_argument("--max-cached-tokens", type=int, default=1 << 20, help="tokens held over all caches (default: %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    models = []
    for spec in args.model:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            parser.error(f"--model must be NAME=PATH, got {spec!r}")
        try:
            models.append(load_hosted_model(name, path, DTYPE_NAMES[args.dtype], args.device))
        except EFTError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
    server, port = create_server(ModelWorker(models, args.max_sessions, args.max_cached_tokens), args.address)
    print(f"model worker listening on {args.address.rsplit(':', 1)[0]}:{port}", flush=True)
    server.wait_for_termination()
    return 0


if __name__ == "__main__":
    sys.exit(main())
