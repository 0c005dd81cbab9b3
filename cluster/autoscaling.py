"""Autoscaling worker groups by the load this system knows. Ray Serve's own signal, requests
in flight through its handles, sees nothing here (coordinators call workers over gRPC), so
each worker replica reports the sessions it holds (``record_autoscaling_stats``) and this
policy asks for enough replicas to hold them at ``target_ongoing_requests`` sessions each.
Serve applies min/max, its factors and its up/downscale delays around it.

A replica chosen for removal drains (WorkerReplica.__del__): Serve stops listing it, so
within the directory's refresh the coordinators stop placing on it; it leaves once its
sessions are gone, or when ``drain_timeout_s`` passes.
"""

import math

SESSIONS_METRIC = "sessions"
POLICY = "cluster.autoscaling:sessions_policy"


def sessions_policy(ctx) -> tuple[int, dict]:
    """Replicas for the sessions the group's replicas hold now (ray.serve.config.AutoscalingContext)."""
    held = sum((ctx.aggregated_metrics or {}).get(SESSIONS_METRIC, {}).values())
    return math.ceil(held / ctx.config.target_ongoing_requests), ctx.policy_state


def serve_autoscaling_config(autoscaling: dict) -> dict:
    """Ray Serve's autoscaling_config for a worker group's ``autoscaling`` settings (Serve's
    own keys; ``target_ongoing_requests`` read as sessions per replica), with this policy."""
    return {**autoscaling, "policy": {"policy_function": POLICY}}
