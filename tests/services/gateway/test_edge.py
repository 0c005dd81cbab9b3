"""The public servers under load and against slow, huge or vanishing clients: HTTP requests
wait without threads (hundreds at once, health answering throughout, also behind a stalled
worker), overload is 429 at once, disconnected and timed-out requests free their sessions,
trickling clients are cut off, oversized chats are refused before any rendering."""

import json
import socket
import subprocess
import sys
import threading
import time

import grpc
import pytest
import requests
from grpc_health.v1 import health_pb2, health_pb2_grpc

from eft_core import ResourceExhaustedError, SamplingParams, UnavailableError
from services.coordinator.engine import Engine, pools_of
from services.coordinator.scheduler import Scheduler
from services.family.compositions import family_compositions
from services.gateway.connections import Connections, stop_listening
from services.gateway.gateway import Gateway, Limits, longest_token_chars
from services.gateway.openai_api import create_app, start_http_server
from services.gateway.server import create_server
from services.metrics import ServingMetrics
from services.pb.eft.v1 import eft_pb2, eft_pb2_grpc
from services.worker.client import model_contexts
from tests.services.coordinator.helpers import questions, start_workers

SLOW_CLIENT_S = 1.0  # the fixture's header and body timeouts (the defaults are 5 and 30 s)


@pytest.fixture(scope="module")
def edge(quick_family, oracle, tokenizers):
    placement, workers, stop_workers = start_workers(quick_family, "grpc")
    metrics = ServingMetrics()
    scheduler = Scheduler(Engine(pools_of(placement), oracle.vocab_sizes, metrics=metrics))  # the default limits: 32 running, 256 waiting
    gateway = Gateway(family_compositions(), tokenizers, model_contexts(placement.values()), scheduler, "upscaled", Limits(max_tokens=40), metrics)
    connections = Connections(header_timeout_s=SLOW_CLIENT_S, body_timeout_s=SLOW_CLIENT_S)
    http, port = start_http_server(create_app(gateway, connections=connections), "127.0.0.1", 0, connections=connections)
    yield f"http://127.0.0.1:{port}", gateway, workers
    http.should_exit = True
    scheduler.close()
    stop_workers()


def _chat(quick_family, max_tokens=12) -> dict:
    return {"model": "upscaled", "messages": questions(quick_family)[0], "temperature": 0, "max_tokens": max_tokens}


def _greedy(oracle, quick_family, max_tokens=12) -> str:
    return oracle.generate("upscaled", questions(quick_family)[0], SamplingParams(temperature=0, max_tokens=max_tokens)).text


class _HealthProbe:
    """Asks /health and /v1/models every 50 ms with a kubelet's 1 s timeout, until stopped."""

    def __init__(self, url: str):
        self.url, self.latencies, self.failures = url, [], []
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._probe, daemon=True)
        self.thread.start()

    def _probe(self):
        while not self.stopped.is_set():
            for path in ("/health", "/v1/models"):
                started = time.perf_counter()
                try:
                    status = requests.get(self.url + path, timeout=1.0).status_code
                    if status != 200:
                        self.failures.append(f"{path}: {status}")
                except requests.RequestException as error:
                    self.failures.append(f"{path}: {error!r}")
                self.latencies.append(time.perf_counter() - started)
            self.stopped.wait(0.05)

    def stop(self) -> "_HealthProbe":
        self.stopped.set()
        self.thread.join()
        return self


def _load(url: str, n: int, body: dict) -> list[dict]:
    done = subprocess.run([sys.executable, "-m", "tests.services.gateway.http_load", url, str(n), json.dumps(body)], capture_output=True, text=True, timeout=600, check=True)
    return json.loads(done.stdout)


def test_300_streams_are_served_or_refused_429_while_health_answers(edge, oracle, quick_family):
    url, gateway, _ = edge
    probe = _HealthProbe(url)
    results = _load(url, 300, _chat(quick_family, 6))
    probe.stop()
    served = [r for r in results if r["status"] == 200]
    refused = [r for r in results if r["status"] == 429]
    assert len(served) + len(refused) == 300, {r["status"] for r in results}
    assert all(r.get("text") == _greedy(oracle, quick_family, 6) for r in served), [r for r in served if r.get("text") != _greedy(oracle, quick_family, 6)][:2]
    assert all(r["error"]["type"] == "rate_limit_error" and r["error"]["param"] == "queue" for r in refused)
    assert len(served) >= 288  # the limits: 32 running + 256 waiting
    assert not probe.failures and max(probe.latencies) < 1.0
    print(f"300 streams: {len(served)} served, {len(refused)} refused 429; /health and /v1/models at most {max(probe.latencies) * 1000:.0f} ms")
    assert gateway.scheduler.counts == (0, 0)


