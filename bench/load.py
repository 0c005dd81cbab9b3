"""Sustained load on the real deployment (`make load`): the demo family on a local Ray
cluster, as `make run` serves it, with a scheduler that runs ``--max-running`` requests and
queues ``--max-waiting`` (fewer than the clients, so that the queue limit is exercised).

1. ``--clients`` streaming clients ask greedy questions (two compositions, speculation off,
   fixed and adaptive) for ``--seconds``; every stream is checked token by token against
   the reference loop (cluster/loadtest.py). Reported: requests, tokens checked, wrong
   streams, other failures, refusals (RESOURCE_EXHAUSTED) and how fast they came, p50/p99
   end-to-end latency and time to first token.
2. RSS of every process of the application (gateway, each worker replica) before and after
   ``--rss-requests`` more requests, after the first run warmed everything up.

    python bench/load.py [--clients 32] [--seconds 60] [--rss-requests 500] [--out bench/load-results.json]
"""

import argparse
import json
import os
import sys
from pathlib import Path

import grpc

from cluster.config import ServeConfig, demo_config
from cluster.launcher import start_local
from cluster.loadtest import greedy_cases, rss_bytes, run_load
from services.family.build import build_family
from services.family.evaluate import open_engine


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=32, help="concurrent streaming clients (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=60, help="length of the checked run (default: %(default)s)")
    parser.add_argument("--rss-requests", type=int, default=500, help="requests between the two RSS readings (default: %(default)s)")
    parser.add_argument("--max-running", type=int, default=16, help="the scheduler's running requests (default: %(default)s)")
    parser.add_argument("--max-waiting", type=int, default=8, help="the scheduler's queue (default: %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=24, help="max_tokens of every request (default: %(default)s)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "load-results.json"), help="results file (default: %(default)s)")
    args = parser.parse_args()
    family = build_family()
    print("reference outputs from the research loop ...", flush=True)
    world = family.world()
    questions = [f"what is the {attribute} of {entity} ?" for entity in world.entities[:8] for attribute in ("capital", "color", "animal")]
    cases = greedy_cases(open_engine(family), questions, ["upscaled", "mixed"], args.max_tokens)
    config = demo_config(family.path).model_dump()
    config["limits"] = {"max_running": args.max_running, "max_waiting": args.max_waiting}
    config.update(grpc_port=0, http_port=0, metrics_port=0)
    print("deploying on a local Ray cluster ...", flush=True)
    deployment = start_local(ServeConfig.model_validate(config), num_cpus=os.cpu_count())
    try:
        results = measure(deployment, cases, args)
    finally:
        deployment.stop()
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    print(f"wrote {args.out}")
    ok = results["load"]["wrong"] == 0 and not results["load"]["failed"] and results["rss"]["max_growth"] < 0.10
    return 0 if ok else 1


def measure(deployment, cases, args) -> dict:
    with grpc.insecure_channel(deployment.address) as channel:
        print(f"warm-up, then {args.clients} clients for {args.seconds:.0f} s ...", flush=True)
        run_load(channel, cases, args.clients, duration_s=5)
        load = run_load(channel, cases, args.clients, duration_s=args.seconds).summary()
        print(f"load: {load}", flush=True)
        processes = {f"{name}[{i}]": pid for name, pids in deployment.process_ids().items() for i, pid in enumerate(pids)}
        before = {name: rss_bytes(pid) for name, pid in processes.items()}
        print(f"{args.rss_requests} more requests for the RSS readings ...", flush=True)
        rss_run = run_load(channel, cases, args.clients, requests=args.rss_requests).summary()
        after = {name: rss_bytes(pid) for name, pid in processes.items()}
    rss = {name: {"before_mib": round(before[name] / 2**20, 1), "after_mib": round(after[name] / 2**20, 1), "growth": round(after[name] / before[name] - 1, 4)} for name in processes}
    return {
        "clients": args.clients,
        "max_running": args.max_running,
        "max_waiting": args.max_waiting,
        "cases": len(cases),
        "load": load,
        "rss_run": rss_run,
        "rss": {"processes": rss, "max_growth": max(p["growth"] for p in rss.values())},
    }


if __name__ == "__main__":
    sys.exit(main())
