"""The Ray Serve application, built from a validated config:

    client --gRPC--> GatewayReplica (gateway + coordinator) --gRPC--> WorkerReplica "base"
                                                             \\-gRPC--> WorkerReplica "pair"

``build_app`` serves from Python; ``app_builder`` from a Serve YAML file
(``import_path: cluster.app:app_builder``, ``args``: the config).
"""

from ray import serve
from ray.serve import Application

from cluster.autoscaling import REQUESTS_METRIC, SESSIONS_METRIC, serve_autoscaling_config
from cluster.config import ServeConfig
from cluster.replicas import GatewayReplica, WorkerReplica

APP_NAME = "eft"
# Ray Serve replaces a replica after 3 failed checks in a row: a frozen worker process (it
# cannot answer at all) goes within about 3 x (5 + 10) s, a hung call within a check of its
# stall_timeout_s. The coordinator ejects either from placement at its first missed deadline.
WORKER_HEALTH_CHECK_PERIOD_S, WORKER_HEALTH_CHECK_TIMEOUT_S = 5.0, 10.0
# The coordinator's per-iteration temporaries at real vocabularies are hundreds of MB
# ([64, 5, 151936] float32 is 195 MB): glibc maps each afresh and the kernel faults it in
# 4 KiB page by page (47k faults per 195 MB). PyTorch's THP_MEM_ALLOC_ENABLE aligns large
# CPU blocks to 2 MiB and asks for transparent huge pages: about 470 faults.
COORDINATOR_ENV = {"THP_MEM_ALLOC_ENABLE": "1"}
DRAIN_MARGIN_S = 15.0  # Serve kills a stopping replica this long after its drain deadline at the latest


def build_app(config: ServeConfig | dict) -> Application:
    config = ServeConfig.model_validate(config) if isinstance(config, dict) else config
    workers = {}
    for group in config.worker_groups:
        deployment = serve.deployment(
            WorkerReplica,
            name=f"worker-{group.name}",
            **_scaling(group.replicas, group.autoscaling, SESSIONS_METRIC),
            ray_actor_options={"num_cpus": group.num_cpus, "num_gpus": group.num_gpus, "resources": dict(group.resources)},
            health_check_period_s=WORKER_HEALTH_CHECK_PERIOD_S,
            health_check_timeout_s=WORKER_HEALTH_CHECK_TIMEOUT_S,
            graceful_shutdown_timeout_s=group.drain_timeout_s + DRAIN_MARGIN_S,  # the drain's own deadline comes first
        )
        workers[group.name] = deployment.bind(group.model_dump(), {m: config.models[m].model_dump() for m in group.models})
    gateway_options = {"num_cpus": config.gateway_num_cpus, "num_gpus": config.gateway_num_gpus, "resources": dict(config.gateway_resources), "runtime_env": {"env_vars": COORDINATOR_ENV}}
    scaling = _scaling(config.gateway_replicas, config.gateway_autoscaling, REQUESTS_METRIC)
    gateway = serve.deployment(GatewayReplica, name="gateway", **scaling, ray_actor_options=gateway_options, graceful_shutdown_timeout_s=config.drain_timeout_s + DRAIN_MARGIN_S)
    return gateway.bind(config.model_dump(), workers)


def _scaling(replicas: int | None, autoscaling: dict | None, metric: str) -> dict:
    """A deployment's replica count, or its autoscaling by the load its replicas report."""
    return {"autoscaling_config": serve_autoscaling_config(autoscaling, metric)} if autoscaling else {"num_replicas": replicas or 1}


def app_builder(args: dict) -> Application:
    return build_app(ServeConfig.model_validate(args))