def test_health_answers_while_60_streams_wait_on_a_stalled_worker(edge, oracle, quick_family):
    url, gateway, workers = edge
    load = {}
    client = threading.Thread(target=lambda: load.update(results=_load(url, 60, _chat(quick_family))))
    with workers[0].lock:  # the base worker stalls: every stream waits on it
        client.start()
        deadline = time.monotonic() + 30
        while sum(gateway.scheduler.counts) < 60 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sum(gateway.scheduler.counts) == 60
        probe = _HealthProbe(url)
        time.sleep(3.0)
        probe.stop()
    client.join()
    assert not probe.failures and max(probe.latencies) < 1.0, probe.failures
    print(f"60 streams on a stalled worker: /health and /v1/models at most {max(probe.latencies) * 1000:.0f} ms")
    assert [r.get("text") for r in load["results"]] == [_greedy(oracle, quick_family)] * 60


def _wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def _cancelled(gateway) -> float:
    return gateway.metrics.requests.labels("CANCELLED")._value.get()


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_disconnects_is_cancelled_and_frees_its_sessions(edge, quick_family, stream):
    url, gateway, workers = edge
    before = _cancelled(gateway)
    with workers[0].lock:
        with pytest.raises((requests.exceptions.ReadTimeout, requests.exceptions.ConnectionError)):  # the client gives up and closes its connection
            requests.post(url + "/v1/chat/completions", json={**_chat(quick_family, 40), "stream": stream}, timeout=1.0).content
        assert gateway.scheduler.counts == (1, 0)
    _wait_until(lambda: gateway.scheduler.counts == (0, 0) and sum(w.sessions_held() for w in workers) == 0)
    assert _cancelled(gateway) == before + 1  # cancelled, not generated to its end


def test_a_request_timeout_is_504_and_frees_its_sessions(edge, quick_family):
    url, gateway, workers = edge
    with workers[0].lock:
        reply = requests.post(url + "/v1/chat/completions", json={**_chat(quick_family, 40), "timeout": 0.5}, timeout=30)
    assert reply.status_code == 504 and reply.json()["error"]["type"] == "timeout"
    _wait_until(lambda: gateway.scheduler.counts == (0, 0) and sum(w.sessions_held() for w in workers) == 0)


def _closed_after(sock: socket.socket, trickle: bytes, every_s: float = 0.2, limit_s: float = 10.0) -> tuple[float, bytes]:
    """Sends ``trickle`` a byte at a time; returns when the server closed the connection, and what it said."""
    started, said = time.monotonic(), b""
    sock.settimeout(every_s)
    for byte in trickle:
        try:
            sock.sendall(bytes([byte]))
            chunk = sock.recv(4096)
            said += chunk
            if not chunk or said.endswith(b"}"):  # closed, or answered (the connection then closes)
                break
        except socket.timeout:
            pass
        except (BrokenPipeError, ConnectionResetError):
            break
        assert time.monotonic() - started < limit_s, "still open"
    return time.monotonic() - started, said


