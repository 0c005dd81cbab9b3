"""The ModelWorker gRPC service: a thin servicer, the server factory, and a process entry.

    python -m services.worker.server --model large-base=/path/to/large-base --address 127.0.0.1:50051
    python -m services.worker.server --model large-base=/path/to/large-base --tp 2   # two ranks, AutoTP

With ``--tp N`` this process is rank 0 and starts ranks 1..N-1 as child processes of the same
command; rank 0 serves gRPC, the others follow it (services/worker/tensor_parallel.py).
"""

import argparse
import time
import logging
import signal
import subprocess
import sys

import grpc

from eft_core import EFTError
from services.errors import aborts_on_errors
from services.grpc_server import DEFAULT_MAX_MESSAGE_BYTES, start_grpc_server
from services.pb.eft.v1 import worker_pb2, worker_pb2_grpc
from services.security import Security
from services.wire import DTYPE_NAMES, wire_dtype
from services.worker import convert
from services.worker.api import WorkerLimits
from services.worker.worker import ModelWorker, load_hosted_model, start_idle_reaper
from services.worker.convert import SERVICE_NAME


class ModelWorkerServicer(worker_pb2_grpc.ModelWorkerServicer):
    def __init__(self, worker: ModelWorker):
        self.worker = worker

    @aborts_on_errors
    def Info(self, request, context):
        return convert.info_response(self.worker.info())

    @aborts_on_errors
    def Extend(self, request, context):
        dtype = wire_dtype(request.logits_dtype)
        return _timed(lambda: convert.extend_response(self.worker.extend(convert.extend_items_from_proto(request), dtype), dtype))

    @aborts_on_errors
    def Draft(self, request, context):
        return _timed(lambda: convert.draft_response(self.worker.draft(convert.draft_items_from_proto(request))))

    @aborts_on_errors
    def Truncate(self, request, context):
        return worker_pb2.TruncateResponse(cache_length=self.worker.truncate(request.session_id, request.model, request.length))

    @aborts_on_errors
    def Release(self, request, context):
        return worker_pb2.ReleaseResponse(released=self.worker.release(list(request.session_ids)))


def _timed(respond):
    """A model call's response, carrying the time the worker spent on it."""
    started = time.perf_counter()
    response = respond()
    response.compute_seconds = time.perf_counter() - started
    return response


def create_server(worker: ModelWorker, address: str = "127.0.0.1:0", max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, token: str | None = None) -> tuple[grpc.Server, int]:
    """A started server with the worker, grpc.health.v1 (SERVING) and reflection; returns the
    bound port; it receives no request larger than the worker's limits allow a call to be.
    ``token``: every call but health's must carry it (``authorization: Bearer``),
    else UNAUTHENTICATED: the served application's coordinators hold it, nobody else."""
    return start_grpc_server(
        lambda server: worker_pb2_grpc.add_ModelWorkerServicer_to_server(ModelWorkerServicer(worker), server),
        SERVICE_NAME,
        address,
        max_message_bytes,
        interceptors=Security(token=token).grpc_interceptors(),
        max_receive_bytes=min(max_message_bytes, worker.limits.largest_request_bytes()),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.worker.server", description="Serve models over the eft.v1.ModelWorker gRPC service.")
    parser.add_argument("--model", action="append", required=True, metavar="NAME=PATH", help="a model to host (repeatable): a local folder or a hub id")
    parser.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default="float32", help="weights' dtype (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda:N (default: %(default)s)")
    parser.add_argument("--address", default="127.0.0.1:0", help="host:port to bind; port 0 picks a free one (default: %(default)s)")
    parser.add_argument("--max-sessions", type=int, default=WorkerLimits.max_sessions, help="(session, model) caches held at once (default: %(default)s)")
    parser.add_argument("--max-cached-tokens", type=int, default=WorkerLimits.max_cached_tokens, help="token slots over all models' caches, each model's being its sessions x its longest session (default: %(default)s)")
    parser.add_argument("--max-forward-tokens", type=int, default=WorkerLimits.max_forward_tokens, help="positions one forward computes, padding included; longer prefills are fed in chunks (default: %(default)s)")
    parser.add_argument("--session-idle-timeout", type=float, default=120.0, metavar="SECONDS", help="free sessions no call has used this long, e.g. a restarted coordinator's (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's, one per core)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks for the (single) model, one process each (default: %(default)s)")
    parser.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)  # set by rank 0 for its followers
    parser.add_argument("--master-port", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    specs = [_model_spec(parser, spec) for spec in args.model]
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    if args.session_idle_timeout <= 0:
        parser.error(f"--session-idle-timeout must be > 0, got {args.session_idle_timeout}")
    for flag in ("max_sessions", "max_cached_tokens", "max_forward_tokens"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.tp < 1 or (args.tp > 1 and len(specs) != 1):
        parser.error("--tp must be >= 1, and a tensor-parallel worker hosts exactly one model")
    try:
        if args.tp > 1:
            return _serve_tensor_parallel(args, *specs[0])
        models = [load_hosted_model(name, path, DTYPE_NAMES[args.dtype], args.device) for name, path in specs]
    except EFTError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    _serve(ModelWorker(models, _limits(args)), args)
    return 0


def _limits(args) -> WorkerLimits:
    return WorkerLimits(args.max_sessions, args.max_cached_tokens, args.max_forward_tokens)


def _model_spec(parser, spec: str) -> tuple[str, str]:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        parser.error(f"--model must be NAME=PATH, got {spec!r}")
    return name, path


def _serve(worker: ModelWorker, args, on_stop=lambda: None) -> None:
    start_idle_reaper(worker, args.session_idle_timeout)
    server, port = create_server(worker, args.address)

    def stop(signum, frame):
        on_stop()
        server.stop(grace=None)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop)
    print(f"model worker listening on {args.address.rsplit(':', 1)[0]}:{port}", flush=True)
    server.wait_for_termination()


def _serve_tensor_parallel(args, name: str, path: str) -> int:
    from services.worker.tensor_parallel import run_follower, start_tensor_parallel_worker

    if args.rank is not None:  # started by rank 0
        run_follower(name, path, args.tp, args.rank, args.master_port, args.dtype, args.device, _limits(args))
        return 0
    worker, followers = start_tensor_parallel_worker(name, path, args.tp, args.dtype, args.device, _limits(args))
    try:
        _serve(worker, args, on_stop=worker.stop_followers)
    finally:
        for follower in followers:
            try:
                follower.wait(timeout=10)
            except subprocess.TimeoutExpired:
                follower.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
