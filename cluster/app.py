"""The Ray Serve application, built from a validated config:

    client --gRPC--> GatewayReplica (gateway + coordinator) --gRPC--> WorkerReplica "base"
                                                             \\-gRPC--> WorkerReplica "pair"

``build_app`` serves from Python; ``app_builder`` from a Serve YAML file
(``import_path: cluster.app:app_builder``, ``args``: the config).
"""

from ray import serve
from ray.serve import Application

from cluster.config import ServeConfig
from cluster.replicas import GatewayReplica, WorkerReplica

APP_NAME = "eft"


def build_app(config: ServeConfig | dict) -> Application:
    config = ServeConfig.model_validate(config) if isinstance(config, dict) else config
    workers = {}
    for group in config.worker_groups:
        deployment = serve.deployment(
            WorkerReplica,
            name=f"worker-{group.name}",
            num_replicas=group.replicas,
            ray_actor_options={"num_cpus": group.num_cpus, "num_gpus": group.num_gpus},
        )
        workers[group.name] = deployment.bind(group.model_dump(), {m: config.models[m].model_dump() for m in group.models})
    gateway_options = {"num_cpus": config.gateway_num_cpus, "resources": dict(config.gateway_resources)}
    gateway = serve.deployment(GatewayReplica, name="gateway", num_replicas=1, ray_actor_options=gateway_options)
    return gateway.bind(config.model_dump(), workers)


def app_builder(args: dict) -> Application:
    return build_app(ServeConfig.model_validate(args))
