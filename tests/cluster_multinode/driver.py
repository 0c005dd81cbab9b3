"""The multinode tests' view of the deployment, from a process of its own: Ray Serve's
handles keep state per process (a router event loop) that a second cluster in the same
process cannot use, and the test process has already run tests/cluster's. It attaches to
the cluster, finds the application `eft serve` deployed, says its public address (one JSON
line), then answers each stdin line, the name of a LocalDeployment method, with its result
as one JSON line. Each line it says starts with ANSWER: Ray prints lines of its own on a
driver's stdout (a lost node's raylet, say), which the test skips.

    python -m tests.cluster_multinode.driver HOST:PORT
"""

import json
import sys

ANSWER = "@driver "


def main() -> None:
    import ray
    from ray import serve

    from cluster.app import APP_NAME
    from cluster.launcher import LocalDeployment

    ray.init(address=sys.argv[1], log_to_driver=False)
    handle = serve.get_deployment_handle("gateway", APP_NAME)
    endpoints = handle.endpoints.remote().result()
    deployment = LocalDeployment(endpoints["grpc"], endpoints["http"], endpoints["metrics"], handle)
    print(ANSWER + json.dumps({"address": deployment.address}), flush=True)
    for line in sys.stdin:
        try:
            print(ANSWER + json.dumps({"result": getattr(deployment, line.strip())()}), flush=True)
        except Exception as error:  # the test sees it, and asks again or fails
            print(ANSWER + json.dumps({"error": repr(error)}), flush=True)


if __name__ == "__main__":
    main()
