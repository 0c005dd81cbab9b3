"""One client interface to a model worker, over gRPC or in process.

Both transports return the same values (logits already in the wire dtype), so the
coordinator and tests can use either; only the gRPC one crosses processes.
"""

import time
from dataclasses import dataclass
from typing import Protocol

import grpc
import torch

from services.errors import error_from_rpc
from services.pb.eft.v1 import worker_pb2, worker_pb2_grpc
from services.worker import convert
from services.worker.api import DraftItem, Drafted, ExtendItem, Extended, WorkerInfo
from services.grpc_server import DEFAULT_MAX_MESSAGE_BYTES
from services.worker.worker import ModelWorker


class WorkerClient(Protocol):
    def info(self) -> WorkerInfo: ...
    def extend(self, items: list[ExtendItem], logits_dtype: torch.dtype = torch.float32) -> list[Extended]: ...
    def draft(self, items: list[DraftItem], logits_dtype: torch.dtype = torch.float32) -> list[Drafted]: ...
    def truncate(self, session_id: str, model: str, length: int) -> int: ...
    def release(self, session_ids: list[str]) -> int: ...


class InProcessWorkerClient:
    """Calls a ModelWorker in this process: for unit tests and the oracle."""

    def __init__(self, worker: ModelWorker):
        self.worker = worker

    def info(self) -> WorkerInfo:
        return self.worker.info()

    def extend(self, items, logits_dtype=torch.float32):
        return self.worker.extend(items, logits_dtype)

    def draft(self, items, logits_dtype=torch.float32):
        return self.worker.draft(items, logits_dtype)

    def truncate(self, session_id, model, length):
        return self.worker.truncate(session_id, model, length)

    def release(self, session_ids):
        return self.worker.release(list(session_ids))


@dataclass
class CallTiming:
    """Totals over a client's calls of one method: transport share = 1 - compute / wall."""

    calls: int = 0
    wall_seconds: float = 0.0
    compute_seconds: float = 0.0

    def add(self, wall: float, compute: float) -> None:
        self.calls, self.wall_seconds, self.compute_seconds = self.calls + 1, self.wall_seconds + wall, self.compute_seconds + compute


class GrpcWorkerClient:
    """Calls a worker over gRPC; failed calls raise the project's error types."""

    def __init__(self, address: str, timeout: float | None = 60.0, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
        options = [("grpc.max_send_message_length", max_message_bytes), ("grpc.max_receive_message_length", max_message_bytes)]
        self.address = address
        self.timing = {"extend": CallTiming(), "draft": CallTiming()}
        self.channel = grpc.insecure_channel(address, options=options)
        self.stub = worker_pb2_grpc.ModelWorkerStub(self.channel)
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"GrpcWorkerClient({self.address!r})"

    def close(self) -> None:
        self.channel.close()

    def info(self) -> WorkerInfo:
        return convert.info_from_proto(self._call(self.stub.Info, worker_pb2.InfoRequest()))

    def extend(self, items, logits_dtype=torch.float32):
        return self._timed("extend", lambda: self._call(self.stub.Extend, convert.extend_request(items, logits_dtype)), convert.extended_from_proto)

    def draft(self, items, logits_dtype=torch.float32):
        return self._timed("draft", lambda: self._call(self.stub.Draft, convert.draft_request(items, logits_dtype)), convert.drafted_from_proto)

    def _timed(self, method: str, call, decode):
        """Run a model call, adding its wall time (encoding, transport, decoding included) and
        the worker's own compute time to ``self.timing[method]``."""
        started = time.perf_counter()
        response = call()
        answers = decode(response)
        self.timing[method].add(time.perf_counter() - started, response.compute_seconds)
        return answers

    def truncate(self, session_id, model, length):
        request = worker_pb2.TruncateRequest(session_id=session_id, model=model, length=length)
        return self._call(self.stub.Truncate, request).cache_length

    def release(self, session_ids):
        return self._call(self.stub.Release, worker_pb2.ReleaseRequest(session_ids=list(session_ids))).released

    def _call(self, method, request):
        try:
            return method(request, timeout=self.timeout)
        except grpc.RpcError as error:
            raise error_from_rpc(error) from None
