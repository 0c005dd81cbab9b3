"""Two Ray nodes on this machine (`ray start` processes on loopback, each with its own custom
resources) serving one application, deployed by `eft serve --address auto` attached to the
cluster it did not start, with the gateway/coordinator replicas and the pair group each
autoscaled between 1 and 2 replicas, at most one per node (a custom resource each node
offers once). Under load both scale out; requests reach both gateways through the shared
public port and are placed by the workers' reported load; both scale back, their removed
replicas draining, with no failed request. Then the second node stops as a lost pod would
(every process of it killed): its requests end UNAVAILABLE, the others finish with their
full output, and the first node's replicas take new requests; last, SIGTERM drains and
deletes the application and leaves the cluster running. Its own package: one Ray cluster at
a time, and tests/cluster's is stopped by the time this runs."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import psutil
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cluster.config import demo_config
from eft_core import SamplingParams
from services.pb.eft.v1 import eft_pb2, eft_pb2_grpc
from tests.cluster.helpers import IDLE_TIMEOUT_S, chat, free_ports, sessions_held, wait_for
from tests.cluster_multinode.driver import ANSWER

BIN = Path(sys.executable).parent
# Ray refuses a second node on 127.0.0.1 (it resolves it to the machine's address) and in its
# single-node mode (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0); other loopback addresses it takes as
# they are, so each node gets its own, and the cluster still never leaves loopback. Ray's
# token auth is off for it: this process's driver reads its token when Ray is first imported,
# long before the cluster exists (tests/cluster/test_security checks the auth).
HEAD_IP, SECOND_IP = "127.0.0.2", "127.0.0.3"
ENV = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1", "RAY_AUTH_MODE": "disabled"}
HEAD_RESOURCES = {"eft-gateway": 1, "pair-slot": 1, "head": 1}
SECOND_RESOURCES = {"eft-gateway": 1, "pair-slot": 1}
# Ray's and Serve's lines that are false here (its proxy is off) or repeat the banner: `eft
# serve` must not print them (issue 18).
RAY_NOISE = ("is ready at http", "Connecting to existing Serve app", "RAY_AUTH_MODE=disabled to opt out", "killed by `ray.kill`", "Started <ray.serve")
LONG = 120  # tokens of a stream that is still running when the node stops
LOSS_WINDOW_S = 30.0  # calls may fail this long after a node is lost (a dead gateway's clients reconnecting), none later
# Sessions per pair replica: a request holds 3 there (two models and the drafter's), so 16
# clients ask for 2 replicas and 2 clients fit in 1. Short windows, for a test.
AUTOSCALING = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 8, "upscale_delay_s": 1, "downscale_delay_s": 3, "metrics_interval_s": 0.5, "look_back_period_s": 2}
# Requests per gateway: 16 clients ask for 2 gateways, 2 fit in 1.
GATEWAY_AUTOSCALING = AUTOSCALING


class Load:
    """Clients each asking for greedy replies in a loop, every reply checked against the oracle;
    ``stop(n)`` ends n of them (all by default). ``failures``: what went wrong (code, details,
    when), if anything."""

    def __init__(self, address: str, questions: list[str], expected: dict[str, list[int]], clients: int):
        self.address, self.questions, self.expected = address, questions, expected
        self.failures, self.replies, self.stops = [], 0, [threading.Event() for _ in range(clients)]
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)]
        for thread in self.threads:
            thread.start()

    def _client(self, i: int) -> None:
        question = self.questions[i % len(self.questions)]
        with own_connection(self.address) as channel:
            service = eft_pb2_grpc.EFTServiceStub(channel)
            while not self.stops[i].is_set():
                try:
                    tokens = [t for chunk in service.GenerateStream(chat(question, temperature=0.0, max_tokens=24), timeout=120) for t in chunk.token_ids]
                    if tokens != self.expected[question]:
                        self.failures.append(("wrong output", i, time.monotonic()))
                    self.replies += 1
                except grpc.RpcError as error:
                    self.failures.append((error.code().name, error.details(), time.monotonic()))
                    time.sleep(0.1)  # as a client backs off

    def stop(self, n: int | None = None) -> None:
        ending = list(range(len(self.threads)))[-(n or len(self.threads)):]
        for i in ending:
            self.stops[i].set()
        for i in ending:
            self.threads[i].join(timeout=180)


def own_connection(address: str) -> grpc.Channel:
    """A channel with a TCP connection of its own (gRPC shares one between a process's
    channels to the same target): the kernel hands each connection to one of the gateways
    listening on the shared port."""
    return grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])


def _ray(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), *args], capture_output=True, text=True, timeout=120, env=ENV)


class SecondNode:
    """`ray start --address ... --block` in its own session: stop() kills it and every process
    under it (its raylet, agents and the replicas' workers), as a deleted pod would be."""

    def __init__(self, head_port: int):
        ports = free_ports(6)
        flags = [f"--{name}={port}" for name, port in zip(["node-manager-port", "object-manager-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port"], ports)]
        command = [str(BIN / "ray"), "start", f"--address={HEAD_IP}:{head_port}", f"--node-ip-address={SECOND_IP}", "--num-cpus=1", f"--resources={json.dumps(SECOND_RESOURCES)}", "--min-worker-port=26000", "--max-worker-port=26999", "--disable-usage-stats", "--block", *flags]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV, start_new_session=True)
        self.node_manager_port = ports[0]

    def stop(self) -> None:
        if self.process.poll() is not None:
            return
        tree = psutil.Process(self.process.pid)
        victims = [tree, *tree.children(recursive=True)]
        for victim in victims:
            try:
                victim.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        self.process.wait(timeout=30)


