"""What the tests of the local Ray deployment share: requests, polling, ports."""

import socket
import time

from services.pb.eft.v1 import eft_pb2

IDLE_TIMEOUT_S = 10.0  # the test deployment's worker session idle timeout
MAX_RUNNING, MAX_WAITING = 16, 8  # its scheduler's limits


def chat(question: str, **sampling) -> eft_pb2.GenerateRequest:
    request = eft_pb2.GenerateRequest(sampling=eft_pb2.Sampling(**sampling), return_options=eft_pb2.ReturnOptions(token_ids=True))
    request.messages.messages.add(role="user", content=question)
    return request


def sessions_held(deployment) -> int:
    """Sessions every worker replica of the deployment holds now, all together."""
    return sum(map(sum, deployment.worker_sessions().values()))


def wait_for(condition, seconds: float, what: str) -> float:
    """Poll ``condition`` every 0.5 s for up to ``seconds``; returns how long it took."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < seconds, f"timed out waiting for {what}"
        time.sleep(0.5)
    return time.monotonic() - started


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on 127.0.0.1 now (all probed at once, so none repeats)."""
    probes = [socket.socket() for _ in range(n)]
    try:
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in probes]
    finally:
        for probe in probes:
            probe.close()


def free_port() -> int:
    return free_ports(1)[0]
