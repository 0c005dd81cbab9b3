"""The replica classes Ray Serve hosts: plain classes around the services (the builder in
cluster/app.py turns them into deployments).

- WorkerReplica: one worker group's models behind the ModelWorker gRPC service, on this
  node's address (the coordinator reaches workers over gRPC, never through Ray).
- GatewayReplica: the coordinator (engine and scheduler) and the gateway, serving the public
  EFTService on the configured port. Sessions live on worker replicas, so the coordinator
  addresses each replica directly (cluster/directory.py keeps the list) and keeps every
  request on the replicas that hold its caches.
"""

import logging
import os
import secrets
import threading
import time

import torch

from cluster.autoscaling import REQUESTS_METRIC, SESSIONS_METRIC
from cluster.config import ModelConfig, ServeConfig, WorkerGroupConfig, load_tokenizers
from cluster.directory import REFRESH_S as DIRECTORY_REFRESH_S
from cluster.directory import WorkerDirectory
from services.coordinator.engine import Engine, ReplicaPool
from services.coordinator.scheduler import Scheduler
from services.gateway.connections import Connections, stop_listening
from services.gateway.gateway import Gateway, Limits
from services.gateway.openai_api import create_app, start_http_server
from services.gateway.server import create_server as create_gateway_server
from services.metrics import ServingMetrics, scheduler_state, worker_state
from services.prompts import composition_vocab_sizes
from services.security import DRAIN_PATH, HEALTHZ_PATH, Security
from services.wire import DTYPE_NAMES
from services.worker.client import info_or_none, model_contexts
from services.worker.server import create_server as create_worker_server
from services.worker.tensor_parallel import start_tensor_parallel_worker
from services.worker.worker import ModelWorker, load_hosted_model, start_idle_reaper

log = logging.getLogger(__name__)
# A draining replica frees sessions unused this long: running requests use theirs every
# iteration, and a coordinator waiting out a stalled worker call does so for less.
ABANDONED_WHILE_DRAINING_S = 30.0


def worker_token() -> str:
    """The credential coordinators present to workers: made once per Ray cluster and kept in
    its GCS key-value store, which only the cluster's own processes reach (Ray's token auth
    guards it where on), so every replica of every redeploy agrees without it passing
    through the config. The first replica to ask makes it; the others read that one."""
    from ray.experimental import internal_kv

    internal_kv._internal_kv_put(WORKER_TOKEN_KEY, secrets.token_urlsafe(32), overwrite=False, namespace=KV_NAMESPACE)
    return internal_kv._internal_kv_get(WORKER_TOKEN_KEY, namespace=KV_NAMESPACE).decode()


WORKER_TOKEN_KEY, KV_NAMESPACE = "worker-token", "eft-serve"


def node_address() -> str:
    import ray

    return ray.util.get_node_ip_address()


