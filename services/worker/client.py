"""One client interface to a model worker, over gRPC or in process.

Both transports return the same values (logits in the wire dtype: by default each model's
own), so the coordinator and tests can use either; only the gRPC one crosses processes.
"""

import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import grpc
import torch

from eft_core import EFTError
from services.errors import error_from_rpc
from services.pb.eft.v1 import worker_pb2, worker_pb2_grpc
from services.worker import convert
from services.worker.api import DraftItem, Drafted, ExtendItem, Extended, WorkerInfo
from services.grpc_server import DEFAULT_MAX_MESSAGE_BYTES
from services.worker.worker import ModelWorker


class PendingCall(Protocol):
    compute_seconds: float  # the worker's compute time, once ``result`` returned

    def result(self) -> list: ...


class WorkerClient(Protocol):
    """``extend``/``draft`` block; ``start`` issues either without blocking (the coordinator
    starts one call per worker, then collects them; its logits come in each model's own
    dtype). Model calls answer per item: its result, or the error that refused it.
    ``timeout``: the call's deadline in seconds (None: the client's default); a call past it
    raises DeadlineExceededError."""

    def info(self, timeout: float | None = None) -> WorkerInfo: ...
    def extend(self, items: list[ExtendItem], logits_dtype: torch.dtype | None = None) -> list[Extended | EFTError]: ...
    def draft(self, items: list[DraftItem]) -> list[Drafted | EFTError]: ...
    def start(self, method: str, items: list, timeout: float | None = None) -> PendingCall: ...
    def truncate(self, session_id: str, model: str, length: int) -> int: ...
    def release(self, session_ids: list[str], timeout: float | None = None) -> int: ...


def info_or_none(client: "WorkerClient", timeout: float | None = None) -> WorkerInfo | None:
    """The worker's Info, or None when it cannot be reached (a replica that just died) in time."""
    try:
        return client.info(timeout)
    except EFTError:
        return None


def model_contexts(clients: Iterable["WorkerClient"]) -> dict[str, int]:
    """Each hosted model's context (the positions a session may hold), from the workers' Info."""
    return {m.name: m.max_sequence_length for client in dict.fromkeys(clients) for m in client.info().models}


