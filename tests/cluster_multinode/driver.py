"""The multinode tests' Ray driver, in a process of its own: Ray Serve's handles keep state
per process (a router event loop) that a second cluster in the same process cannot use, and
the test process has already run tests/cluster's. It deploys the config it is given on the
cluster at the address, says the public address (one JSON line), then answers each stdin
line, the name of a LocalDeployment method, with its result as one JSON line.

    python -m tests.cluster_multinode.driver HEAD_IP:PORT HEAD_IP serve.yaml
"""

import json
import sys


def main() -> None:
    address, node_ip, config_path = sys.argv[1:4]
    import ray

    ray.init(address=address, _node_ip_address=node_ip, log_to_driver=False)  # a driver on the head's node
    from cluster.config import load_config
    from cluster.launcher import start_local

    deployment = start_local(load_config(config_path), address=address)
    print(json.dumps({"address": deployment.address}), flush=True)
    for line in sys.stdin:
        try:
            print(json.dumps({"result": getattr(deployment, line.strip())()}), flush=True)
        except Exception as error:  # the test sees it, and asks again or fails
            print(json.dumps({"error": repr(error)}), flush=True)


if __name__ == "__main__":
    main()