class WorkerReplica:
    def __init__(self, group: dict, models: dict[str, dict]):
        group = WorkerGroupConfig.model_validate(group)
        if group.torch_threads is not None:
            torch.set_num_threads(group.torch_threads)
        configs = {name: ModelConfig.model_validate(models[name]) for name in group.models}
        self.followers = []
        if group.tp > 1:  # this replica is rank 0; ranks 1.. are its child processes
            (name, model), = configs.items()
            self.worker, self.followers = start_tensor_parallel_worker(name, model.path, group.tp, model.dtype, model.device, group.limits())
        else:
            hosted = [load_hosted_model(name, m.path, DTYPE_NAMES[m.dtype], _replica_device(m.device)) for name, m in configs.items()]
            self.worker = ModelWorker(hosted, group.limits())
        start_idle_reaper(self.worker, group.session_idle_timeout_s)  # a daemon thread: it ends with the replica's process
        self.stall_timeout_s, self.drain_timeout_s = group.stall_timeout_s, group.drain_timeout_s
        self.abandoned_after_s = min(group.session_idle_timeout_s, ABANDONED_WHILE_DRAINING_S)
        host = node_address()
        self.server, port = create_worker_server(self.worker, f"{host}:0", token=worker_token())
        self.address_ = f"{host}:{port}"
        self.drained = False
        log.info("worker group %r serving %s on %s", group.name, group.models, self.address_)

    def address(self) -> str:
        return self.address_

    def check_health(self) -> None:
        """Ray Serve replaces a replica whose running call has held it over the stall timeout
        (a hung GPU or collective): answered from the worker's own state, not by a call."""
        stalled = self.worker.stalled_for()
        if stalled > self.stall_timeout_s:
            raise RuntimeError(f"a model call has run for {stalled:.0f} s (stall_timeout_s {self.stall_timeout_s:.0f})")

    def sessions(self) -> int:
        return self.worker.sessions_held()

    def pids(self) -> list[int]:
        """This replica's processes: its own, then its tensor-parallel followers'."""
        return [os.getpid()] + [follower.pid for follower in self.followers]

    def identity(self) -> dict:
        """Which processes serve which address (operators, and tests that stop one)."""
        return {"address": self.address_, "pids": self.pids()}

    def record_autoscaling_stats(self) -> dict[str, float]:
        """What Ray Serve's autoscaler sees of this replica (cluster/autoscaling.py)."""
        return {SESSIONS_METRIC: float(self.worker.sessions_held())}

    def __del__(self):
        """Ray Serve is removing this replica: drain, then stop its followers. Once: Serve
        calls this, and the collector may again; no drain for a constructor that failed."""
        if not getattr(self, "drained", True):
            self.drained = True
            self._drain()
        followers, self.followers = getattr(self, "followers", []), []
        if followers:
            self.worker.stop_followers()

    def _drain(self) -> None:
        """Serve no longer lists this replica, so coordinators stop placing on it within their
        directory's refresh (waited out first: a placement already on its way still lands
        here and is served); the requests running here finish, up to drain_timeout_s.
        Sessions nobody has used for a while are freed as it waits: their coordinator is gone
        (the whole application is stopping, say)."""
        deadline = time.monotonic() + self.drain_timeout_s
        time.sleep(min(DIRECTORY_REFRESH_S * 2, self.drain_timeout_s))
        while self.worker.sessions_held() and time.monotonic() < deadline:
            self.worker.release_idle(self.abandoned_after_s)
            time.sleep(0.2)
        if held := self.worker.sessions_held():
            log.warning("worker replica %s leaves with %d sessions after its %.0f s drain", self.address_, held, self.drain_timeout_s)


def _decide_device(device: str) -> str:
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("decide_device is cuda, but the gateway replica sees no GPU (gateway_num_gpus reserves one on a node that has it)")
    return device


def _replica_device(device: str) -> str:
    return "cuda:0" if device.startswith("cuda") else device  # a replica sees its own GPU as 0


