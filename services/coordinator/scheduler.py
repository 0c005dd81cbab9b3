"""Continuous batching: one loop thread steps every running request through the engine;
requests join and leave between iterations, and each streams its tokens through a queue.

Admission: up to ``max_running`` requests step together; up to ``max_waiting`` more queue
(beyond that, RESOURCE_EXHAUSTED at once). Cancellation and deadlines are honoured between
iterations and release every worker session the request held; the loop never waits on a
release.
"""

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass

from eft_core import EFTError, OverloadedError
from services.coordinator.engine import Engine, EngineRequest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Chunk:
    """Tokens a request produced since its last chunk; ``final`` once it is over."""

    tokens: list[int]
    logprobs: list[float]
    rewards: list[list[float]]
    top: list[list[tuple[int, float]]]  # per token: the most probable tokens (id, logprob), as many as asked
    views: list[dict]  # per token, if asked: each scored model's (logprob, top)
    final: bool = False
    finish_reason: str | None = None  # stop, length, cancelled, deadline, error
    error: EFTError | None = None

    @classmethod
    def of(cls, request: EngineRequest, new: slice, final: bool = False) -> "Chunk":
        """The request's tokens in ``new``, with what they carry; ``final``: with its end."""
        data = request.tokens[new], request.logprobs[new], request.rewards[new], request.top[new], request.model_views[new]
        return cls(*data, True, request.finish_reason, request.error) if final else cls(*data)

    @classmethod
    def ended(cls, reason: str) -> "Chunk":
        """The end of a request that ended outside the engine (cancelled, past its deadline)."""
        return cls([], [], [], [], [], True, reason)


class Handle:
    """The caller's side of a submitted request: its chunks, read by a thread (``stream``)
    or by a task on an asyncio loop (``astream``, which holds no thread while it waits)."""

    def __init__(self, request: EngineRequest, deadline: float | None):
        self.request, self.deadline = request, deadline
        self.chunks: queue.Queue[Chunk] = queue.Queue()
        self.cancelled = threading.Event()
        self.sent = 0  # tokens already put into chunks
        self.submitted_at, self.admitted_at = time.monotonic(), None  # monotonic seconds
        self._wake: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None  # an async reader's

    def put(self, chunk: Chunk) -> None:
        """The scheduler's side (any thread)."""
        self.chunks.put(chunk)
        if (wake := self._wake) is not None:
            loop, event = wake
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # the reader's loop has closed: nobody reads any more
                pass

    def stream(self):
        """Chunks until (and including) the final one. At the deadline the reader stops
        waiting, even on a step stalled behind a worker: a final "deadline" chunk, and the
        request is cancelled (its sessions go when the scheduler next drops it)."""
        while True:
            try:
                chunk = self.chunks.get(timeout=self._remaining())
            except queue.Empty:
                chunk = self._expired()
            yield chunk
            if chunk.final:
                return

    async def astream(self):
        """As ``stream``, awaited on the running loop."""
        event = asyncio.Event()
        self._wake = (asyncio.get_running_loop(), event)
        while True:
            try:
                chunk = self.chunks.get_nowait()
            except queue.Empty:
                try:
                    await asyncio.wait_for(event.wait(), self._remaining())
                except TimeoutError:
                    chunk = self._expired()
                else:
                    event.clear()  # set again by any chunk put after this: it is read next round
                    continue
            yield chunk
            if chunk.final:
                return

    def _remaining(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def _expired(self) -> Chunk:
        self.cancel()
        return Chunk.ended("deadline")

    def cancel(self) -> None:
        self.cancelled.set()


class Scheduler:
    def __init__(self, engine: Engine, max_running: int = 32, max_waiting: int = 256):
        self.engine, self.max_running, self.max_waiting = engine, max_running, max_waiting
        self.waiting: list[Handle] = []
        self.running: list[Handle] = []
        self.condition = threading.Condition()
        self.stopped = False
        self.thread = threading.Thread(target=self._loop, name="eft-scheduler", daemon=True)
        self.thread.start()

    def submit(self, request: EngineRequest, timeout: float | None = None) -> Handle:
        """Queue a request; ``timeout`` in seconds from now bounds its whole generation."""
        handle = Handle(request, time.monotonic() + timeout if timeout is not None else None)
        with self.condition:  # waiting requests that free running places will take are not queued beyond them
            if len(self.waiting) >= self.max_waiting + max(0, self.max_running - len(self.running)):
                raise OverloadedError(
                    f"{len(self.running)} requests run and {len(self.waiting)} wait (max_running {self.max_running}, max_waiting {self.max_waiting}): retry later", field="queue"
                )
            self.waiting.append(handle)
            self.condition.notify()
        return handle

    @property
    def counts(self) -> tuple[int, int]:
        """(running, waiting) requests."""
        with self.condition:
            return len(self.running), len(self.waiting)

    def snapshot(self) -> tuple[list[EngineRequest], int]:
        """The running requests and the number waiting (for metrics)."""
        with self.condition:
            return [h.request for h in self.running], len(self.waiting)

    def close(self) -> None:
        with self.condition:
            self.stopped = True
            self.condition.notify()
        self.thread.join(timeout=30)

    def _loop(self) -> None:
        while True:
            with self.condition:
                while not self.stopped and not self.waiting and not self.running:
                    self.condition.wait()
                if self.stopped:
                    break
                gone = [h for h in self.waiting if h.cancelled.is_set()]  # their clients left while they queued
                self.waiting = [h for h in self.waiting if not h.cancelled.is_set()]
                admitted = self.waiting[: self.max_running - len(self.running)]
                self.waiting = self.waiting[len(admitted) :]
                self.running += admitted
            self._finish(gone, "cancelled")
            for handle in admitted:
                handle.admitted_at = time.monotonic()
            self._drop_abandoned()
            try:
                self.engine.step([h.request for h in self.running])
            except Exception as error:  # a bug, or a worker failing outside the per-call handling
                log.exception("engine step failed")
                for handle in self.running:
                    handle.request.error = error if isinstance(error, EFTError) else EFTError(f"engine step failed: {error}")
                    handle.request.finish_reason = "error"
            self._publish()
        self._finish(self.running + self.waiting, "cancelled")

    def _drop_abandoned(self) -> None:
        now = time.monotonic()
        for handle in list(self.running):
            if handle.cancelled.is_set():
                self._finish([handle], "cancelled")
            elif handle.deadline is not None and now > handle.deadline:
                self._finish([handle], "deadline")

    def _publish(self) -> None:
        for handle in list(self.running):
            request = handle.request
            new = slice(handle.sent, len(request.tokens))
            if request.done:
                self.running.remove(handle)
                final = Chunk.of(request, new, final=True)
                self._release_then_put(handle, final)
            elif new.start < new.stop:
                handle.put(Chunk.of(request, new))
            handle.sent = len(request.tokens)

    def _finish(self, handles: list[Handle], reason: str) -> None:
        for handle in handles:
            if handle in self.running:
                self.running.remove(handle)
            handle.request.finish_reason = handle.request.finish_reason or reason
            self._release_then_put(handle, Chunk.ended(reason))

    def _release_then_put(self, handle: Handle, final: Chunk) -> None:
        """The final chunk follows the release of the request's sessions (a caller that saw
        the end finds them freed), which runs off this loop."""
        self.engine.release([handle.request]).add_done_callback(lambda _: handle.put(final))
