"""The Helm chart: strict lint, renders with default and multi-GPU values, core resources
valid for Kubernetes (kubernetes-validate, strict), the RayService shaped as the KubeRay
operator needs it, and its serve config accepted by our own config model."""

import json
from pathlib import Path

import helm_python
import kubernetes_validate
import pytest
import yaml

from cluster.config import ServeConfig

CHART = Path(__file__).parents[2] / "helm" / "eft-serve"
MULTI_GPU = yaml.safe_load((CHART / "examples" / "multi-gpu.yaml").read_text())
KUBERNETES = "1.32.0"


def render(values: dict) -> list[dict]:
    files = helm_python.Chart.load(str(CHART)).render(values, name="eft", namespace="serving")
    return [doc for name, text in files.items() if name.endswith(".yaml") for doc in yaml.safe_load_all(text) if doc]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def serve_config(rayservice: dict) -> tuple[dict, ServeConfig]:
    serve = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    (app,) = serve["applications"]
    return serve, ServeConfig.model_validate(app["args"])


def test_lint_is_clean_in_strict_mode():
    for values in ({}, MULTI_GPU):
        result = helm_python.lint(str(CHART), values, strict=True)
        assert result["errors"] == [] and all(m["severity"] <= 1 for m in result["messages"]), result  # info only ("icon is recommended")


@pytest.mark.parametrize("values", [{}, MULTI_GPU], ids=["default", "multi-gpu"])
def test_core_resources_pass_strict_kubernetes_validation(values):
    docs = render(values)
    core = [d for d in docs if d["apiVersion"] in ("v1", "networking.k8s.io/v1")]
    assert {d["kind"] for d in core} >= {"Service", "ConfigMap"} if values == {} else {"Service"}
    for doc in core:
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)
    (rayservice,) = by_kind(docs, "RayService")
    cluster = rayservice["spec"]["rayClusterConfig"]
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for template in templates:  # the CRD embeds core PodTemplateSpecs: validate them as Pods
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x", **template.get("metadata", {})}, "spec": template["spec"]}, KUBERNETES, strict=True)


def test_invalid_resources_are_caught_by_the_validator():  # the check above can fail
    (service,) = [d for d in render({}) if d["kind"] == "Service" and d["metadata"]["name"].endswith("-grpc")]
    service["spec"]["ports"][0]["port"] = "not-a-port"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(service, KUBERNETES, strict=True)


def test_the_rayservice_has_what_kuberay_requires():
    (rayservice,) = by_kind(render({}), "RayService")
    assert rayservice["apiVersion"] == "ray.io/v1" and isinstance(rayservice["spec"]["serveConfigV2"], str)
    cluster = rayservice["spec"]["rayClusterConfig"]
    head, workers = cluster["headGroupSpec"], cluster["workerGroupSpecs"]
    assert head["rayStartParams"]["resources"] == '"{\\"eft-gateway\\": 1}"' and head["template"]["spec"]["containers"][0]["image"]
    assert [w["groupName"] for w in workers] == ["workers"] and all(w["replicas"] >= w["minReplicas"] for w in workers)
    container = head["template"]["spec"]["containers"][0]
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["grpc"] == {"port": 50051, "service": "eft.v1.EFTService"}
    assert not any("nvidia.com/gpu" in str(w["template"]) for w in workers)  # a CPU deployment by default
    assert cluster["authOptions"] == {"mode": "token"}  # Ray's own token auth stays on


def test_a_bad_ray_auth_mode_fails_to_render():
    with pytest.raises(helm_python.HelmError, match="rayAuth.mode must be token or disabled, got off"):
        render({"rayAuth": {"mode": "off"}})


def test_multi_gpu_values_ask_for_gpus_and_tensor_parallelism():
    (rayservice,) = by_kind(render(MULTI_GPU), "RayService")
    workers = rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    gpus = {w["groupName"]: w["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] for w in workers}
    assert gpus == {"tp4": "4", "single-gpu": "1"} and [w["rayStartParams"]["num-gpus"] for w in workers] == ["4", "1"]
    _, config = serve_config(rayservice)
    base = next(g for g in config.worker_groups if g.name == "base")
    assert (base.tp, base.num_gpus) == (4, 4) and config.tls.cert_file == "/etc/eft/tls/tls.crt" and config.auth_token_file == "/etc/eft/auth/token"
    volumes = {v["name"] for v in rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["volumes"]}
    assert {"tls", "auth", "models"} <= volumes


@pytest.mark.parametrize("values", [{}, MULTI_GPU], ids=["default", "multi-gpu"])
def test_the_serve_config_validates_with_our_config_model(values):
    (rayservice,) = by_kind(render(values), "RayService")
    serve, config = serve_config(rayservice)
    assert serve["proxy_location"] == "Disabled" and serve["applications"][0]["import_path"] == "cluster.app:app_builder"
    assert config.host == "0.0.0.0" and config.gateway_resources == {"eft-gateway": 1.0}
    assert (config.grpc_port, config.http_port, config.metrics_port) == (50051, 8000, 9464)


def test_a_typo_in_the_serve_values_is_refused_by_the_config_model():
    values = {"serve": {**yaml.safe_load((CHART / "values.yaml").read_text())["serve"], "default_compositon": "upscaled"}}
    (rayservice,) = by_kind(render(values), "RayService")
    with pytest.raises(ValueError, match="default_compositon"):
        serve_config(rayservice)


def test_services_select_the_head_and_the_ray_dashboard_stays_private():
    docs = render({})
    services = {d["metadata"]["name"]: d for d in by_kind(docs, "Service")}
    assert set(services) == {"eft-eft-serve-grpc", "eft-eft-serve-http", "eft-eft-serve-metrics"}
    for service in services.values():
        assert service["spec"]["selector"]["eft-serve/role"] == "head"
        assert all(p["port"] not in (8265, 6379, 10001, 52365) for p in service["spec"]["ports"])
    assert services["eft-eft-serve-grpc"]["spec"]["ports"][0]["appProtocol"] == "grpc"
    exposed = render({"rayDashboard": {"expose": True}})
    assert any(p["port"] == 8265 for d in by_kind(exposed, "Service") for p in d["spec"]["ports"])


def test_servicemonitor_and_dashboard():
    assert not by_kind(render({}), "ServiceMonitor")
    (monitor,) = by_kind(render(MULTI_GPU), "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics" and monitor["metadata"]["labels"]["release"] == "prometheus"
    (dashboard,) = by_kind(render({}), "ConfigMap")
    panels = json.loads(dashboard["data"]["eft-serve.json"])["panels"]
    exprs = " ".join(t["expr"] for p in panels for t in p["targets"])
    assert {"Time to first token", "Inter-token latency", "Draft acceptance rate", "Throughput (tokens/s)", "Queue"} <= {p["title"] for p in panels}
    assert "eft_spec_decode_num_accepted_tokens_total" in exprs and "eft_num_requests_waiting" in exprs


def test_tls_without_a_secret_fails_to_render():
    with pytest.raises(helm_python.HelmError, match="tls.enabled needs tls.secretName"):
        render({"tls": {"enabled": True}})
