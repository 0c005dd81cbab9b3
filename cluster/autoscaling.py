"""Autoscaling by the load this system knows. Ray Serve's own signal, requests in flight
through its handles, sees nothing here (clients reach gateways, and gateways reach workers,
over gRPC and HTTP), so each replica reports its own load (``record_autoscaling_stats``) and
this policy asks for enough replicas to carry it at ``target_ongoing_requests`` each:

- a worker replica reports the sessions it holds (SESSIONS_METRIC);
- a gateway/coordinator replica the requests it has admitted, running and queued
  (REQUESTS_METRIC).

Serve applies min/max, its factors and its up/downscale delays around it. A replica chosen
for removal drains: a worker (WorkerReplica.__del__) takes no new placements once Serve stops
listing it and leaves when its sessions are gone; a gateway (GatewayReplica.__del__) closes
its ports to new connections and leaves when its requests have ended; either at the latest
after its ``drain_timeout_s``.
"""

import math

SESSIONS_METRIC, REQUESTS_METRIC = "sessions", "requests"
POLICY = "cluster.autoscaling:LoadPolicy"


class LoadPolicy:
    """Replicas for the load a deployment's replicas report now, by ``metric`` (Serve makes
    one per deployment with the policy's kwargs and calls it with an AutoscalingContext)."""

    def __init__(self, metric: str):
        self.metric = metric

    def __call__(self, ctx) -> tuple[int, dict]:
        load = sum((ctx.aggregated_metrics or {}).get(self.metric, {}).values())
        return math.ceil(load / ctx.config.target_ongoing_requests), ctx.policy_state


def serve_autoscaling_config(autoscaling: dict, metric: str) -> dict:
    """Ray Serve's autoscaling_config for ``autoscaling`` settings (Serve's own keys;
    ``target_ongoing_requests`` read in units of ``metric`` per replica), with this policy."""
    return {**autoscaling, "policy": {"policy_function": POLICY, "policy_kwargs": {"metric": metric}}}


def check_autoscaling(autoscaling: dict | None, unit: str) -> dict | None:
    """Settings Ray Serve accepts (its own bounds and delays), without a policy of their own:
    a ValueError naming what is wrong. ``unit``: what target_ongoing_requests counts."""
    if autoscaling is None:
        return None
    from ray.serve.config import AutoscalingConfig

    if "policy" in autoscaling:
        raise ValueError(f"policy: the autoscaling policy is set here, by the {unit} replicas report (cluster/autoscaling.py)")
    unknown = sorted(set(autoscaling) - set(AutoscalingConfig.model_fields))
    if unknown:
        raise ValueError(f"unknown Ray Serve autoscaling_config keys {unknown}")
    AutoscalingConfig.model_validate(autoscaling)
    return autoscaling
