"""Which worker replicas take new requests: outlier ejection with probing, as a load
balancer does it (Envoy's outlier detection, a circuit breaker's half-open state).

- A call that times out or fails for the replica's own reason (not for a bad item) **ejects**
  the replica at once: it takes no new requests, and the requests still placed on it fail
  with UNAVAILABLE at their next call instead of waiting on it.
- An ejected replica is **probed** off the decoding loop (Info, a short deadline), every
  ``PROBE_INTERVAL_S`` doubling to ``MAX_PROBE_INTERVAL_S`` while probes fail. Once a probe
  answers and its ejection time is over, it returns **on probation** (the engine places one
  request there until a call of it succeeds), and the sessions released while it was out
  are freed there.
- The ejection time doubles with each ejection in a row (from ``BASE_EJECTION_S`` up to
  ``MAX_EJECTION_S``) and resets with a successful call, so a replica that answers Info but
  fails every call costs one request per return, ever more rarely.
"""

import logging
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field

from eft_core import EFTError
from services.grpc_server import DEFAULT_MAX_MESSAGE_BYTES

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 1.0
PROBE_INTERVAL_S, MAX_PROBE_INTERVAL_S = 0.5, 4.0
BASE_EJECTION_S, MAX_EJECTION_S = 2.0, 60.0


@dataclass(frozen=True)
class CallPolicy:
    """Deadlines and sizes of the coordinator's calls to workers. A call's deadline grows
    with the tokens it sends, so a long prefill is not mistaken for a stalled replica."""

    timeout_s: float = 5.0  # a call that sends no more than a decode step's tokens
    prefill_tokens_per_s: float = 1000.0  # the slowest prefill a healthy worker keeps up
    max_answer_bytes: int = DEFAULT_MAX_MESSAGE_BYTES // 2  # a larger batch is split over calls: an answer never reaches the gRPC limit

    def deadline(self, tokens: int) -> float:
        return self.timeout_s + tokens / self.prefill_tokens_per_s


@dataclass
class _Ejected:
    reason: str
    until: float  # time.monotonic() before which it stays out, even if probes answer
    next_probe: float
    probe_interval: float = PROBE_INTERVAL_S
    releases: list[str] = field(default_factory=list)  # session ids to free there on its return


class ReplicaHealth:
    """The ejection state of every replica the engine has called (by client object)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.ejected: dict[object, _Ejected] = {}
        self.probation: set[object] = set()  # returned, no call succeeded yet
        self.ejections: dict[object, int] = defaultdict(int)  # in a row, reset by a successful call
        self.stopped = threading.Event()
        self.prober: threading.Thread | None = None  # runs while some replica is ejected

    def is_ejected(self, client) -> str | None:
        """Why the replica is out of placement, or None."""
        ejected = self.ejected.get(client)
        return ejected.reason if ejected else None

    def on_probation(self, client) -> bool:
        return client in self.probation

    def succeeded(self, client) -> None:
        with self.lock:
            if client in self.probation or self.ejections.get(client):
                log.info("worker replica %s answers again: back in placement", client)
            self.probation.discard(client)
            self.ejections.pop(client, None)

    def failed(self, client, error: EFTError) -> None:
        """Eject the replica (a call of it timed out or failed for its own reason)."""
        now = time.monotonic()
        with self.lock:
            if client in self.ejected:
                return
            self.ejections[client] += 1
            ejection = min(MAX_EJECTION_S, BASE_EJECTION_S * 2 ** (self.ejections[client] - 1))
            self.ejected[client] = _Ejected(str(error), now + ejection, now + PROBE_INTERVAL_S)
            self.probation.discard(client)
            if self.prober is None or not self.prober.is_alive():
                self.prober = threading.Thread(target=self._probe_while_ejected, name="replica-prober", daemon=True)
                self.prober.start()
        log.warning("worker replica %s ejected for at least %.0f s: %s", client, ejection, error)

    def defer_release(self, client, session_ids: list[str]) -> bool:
        """Keep ``session_ids`` to free when the replica returns; False when it is not ejected."""
        with self.lock:
            if client not in self.ejected:
                return False
            self.ejected[client].releases += session_ids
            return True

    def forget(self, clients) -> None:
        """Replicas that left their group (Ray Serve stopped them)."""
        with self.lock:
            for client in clients:
                self.ejected.pop(client, None)
                self.probation.discard(client)
                self.ejections.pop(client, None)

    def close(self) -> None:
        self.stopped.set()

    def _probe_while_ejected(self) -> None:
        while not self.stopped.wait(0.1):
            now = time.monotonic()
            with self.lock:
                if not self.ejected:
                    self.prober = None
                    return
                due = [client for client, e in self.ejected.items() if e.next_probe <= now]
            for client in due:
                self._probe(client)

    def _probe(self, client) -> None:
        try:
            client.info(timeout=PROBE_TIMEOUT_S)
        except EFTError as error:
            with self.lock:
                if (ejected := self.ejected.get(client)) is not None:
                    ejected.probe_interval = min(MAX_PROBE_INTERVAL_S, ejected.probe_interval * 2)
                    ejected.next_probe = time.monotonic() + ejected.probe_interval
            log.debug("probe of worker replica %s failed: %s", client, error)
            return
        with self.lock:
            ejected = self.ejected.get(client)
            if ejected is None:
                return
            if time.monotonic() < ejected.until:
                ejected.next_probe = ejected.until
                return
            del self.ejected[client]
            self.probation.add(client)
        log.info("worker replica %s answers its probe: on probation (one request until a call succeeds)", client)
        if ejected.releases:
            try:
                client.release(ejected.releases, timeout=PROBE_TIMEOUT_S)
            except EFTError as error:  # its idle reaper frees them
                log.warning("could not free %d sessions on returning replica %s: %s", len(ejected.releases), client, error)