class Driver:
    """The deployment, seen from its own process (driver.py): the LocalDeployment methods the
    tests use, each one JSON line over a pipe."""

    def __init__(self, head: str):
        command = [sys.executable, "-m", "tests.cluster_multinode.driver", head]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=ENV, cwd=Path(__file__).parents[2])
        self.address = self._answer()["address"]

    def _answer(self) -> dict:
        """The driver's next answer, past what Ray prints on its stdout."""
        while line := self.process.stdout.readline():
            if line.startswith(ANSWER):
                return json.loads(line[len(ANSWER) :])
        raise AssertionError(f"the driver exited ({self.process.wait()}) without answering")

    def _ask(self, method: str):
        self.process.stdin.write(method + "\n")
        self.process.stdin.flush()
        answer = self._answer()
        if "error" in answer:
            raise RuntimeError(f"{method}: {answer['error']}")
        return answer["result"]

    def worker_addresses(self) -> dict[str, list[str]]:
        return self._ask("worker_addresses")

    def worker_sessions(self) -> dict[str, list[int]]:
        return self._ask("worker_sessions")

    def gateway_requests(self) -> list[dict[str, float]]:
        return self._ask("gateway_requests")

    def running_replicas(self) -> dict[str, int]:
        return self._ask("running_replicas")

    def stop(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


def _wait_for_line(process: subprocess.Popen, text: str, seconds: float) -> list[str]:
    lines, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line and process.poll() is not None:
            break
        lines.append(line)
        if text in line:
            return lines
    pytest.fail(f"no {text!r} within {seconds} s; output:\n{''.join(lines)[-3000:]}")


@pytest.fixture(scope="module")
def cluster(quick_family, tmp_path_factory):
    """The two nodes, the application deployed on them by `eft serve --address auto` (attached
    to a cluster it did not start), and the test's view of it."""
    (port,) = free_ports(1)
    started = _ray("start", "--head", f"--node-ip-address={HEAD_IP}", f"--port={port}", "--num-cpus=2", f"--resources={json.dumps(HEAD_RESOURCES)}", "--include-dashboard=false", "--disable-usage-stats")
    assert started.returncode == 0, started.stderr[-2000:]
    second, serving, driver = SecondNode(port), None, None
    try:
        config = demo_config(quick_family.path, *free_ports(3)).model_dump(mode="json")
        config["gateway_autoscaling"], config["gateway_resources"] = GATEWAY_AUTOSCALING, {"eft-gateway": 1}  # at most one per node
        config["worker_groups"][0]["resources"] = {"head": 1}
        config["worker_groups"][1].update(resources={"pair-slot": 1}, autoscaling=AUTOSCALING)  # at most one per node
        for group in config["worker_groups"]:  # sessions the lost gateway left behind are freed soon
            group["session_idle_timeout_s"] = IDLE_TIMEOUT_S
        path = tmp_path_factory.mktemp("multinode") / "serve.yaml"
        path.write_text(yaml.safe_dump(config))
        wait_for(lambda: _alive_nodes(port) == 2, 60, "the second Ray node to join")
        serving = subprocess.Popen([str(BIN / "eft"), "serve", "--config", str(path), "--address", "auto"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
        lines = _wait_for_line(serving, "serving; Ctrl-C stops", 300)
        assert any("the Ray cluster at auto" in line for line in lines), lines
        assert any("Ray                     token authentication off" in line for line in lines), lines
        assert not [line for line in lines if any(noise in line for noise in RAY_NOISE)], lines
        driver = Driver(f"{HEAD_IP}:{port}")
        yield driver, second, serving, port
    finally:  # the cluster is this test's own: stopped whole
        if driver is not None:
            driver.stop()
        if serving is not None and serving.poll() is None:
            serving.kill()
        second.stop()
        _ray("stop", "--force")


def _alive_nodes(port: int) -> int:
    status = _ray("status", f"--address={HEAD_IP}:{port}")
    return status.stdout.split("Pending:")[0].count(" node_") if status.returncode == 0 else 0


def _expected(oracle, question: str, max_tokens: int, ignore_eos: bool = False) -> list[int]:
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    return oracle.generate("upscaled", [{"role": "user", "content": question}], params, ignore_eos=ignore_eos).generation.tokens


def _questions(quick_family) -> list[str]:
    return [f"what is the {attribute} of {entity} ?" for entity in quick_family.world().entities[:2] for attribute in ("capital", "animal")]


def _replicas(deployment) -> tuple[int, int]:
    """Running replicas: (gateways, pair workers)."""
    running = deployment.running_replicas()
    return running["gateway"], running["worker-pair"]


def _balanced(sessions: list[int]) -> bool:
    """Two replicas holding sessions, neither more than twice the other's."""
    return len(sessions) == 2 and 0 < max(sessions) <= 2 * min(sessions)


def test_coordinators_and_workers_scale_out_under_load_balance_and_scale_back_with_no_failed_request(cluster, oracle, quick_family):
    """At rest, one gateway and one pair replica. 16 clients asking in a loop: the gateways
    scale out to one per node (by the requests they have admitted) and the pair group too
    (by the sessions it holds); new connections reach both gateways, each places by the
    workers' own reported load, so the pair replicas' sessions balance. 14 clients stop:
    both scale back, their removed replicas draining (a gateway closes its ports and sends
    GOAWAY, so its clients' next calls land on the other), and no request fails."""
    deployment = cluster[0]
    questions = _questions(quick_family)
    wait_for(lambda: _replicas(deployment) == (1, 1), 120, "one gateway and one pair replica at rest")
    load = Load(deployment.address, questions, {q: _expected(oracle, q, 24) for q in questions}, clients=16)
    try:
        wait_for(lambda: _replicas(deployment) == (2, 2), 180, "a second gateway and pair replica under load")
        answers = _on_new_connections(deployment.address, questions, 16)
        assert answers == {i: _expected(oracle, questions[i % 4], 12) for i in range(16)}
        served = deployment.gateway_requests()
        print(f"two coordinators: requests answered per gateway {served}")
        assert len(served) == 2 and all(s.get("OK", 0) > 0 for s in served), served  # both gateways answered
        wait_for(lambda: _balanced(deployment.worker_sessions()["pair"]), 30, "the pair replicas' sessions balanced")
        load.stop(14)  # two clients go on through the scale-in: the removed replicas drain them
        wait_for(lambda: _replicas(deployment) == (1, 1), 180, "one gateway and one pair replica again")
        served_before = load.replies
        wait_for(lambda: load.replies >= served_before + 4, 60, "the two clients served on")
    finally:
        load.stop()
    print(f"gateways and pair group 1 -> 2 -> 1 replicas under load: {load.replies} replies, {len(load.failures)} failed")
    assert load.failures == [] and load.replies > 32, (load.failures[:5], load.replies)


def _on_new_connections(address: str, questions: list[str], n: int) -> dict[int, list[int]]:
    """n greedy requests of 12 tokens at once, each on a connection of its own: the kernel
    hands each to one of the gateways listening on the shared port."""
    answers = {}

    def ask(i: int) -> None:
        with own_connection(address) as channel:
            reply = eft_pb2_grpc.EFTServiceStub(channel).Generate(chat(questions[i % 4], temperature=0.0, max_tokens=12), timeout=120)
        answers[i] = list(reply.token_ids)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return answers


def test_a_stopped_node_fails_only_its_requests_and_the_other_node_serves_on(cluster, oracle, quick_family):
    """Under load (which scales the pair group out to a replica on each node), long streams
    run when the second node dies. Streams that were on it (its gateway, or its pair replica)
    end UNAVAILABLE; those on the first node finish whole and exact; the clients go on
    being served by the first node's replicas, and each lost at most its one request."""
    deployment, second = cluster[:2]
    questions = _questions(quick_family)
    load = Load(deployment.address, questions, {q: _expected(oracle, q, 24) for q in questions}, clients=16)
    try:
        wait_for(lambda: _replicas(deployment) == (2, 2), 180, "a gateway and a pair replica on each node")
        wait_for(lambda: min(deployment.worker_sessions()["pair"]) > 0, 30, "both pair replicas serving")
        stopped_at = []
        outcomes = _long_streams_through(lambda: stopped_at.append(time.monotonic()) or second.stop(), deployment.address, questions)
        served_before = load.replies
        wait_for(lambda: load.replies >= served_before + 16, 120, "the clients served on by the first node")
    finally:
        load.stop()
    codes = [code for code, _ in outcomes.values()]
    print(f"node lost: long streams {sorted(codes)}; clients {load.replies} replies, {len(load.failures)} failed calls, the last {max((w for *_, w in load.failures), default=stopped_at[0]) - stopped_at[0]:.1f} s after the loss")
    assert len(outcomes) == 12 and set(codes) <= {"OK", "UNAVAILABLE"} and "UNAVAILABLE" in codes, codes
    for i, (code, tokens) in outcomes.items():
        if code == "OK":  # the others' output is whole, and exact
            assert tokens == _expected(oracle, questions[i % 4], LONG, ignore_eos=True)
    # A client call the lost gateway had not yet taken up can end CANCELLED rather than
    # UNAVAILABLE as its process goes (gRPC ends such calls CANCELLED: grpc/grpc#41785).
    assert {code for code, _, _ in load.failures} <= {"UNAVAILABLE", "CANCELLED"}, load.failures[:5]
    assert all(0 <= when - stopped_at[0] < LOSS_WINDOW_S for _, _, when in load.failures), load.failures[:5]  # only while the node went
    with grpc.insecure_channel(deployment.address) as channel:
        service = eft_pb2_grpc.EFTServiceStub(channel)
        for question in questions:
            reply = service.Generate(chat(question, temperature=0.0, max_tokens=12), timeout=120)
            assert list(reply.token_ids) == _expected(oracle, question, 12)


def _long_streams_through(event, address: str, questions: list[str]) -> dict[int, tuple[str, list[int]]]:
    """12 streams of LONG tokens, each on a connection of its own; ``event`` happens once all
    are running. Each stream's final code and the tokens it got."""
    running, outcomes, lock = [threading.Event() for _ in range(12)], {}, threading.Lock()

    def stream(i: int) -> None:
        request = chat(questions[i % 4], temperature=0.0, max_tokens=LONG, ignore_eos=True)
        tokens = []
        try:
            with own_connection(address) as channel:
                for chunk in eft_pb2_grpc.EFTServiceStub(channel).GenerateStream(request, timeout=180):
                    tokens += chunk.token_ids
                    running[i].set()
            outcome = "OK"
        except grpc.RpcError as error:
            outcome = error.code().name
        with lock:
            outcomes[i] = (outcome, tokens)
        running[i].set()

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    assert all(e.wait(120) for e in running) and not outcomes, outcomes  # every stream is running
    event()
    for t in threads:
        t.join(timeout=240)
    return outcomes


def test_sigterm_drains_the_streams_then_deletes_the_application_and_leaves_the_cluster(cluster, oracle, quick_family):
    """SIGTERM to `eft serve` (attached to a cluster it did not start) during 4 long streams:
    a health watch hears NOT_SERVING, the ports take no new connection (UNAVAILABLE), all 4
    streams finish with their whole output; then the application is gone and the
    cluster, and its Serve, keep running."""
    deployment, _, serving, port = cluster
    questions = _questions(quick_family)
    flipped, refused, ended = [], [], {}

    def stream(i: int) -> None:
        request = chat(questions[i], temperature=0.0, max_tokens=LONG, ignore_eos=True)
        request.speculation.mode = eft_pb2.SPECULATION_MODE_OFF  # a token per step: the streams outlast the flip
        try:
            with own_connection(deployment.address) as channel:
                tokens = [t for chunk in eft_pb2_grpc.EFTServiceStub(channel).GenerateStream(request, timeout=180) for t in chunk.token_ids]
        except grpc.RpcError as error:  # cut: the assertion below shows how
            tokens = error.code().name
        ended[i] = (time.monotonic(), tokens)

    # Until Ray has declared the lost node dead (its heartbeats missed), Serve still lists
    # its replicas as running, and a call routed to one hangs; streams then cannot all run.
    wait_for(lambda: _replicas(deployment) == (1, 1), 180, "Serve to drop the lost node's replicas")
    threads = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    wait_for(lambda: sessions_held(deployment) >= 4 * 3, 60, "the 4 streams running")  # each holds the base and the pair sessions
    with own_connection(deployment.address) as channel:  # a health watch, as a load balancer keeps
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=120)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        serving.send_signal(signal.SIGTERM)
        if next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING:
            flipped.append(time.monotonic())
    with own_connection(deployment.address) as channel:  # the ports take no new connection
        try:
            eft_pb2_grpc.EFTServiceStub(channel).Generate(chat(questions[0], max_tokens=4), timeout=30)
        except grpc.RpcError as error:
            refused.append(error.code())
    for thread in threads:
        thread.join(timeout=180)
    assert serving.wait(timeout=120) == 0
    said = serving.stdout.read()
    assert said.rstrip().endswith("stopped") and "Traceback" not in said and not any(noise in said for noise in RAY_NOISE), said[-3000:]
    assert flipped  # the watch's next word (that it comes before the running requests end, whatever the machine's pace, is tested in process: test_edge.py)
    print(f"drain: health NOT_SERVING {min(t for t, _ in ended.values()) - flipped[0]:.1f} s before the first of 4 streams ended; a new request {refused}")
    assert refused == [grpc.StatusCode.UNAVAILABLE]
    assert [ended[i][1] for i in range(4)] == [_expected(oracle, questions[i], LONG, ignore_eos=True) for i in range(4)]  # whole and exact
    listed = subprocess.run(
        [sys.executable, "-c", f"import ray; from ray import serve; ray.init(address='{HEAD_IP}:{port}', log_to_driver=False); print(sorted(serve.status().applications))"],
        capture_output=True, text=True, timeout=120, env=ENV,
    )
    assert listed.returncode == 0 and "eft" not in listed.stdout.strip().splitlines()[-1], listed.stdout + listed.stderr[-2000:]
    assert _alive_nodes(port) >= 1  # the head still runs (the second node was lost above)