class GatewayReplica:
    async def __init__(self, config: dict, workers: dict):  # Ray Serve awaits an async constructor
        config = ServeConfig.model_validate(config)
        torch.set_num_threads(1)  # the coordinator's tensors are small: extra threads only spin against the workers
        tokenizers = load_tokenizers(config)  # the check `eft serve` made: the same rule
        compositions = {c.name: c.composition() for c in config.compositions}
        metrics = ServingMetrics()
        engine = Engine({g.name: ReplicaPool(tuple(g.models)) for g in config.worker_groups}, composition_vocab_sizes(compositions.values(), tokenizers), metrics=metrics, calls=config.call_policy(), device=_decide_device(config.decide_device))
        self.directory = WorkerDirectory(engine, {g.name: g.models for g in config.worker_groups}, workers, worker_token())
        await self.directory.start()
        contexts = model_contexts(client for clients in self.directory.clients.values() for client in clients.values())
        limits = config.limits
        self.scheduler = Scheduler(engine, limits.max_running, limits.max_waiting)
        gateway_limits = Limits(**limits.model_dump(exclude={"max_running", "max_waiting"}))
        gateway = Gateway(compositions, tokenizers, contexts, self.scheduler, config.default_composition, gateway_limits, metrics)
        self.metrics, self.gateway, self.drain_timeout_s = metrics, gateway, config.drain_timeout_s
        metrics.add_state(scheduler_state(self.scheduler))
        metrics.add_state(worker_state(self.directory.labelled_clients, engine.health.is_ejected))
        tls = (config.tls.cert_file, config.tls.key_file) if config.tls else None
        security = Security.from_files(*(tls or (None, None)), config.auth_token_file)
        connections = Connections(**config.connections.model_dump())
        self.grpc_server, grpc_port = create_gateway_server(gateway, f"{config.host}:{config.grpc_port}", security, connections)
        self.http_server, http_port = start_http_server(create_app(gateway, security, connections), config.host, config.http_port, tls, connections, config.drain_timeout_s)
        self.metrics_server, metrics_port = metrics.serve(config.host, config.metrics_port, {HEALTHZ_PATH: gateway.healthz}, {DRAIN_PATH: self._drain_step})
        scheme = "https" if tls else "http"
        self.drain_lock, self.drained = threading.Lock(), False
        self.endpoints_ = {"grpc": f"{config.host}:{grpc_port}", "http": f"{scheme}://{config.host}:{http_port}", "metrics": f"http://{config.host}:{metrics_port}/metrics"}
        log.info("EFT Serve endpoints %s, workers %s", self.endpoints_, self.directory.addresses())

    def endpoints(self) -> dict[str, str]:
        """The public endpoints: grpc (host:port), http and metrics (URLs)."""
        return self.endpoints_

    def worker_sessions(self) -> dict[str, list[int]]:
        """Sessions held now by each reachable replica of each worker group (tests and checks)."""
        return {group: [info.sessions for client in clients.values() if (info := info_or_none(client, 5.0)) is not None] for group, clients in self.directory.clients.items()}

    def worker_addresses(self) -> dict[str, list[str]]:
        return self.directory.addresses()

    def worker_labels(self) -> dict[str, str]:
        """How the metrics name each known worker replica (``group/index``), by its address."""
        return {address: client.label for clients in self.directory.clients.values() for address, client in clients.items()}

    def pids(self) -> list[int]:
        """This replica's process."""
        return [os.getpid()]

    def requests_by_code(self) -> dict[str, float]:
        """Requests this gateway answered, by final status code (which gateways serve)."""
        return {s.labels["code"]: s.value for family in self.metrics.requests.collect() for s in family.samples if s.name.endswith("_total")}

    def record_autoscaling_stats(self) -> dict[str, float]:
        """What Ray Serve's autoscaler sees of this replica (cluster/autoscaling.py)."""
        return {REQUESTS_METRIC: float(self.gateway.admitted())}

    def __del__(self):
        """Ray Serve is stopping this replica (scaling in, a redeploy, the application's
        deletion): drain, then close what is left. None for a failed constructor."""
        if hasattr(self, "drain_lock"):
            self._drain()
            self.grpc_server.stop(grace=1.0)  # cuts what outlived the drain (a health watch)
            self.metrics_server.shutdown()

    def _drain(self) -> None:
        """Once, however many ask (``eft drain``'s route, then Serve): a later caller waits
        for the drain the first one began."""
        with self.drain_lock:
            if not self.drained:
                finished, left = self.gateway.drain(self.drain_timeout_s, lambda: stop_listening(self.grpc_server, self.http_server, self.drain_timeout_s))
                self.drained = True
                log.info("gateway drained: %d requests finished, %d cut after %.0f s", finished, left, self.drain_timeout_s)

    def _drain_step(self) -> tuple[int, str]:
        """``eft drain`` (a pod's preStop hook) asks this until it answers 200: the first ask
        starts the drain; 202 while requests run."""
        if not self.gateway.draining:
            threading.Thread(target=self._drain, name="eft-drain", daemon=True).start()
        return (200, "drained") if self.drained else (202, f"draining: {self.gateway.admitted()} requests running")

    def check_health(self) -> None:
        """Ray Serve restarts this replica when its scheduler loop died; workers out of
        placement are not its fault (health reports them per composition)."""
        if not self.scheduler.thread.is_alive():
            raise RuntimeError("the scheduler loop has stopped")
