"""Starting the application on a local Ray cluster bound to 127.0.0.1, or on a running one."""

import logging
import os
from dataclasses import dataclass

from cluster.config import ServeConfig

RAY_AUTH_LOGGER = "ray._private.authentication"


@dataclass
class LocalDeployment:
    address: str  # the public EFTService, host:port
    http: str  # the OpenAI-compatible API's base URL
    metrics: str  # the Prometheus scrape URL
    handle: object  # the gateway deployment's handle

    def stop(self) -> None:
        """Delete the application, each gateway draining its requests first (up to its
        drain_timeout_s), and disconnect: an attached cluster keeps running (and its Serve,
        for other applications); a local one stops, Serve with it (serve.shutdown first
        would only have the killed controller's pending calls complain)."""
        import ray
        from ray import serve

        from cluster.app import APP_NAME

        # The handle's router pushes an autoscaled deployment's metrics from a thread of its
        # own: left running past ray.shutdown, it connects this process to a cluster again.
        self.handle.shutdown()
        serve.delete(APP_NAME)  # waits for the replicas' drains (serve.shutdown would kill them after 30 s)
        ray.shutdown()

    def worker_sessions(self) -> dict[str, list[int]]:
        """Sessions each replica of each worker group holds now (for tests and checks)."""
        return self.handle.worker_sessions.remote().result()

    def worker_addresses(self) -> dict[str, list[str]]:
        """The replicas the coordinator knows, per worker group."""
        return self.handle.worker_addresses.remote().result()

    def worker_labels(self) -> dict[str, str]:
        """The metrics' name of each worker replica the coordinator knows, by address."""
        return self.handle.worker_labels.remote().result()

    def gateway_requests(self) -> list[dict[str, float]]:
        """Each gateway replica's answered requests by final status code."""
        return self.handle.broadcast("requests_by_code").results()

    def running_replicas(self) -> dict[str, int]:
        """Replicas running (not starting, not stopping) per deployment (gateway, worker-<group>)."""
        from ray import serve

        from cluster.app import APP_NAME

        deployments = serve.status().applications[APP_NAME].deployments
        return {name: status.replica_states.get("RUNNING", 0) for name, status in deployments.items()}

    def process_ids(self) -> dict[str, list[int]]:
        """Every process of the application by deployment (gateway, worker-<group>): each
        replica's, tensor-parallel followers included."""
        from ray import serve

        from cluster.app import APP_NAME

        deployments = serve.status().applications[APP_NAME].deployments
        return {name: [pid for pids in serve.get_deployment_handle(name, APP_NAME).broadcast("pids").results() for pid in pids] for name in deployments}


def start_local(config: ServeConfig, num_cpus: int | None = None, address: str | None = None) -> LocalDeployment:
    """Start Ray (loopback only, no dashboard), or attach to a running cluster at
    ``address`` ("auto": the one this machine runs; or its GCS as HOST:PORT), and Serve;
    deploy, and wait until ready. Ray Serve's own HTTP proxy stays off: the gateway serves
    gRPC, HTTP and metrics itself."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keeps Ray on 127.0.0.1 (ENVIRONMENT.md)
    import ray
    from ray import serve

    from cluster.app import APP_NAME, build_app

    if address is not None and num_cpus is not None:
        raise ValueError("num_cpus sizes a new local cluster; an attached cluster has its own resources")
    if not ray.is_initialized():
        logging.getLogger(RAY_AUTH_LOGGER).setLevel(logging.ERROR)  # its warning that token auth is on: `eft serve` says so itself (ray_auth_line)
        if address is None:
            ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
        else:
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)  # Ray refuses num_cpus and the like when connecting
    # Serve's INFO lines here are false or ours to say: "ready at http://127.0.0.1:8000/" (its
    # proxy is off; the gateway's ports are in the banner), "new http_options will not be
    # applied" (serve.run restarting the Serve serve.start began), its router's start.
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    serve.start(proxy_location="Disabled")
    handle = serve.run(build_app(config), name=APP_NAME, blocking=False)
    endpoints = handle.endpoints.remote().result()
    return LocalDeployment(endpoints["grpc"], endpoints["http"], endpoints["metrics"], handle)


def ray_auth_line() -> str:
    """What Ray's token authentication is, once ray.init has chosen (it turns it on for a new
    local cluster unless RAY_AUTH_MODE says otherwise)."""
    if os.environ.get("RAY_AUTH_MODE", "disabled") == "token":
        return "token authentication on (its token: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token; RAY_AUTH_MODE=disabled turns it off)"
    return "token authentication off (RAY_AUTH_MODE=token turns it on)"
