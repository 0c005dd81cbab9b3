"""Processes killed (SIGKILL) while requests stream through them, on the local Ray cluster.
A worker replica: its requests end with UNAVAILABLE within seconds, the others finish,
another composition keeps serving, and Ray Serve's replacement takes requests within a
minute. The gateway (with the coordinator): every stream ends with UNAVAILABLE at once, Ray
Serve restarts it on the same ports, and the workers free the sessions it left."""

import os
import signal
import threading
import time

import grpc
from ray import serve

from cluster.app import APP_NAME
from tests.cluster.helpers import IDLE_TIMEOUT_S, chat, sessions_held, wait_for


def stream_outcome(service, request, outcomes: list, lock, streaming: threading.Event) -> None:
    try:
        chunks = []
        for chunk in service.GenerateStream(request, timeout=120):
            chunks.append(chunk)
            streaming.set()
        outcome = ("OK", chunks[-1].usage.completion_tokens)
    except grpc.RpcError as error:
        outcome = (error.code().name, error.details())
    finally:
        streaming.set()
    with lock:
        outcomes.append((time.monotonic(), outcome))


def generates(service, composition: str) -> bool:
    request = chat("what is the capital of zeme ?", temperature=0.0, max_tokens=4)
    request.composition = composition
    try:
        return service.Generate(request, timeout=30).usage.completion_tokens > 0
    except grpc.RpcError:
        return False


def test_a_killed_worker_replica_fails_its_requests_fast_and_comes_back(stub, deployment, quick_family):
    service, _ = stub
    wait_for(lambda: len(deployment.worker_addresses()["pair"]) == 2, 60, "second pair replica")
    victim = serve.get_deployment_handle("worker-pair", APP_NAME).pids.remote().result()[0]
    outcomes, lock = [], threading.Lock()
    requests, streaming = [], [threading.Event() for _ in range(6)]
    for entity, started in zip(quick_family.world().entities, streaming):  # placed over both pair replicas
        request = chat(f"what is the animal of {entity} ?", temperature=1.0, max_tokens=45, ignore_eos=True)
        requests.append(threading.Thread(target=stream_outcome, args=(service, request, outcomes, lock, started)))
    for thread in requests:
        thread.start()
    for started in streaming:  # every request has its first tokens: all are mid-stream
        assert started.wait(timeout=60)
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    for thread in requests:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in requests), "a stream hung after the kill"
    codes = [outcome[0] for _, outcome in outcomes]
    assert set(codes) <= {"OK", "UNAVAILABLE"} and "UNAVAILABLE" in codes, outcomes
    assert all(at - killed_at < 10 for at, (code, _) in outcomes if code == "UNAVAILABLE"), outcomes
    assert generates(service, "large-tuned")  # another worker group serves on
    recovered = wait_for(lambda: generates(service, "upscaled"), 60, "upscaled reply after the kill")
    wait_for(lambda: replaced(deployment, victim), 90, "replacement replica")
    replaced_after = time.monotonic() - killed_at
    slowest = max(at - killed_at for at, (code, _) in outcomes if code == "UNAVAILABLE")
    print(f"kill -9 of pair replica {victim}: {codes.count('UNAVAILABLE')} streams UNAVAILABLE (the last {slowest:.2f} s after the kill), {codes.count('OK')} OK;"
          f" upscaled served again after {recovered:.1f} s; replacement known to the coordinator after {replaced_after:.1f} s")


def replaced(deployment, victim: int) -> bool:
    """Two live pair replicas, neither the victim, and the coordinator reaches both."""
    pids = replica_pids()
    return pids is not None and len(pids) == 2 and victim not in pids and len(deployment.worker_sessions()["pair"]) == 2 == len(deployment.worker_addresses()["pair"])


def replica_pids() -> set[int] | None:
    """The pair replicas' processes; None while Ray Serve still lists a dead one."""
    try:
        return {pids[0] for pids in serve.get_deployment_handle("worker-pair", APP_NAME).broadcast("pids").results()}
    except Exception:  # ActorDiedError: the controller has not noticed yet
        return None


def test_a_killed_gateway_fails_its_streams_fast_comes_back_and_its_sessions_are_freed(stub, deployment, quick_family):
    """The coordinator and gateway share one replica: killing it drops every stream it serves
    (clients see UNAVAILABLE and retry); Ray Serve restarts it on the same ports, and the
    workers free the dead coordinator's sessions after their idle timeout."""
    service, _ = stub
    victim = deployment.handle.pids.remote().result()[0]
    outcomes, lock = [], threading.Lock()
    requests, streaming = [], [threading.Event() for _ in range(4)]
    for entity, started in zip(quick_family.world().entities, streaming):
        request = chat(f"what is the capital of {entity} ?", temperature=1.0, max_tokens=60, ignore_eos=True)
        requests.append(threading.Thread(target=stream_outcome, args=(service, request, outcomes, lock, started)))
    for thread in requests:
        thread.start()
    for started in streaming:
        assert started.wait(timeout=60)
    held = sessions_held(deployment)
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    for thread in requests:
        thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in requests), "a stream hung after the kill"
    assert held > 0 and [code for _, (code, _) in outcomes] == ["UNAVAILABLE"] * 4, (held, outcomes)
    slowest = max(at - killed_at for at, _ in outcomes)
    assert slowest < 10, outcomes
    recovered = wait_for(lambda: generates(service, "upscaled"), 90, "a reply from the restarted gateway")
    wait_for(lambda: gateway_pid(deployment) not in (None, victim), 30, "the new gateway's process")
    wait_for(lambda: sessions_held(deployment) == 0, 60, "workers freeing the dead coordinator's sessions")
    freed = time.monotonic() - killed_at
    print(f"kill -9 of the gateway {victim}: 4 streams UNAVAILABLE (the last {slowest:.2f} s after the kill); served again on the same port after {recovered:.1f} s;"
          f" the {held} sessions the old coordinator held were freed by the workers {freed:.1f} s after the kill (idle timeout {IDLE_TIMEOUT_S:.0f} s)")


def gateway_pid(deployment) -> int | None:
    """The gateway replica's process; None while the handle still routes to the dead one."""
    try:
        return deployment.handle.pids.remote().result(timeout_s=10)[0]
    except Exception:  # ActorDiedError, or a timeout while the router catches up
        return None