def test_a_client_trickling_headers_or_body_is_cut_off(edge):
    url, _, _ = edge
    host, port = url.removeprefix("http://").split(":")
    assert Connections().header_timeout_s <= 10
    with socket.create_connection((host, int(port))) as sock:
        seconds, said = _closed_after(sock, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: " + b"a" * 200)
    assert said == b"" and seconds < SLOW_CLIENT_S + 1.0
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 300\r\n\r\n")
        seconds, said = _closed_after(sock, b'{"messages": [' + b" " * 280)
    assert said.startswith(b"HTTP/1.1 408") and b"http.body_timeout_s" in said and seconds < SLOW_CLIENT_S + 1.0
    with socket.create_connection((host, int(port))) as idle:  # a connection that never sends anything goes too
        idle.settimeout(SLOW_CLIENT_S + 1.0)
        assert idle.recv(10) == b""


def test_connections_past_the_cap_get_503(edge):
    _, gateway, _ = edge
    connections = Connections(max_connections=3)
    server, port = start_http_server(create_app(gateway, connections=connections), "127.0.0.1", 0, connections=connections)
    try:
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        time.sleep(0.2)
        assert requests.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 503
        for sock in held:
            sock.close()
        time.sleep(0.2)
        assert requests.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
    finally:
        server.should_exit = True


def test_a_huge_chat_is_refused_before_rendering(edge):
    url, gateway, _ = edge
    body = json.dumps({"messages": [{"role": "user", "content": "x"}] * 135_000}, separators=(",", ":"))
    assert 3.9e6 < len(body) < gateway.limits.max_request_bytes
    started = time.perf_counter()
    reply = requests.post(url + "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}, timeout=30)
    seconds = time.perf_counter() - started
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "messages", reply.text
    assert "135000 messages, over the limit of 2048" in reply.json()["error"]["message"]
    server, port = create_server(gateway, "127.0.0.1:0")
    try:
        request = eft_pb2.GenerateRequest()
        request.messages.messages.extend([eft_pb2.ChatMessage(role="user", content="x")] * 135_000)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(grpc.RpcError) as error:
                eft_pb2_grpc.EFTServiceStub(channel).Generate(request, timeout=30)
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "messages" in error.value.details()
    finally:
        server.stop(grace=None)
    print(f"a {len(body) / 2**20:.1f} MiB chat of 135000 messages refused over HTTP in {seconds * 1000:.0f} ms")


def test_a_body_that_is_not_json_names_the_body(edge):
    url, _, _ = edge
    reply = requests.post(url + "/v1/chat/completions", data=b"{not json", headers={"Content-Type": "application/json"}, timeout=30)
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "body" and "not valid JSON" in reply.json()["error"]["message"]
    reply = requests.post(url + "/v1/chat/completions", json=[1, 2], timeout=30)
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "body"


def test_a_prompt_too_long_for_any_tokenization_is_refused_unrendered(bpe_family):
    from transformers import AutoTokenizer

    tokenizers = {n: AutoTokenizer.from_pretrained(bpe_family.model_path(n)) for n in bpe_family.manifest["models"]}
    compositions = family_compositions()
    contexts = dict.fromkeys(tokenizers, 4096)
    gateway = Gateway(compositions, tokenizers, contexts, scheduler=None, default_composition="upscaled", limits=Limits(max_prompt_tokens=64))
    span = longest_token_chars(tokenizers["large-base"])
    assert 1 < span < 64
    with pytest.raises(ResourceExhaustedError, match="characters is over 64 tokens") as huge:
        gateway.prepare(eft_pb2.GenerateRequest(text="word " * 800_000))
    assert huge.value.field == "prompt"
    with pytest.raises(ResourceExhaustedError, match="prompt tokens, over the limit of 64"):  # under the bound: rendered, then refused exactly
        gateway.prepare(eft_pb2.GenerateRequest(text="word " * 100))


def test_a_word_level_tokenizer_has_no_character_bound(tokenizers):
    assert longest_token_chars(tokenizers["large-base"]) is None  # [UNK] stands for any word


def test_grpc_connections_are_aged_out(edge):
    _, gateway, _ = edge
    server, port = create_server(gateway, "127.0.0.1:0", connections=Connections(grpc_max_connection_age_s=0.5, grpc_max_connection_age_grace_s=0.5))
    states = []
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            channel.subscribe(states.append)
            eft_pb2_grpc.EFTServiceStub(channel).ListCompositions(eft_pb2.ListCompositionsRequest(), timeout=10)
            time.sleep(2.0)
        assert grpc.ChannelConnectivity.READY in states and states[-1] != grpc.ChannelConnectivity.READY, states  # the server sent GOAWAY
    finally:
        server.stop(grace=None)


def test_a_drain_turns_health_off_closes_the_ports_and_waits_for_the_running(edge, oracle, quick_family):
    """4 HTTP streams and a gRPC stream run when the drain begins (the worker's lock holds
    them): a health watch hears NOT_SERVING, the ports take no new connection (a replica
    sharing the port would take it), the running requests finish whole and exact."""
    _, gateway, workers = edge
    http, port = start_http_server(create_app(gateway), "127.0.0.1", 0, drain_timeout_s=60)
    grpc_server, grpc_port = create_server(gateway, "127.0.0.1:0")
    load, drained, streamed = {}, {}, {}
    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
    try:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=60)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        request = eft_pb2.GenerateRequest(composition="upscaled", sampling=eft_pb2.Sampling(temperature=0.0, max_tokens=12))
        request.messages.messages.add(role="user", content=questions(quick_family)[0][0]["content"])
        with workers[0].lock:  # the streams cannot end before the drain has begun
            clients = [
                threading.Thread(target=lambda: load.update(results=_load(f"http://127.0.0.1:{port}", 4, _chat(quick_family)))),
                threading.Thread(target=lambda: streamed.update(text="".join(c.text for c in eft_pb2_grpc.EFTServiceStub(channel).GenerateStream(request, timeout=60)))),
            ]
            for client in clients:
                client.start()
            _wait_until(lambda: gateway.admitted() == 5, 30)
            drainer = threading.Thread(target=lambda: drained.update(counts=gateway.drain(60, lambda: stop_listening(grpc_server, http, 60))))
            drainer.start()
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            assert gateway.healthz() == (503, "unavailable: draining")
            _wait_until(lambda: not _accepts(port) and not _accepts(grpc_port))
            late = gateway.submit(request)  # a call a server took before its doors closed, reaching submit after: served
        drainer.join(60)
        for client in clients:
            client.join(60)
        assert drained["counts"][1] == 0 and drained["counts"][0] >= 5
        assert [r.get("text") for r in load["results"]] == [_greedy(oracle, quick_family)] * 4
        assert streamed["text"] == "".join(reply.text for reply in gateway.replies(late)) == _greedy(oracle, quick_family)
        with pytest.raises(UnavailableError, match="shutting down"):  # after the drain
            gateway.submit(request)
    finally:
        gateway.draining = gateway.drained = False
        channel.close()
        grpc_server.stop(grace=None)
        http.should_exit = True


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False