class InProcessWorkerClient:
    """Calls a ModelWorker in this process: for unit tests and the oracle. Deadlines are not
    enforced (a call in this thread cannot be cut short)."""

    def __init__(self, worker: ModelWorker):
        self.worker = worker

    def info(self, timeout=None) -> WorkerInfo:
        return self.worker.info()

    def extend(self, items, logits_dtype=None):
        return self.worker.extend(items, logits_dtype)

    def draft(self, items):
        return self.worker.draft(items)

    def start(self, method, items, timeout=None):
        """Runs the call now (in process there is nothing to overlap with); all of its time
        is the worker's compute."""
        started = time.perf_counter()
        try:
            return _Done(getattr(self, method)(items), compute_seconds=time.perf_counter() - started)
        except EFTError as error:
            return _Done(error=error)

    def truncate(self, session_id, model, length):
        return self.worker.truncate(session_id, model, length)

    def release(self, session_ids, timeout=None):
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

    def __init__(self, address: str, timeout: float | None = 60.0, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, token: str | None = None, label: str | None = None):
        """``token``: the workers' credential (services.worker.server.create_server); ``label``:
        how metrics and errors name this replica (default: its address)."""
        options = [("grpc.max_send_message_length", max_message_bytes), ("grpc.max_receive_message_length", max_message_bytes)]
        self.address, self.label = address, label or address
        self.metadata = (("authorization", f"Bearer {token}"),) if token else None
        self.timing = {"extend": CallTiming(), "draft": CallTiming()}
        self.channel = grpc.insecure_channel(address, options=options)
        self.stub = worker_pb2_grpc.ModelWorkerStub(self.channel)
        # Model calls run as blocking calls on these long-lived threads. grpc's own
        # ``future()`` starts a channel-spin thread whenever the channel has no call in
        # flight, which here is once per iteration: starting those threads was 40% of a
        # served decode step's time (py-spy, c = 1).
        self._callers = ThreadPoolExecutor(max_workers=4, thread_name_prefix=f"call-{address}")
        self._methods = {  # raw responses: the tensors are decoded as views of the bytes gRPC received
            "extend": (self._raw("Extend", worker_pb2.ExtendRequest), convert.extend_request, convert.raw_decoder(worker_pb2.ExtendResponse, convert.extended_from_proto, convert.EXTEND_TENSORS)),
            "draft": (self._raw("Draft", worker_pb2.DraftRequest), convert.draft_request, convert.raw_decoder(worker_pb2.DraftResponse, convert.drafted_from_proto, convert.DRAFT_TENSORS)),
        }
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"GrpcWorkerClient({self.address!r})"

    def _raw(self, method: str, request_class):
        return self.channel.unary_unary(f"/{convert.SERVICE_NAME}/{method}", request_serializer=request_class.SerializeToString, response_deserializer=None)

    def close(self) -> None:
        self.channel.close()
        self._callers.shutdown(wait=False)  # a call still running fails on the closed channel

    def info(self, timeout=None) -> WorkerInfo:
        return convert.info_from_proto(self._call(self.stub.Info, worker_pb2.InfoRequest(), timeout))

    def extend(self, items, logits_dtype=None):
        return self._start("extend", convert.extend_request(items, logits_dtype)).result()

    def draft(self, items):
        return self.start("draft", items).result()

    def start(self, method, items, timeout=None) -> "_GrpcCall":
        """Issue an Extend or Draft call without blocking; ``.result()`` waits for it."""
        return self._start(method, self._methods[method][1](items), timeout)

    def _start(self, method: str, request, timeout: float | None = None) -> "_GrpcCall":
        rpc, _, decode = self._methods[method]
        return _GrpcCall(self._callers.submit(_timed, rpc, request, timeout or self.timeout, self.metadata), decode, self.timing[method])

    def truncate(self, session_id, model, length):
        request = worker_pb2.TruncateRequest(session_id=session_id, model=model, length=length)
        return self._call(self.stub.Truncate, request).cache_length

    def release(self, session_ids, timeout=None):
        return self._call(self.stub.Release, worker_pb2.ReleaseRequest(session_ids=list(session_ids)), timeout).released

    def _call(self, method, request, timeout=None):
        try:
            return method(request, timeout=timeout or self.timeout, metadata=self.metadata)
        except grpc.RpcError as error:
            raise error_from_rpc(error) from None


def _timed(rpc, request, timeout: float, metadata) -> tuple[bytes, float]:
    """The call's raw answer, and its own wall time (not the wait for a free thread, nor for
    the caller to collect it)."""
    started = time.perf_counter()
    return rpc(request, timeout=timeout, metadata=metadata), time.perf_counter() - started


class _GrpcCall:
    """A started model call: ``result()`` decodes the answers, or raises the project's error;
    it adds the call's wall time (request sent to answer received, plus decoding) and the
    worker's compute time to ``timing`` and keeps the latter as ``compute_seconds``."""

    def __init__(self, future, decode, timing: CallTiming):
        self.future, self.decode, self.timing = future, decode, timing
        self.compute_seconds = 0.0

    def result(self) -> list:
        try:
            raw, seconds = self.future.result()
        except grpc.RpcError as error:
            raise error_from_rpc(error) from None
        decoding = time.perf_counter()
        answers, self.compute_seconds = self.decode(raw)
        self.timing.add(seconds + time.perf_counter() - decoding, self.compute_seconds)
        return answers


class _Done:
    def __init__(self, answers: list | None = None, error: EFTError | None = None, compute_seconds: float = 0.0):
        self.answers, self.error, self.compute_seconds = answers, error, compute_seconds

    def result(self) -> list:
        if self.error is not None:
            raise self.error
        return self.answers
