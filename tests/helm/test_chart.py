"""The Helm chart: strict lint; core resources valid for Kubernetes (kubernetes-validate,
strict); the RayService valid for KubeRay v1.5.1 and v1.7.0 and the ServiceMonitor for
prometheus-operator, unknown fields being errors (tests/helm/kuberay.py); its serve config
accepted by Ray Serve's ServeDeploySchema and by our own config model; and, one test each,
the rules of KubeRay's operator code the chart must follow to be deployed and marked Ready."""

import json
from pathlib import Path

import helm_python
import kubernetes_validate
import pytest
import yaml

from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema

from cluster.config import ServeConfig
from tests.helm.kuberay import RAYSERVICE_SCHEMAS, SERVICEMONITOR_SCHEMA, errors

CHART = Path(__file__).parents[2] / "helm" / "eft-serve"
MULTI_GPU = yaml.safe_load((CHART / "examples" / "multi-gpu.yaml").read_text())
VALUES = yaml.safe_load((CHART / "values.yaml").read_text())
KUBERNETES = "1.32.0"


VARIANTS = {  # values that take different template paths
    "default": {},
    "multi-gpu": MULTI_GPU,
    "tls-only": {"tls": {"enabled": True, "secretName": "eft-tls"}},
    "autoscaling": {  # KubeRay adds pods for the replicas Serve's autoscaler asks (by sessions) and cannot place
        "enableInTreeAutoscaling": True,
        "serve": {**VALUES["serve"], "worker_groups": [VALUES["serve"]["worker_groups"][0], {**VALUES["serve"]["worker_groups"][1], "autoscaling": {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 64}, "drain_timeout_s": 600}]},
        "rayWorkerGroups": [{**VALUES["rayWorkerGroups"][0], "minReplicas": 1, "maxReplicas": 4}],
        "rayAuth": {"mode": "disabled"},
        "networkPolicy": {"enabled": False},
    },
    "gateways": {
        "serve": {**VALUES["serve"], "gateway_replicas": 3},
        "rayWorkerGroups": [*VALUES["rayWorkerGroups"], {**VALUES["rayWorkerGroups"][0], "name": "gateways", "replicas": 2, "minReplicas": 2, "maxReplicas": 2, "gateway": True, "resources": {"requests": {"cpu": "2", "memory": "4Gi"}, "limits": {"cpu": "2", "memory": "4Gi"}}}],
        "tls": {"enabled": True, "secretName": "eft-tls"},
    },
    "gateway-autoscaling": {  # gateways scaled by their admitted requests, on gateway pods KubeRay adds
        "enableInTreeAutoscaling": True,
        "serve": {**VALUES["serve"], "gateway_autoscaling": {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 64}},
        "rayWorkerGroups": [*VALUES["rayWorkerGroups"], {**VALUES["rayWorkerGroups"][0], "name": "gateways", "replicas": 0, "minReplicas": 0, "maxReplicas": 2, "gateway": True}],
    },
    "numeric-start-params": {"head": {"rayStartParams": {"object-store-memory": 1000000000, "num-gpus": 0}}, "rayWorkerGroups": [{**VALUES["rayWorkerGroups"][0], "rayStartParams": {"object-store-memory": 2000000000}}]},
}


def render(values: dict, name: str = "eft") -> list[dict]:
    files = helm_python.Chart.load(str(CHART)).render(values, name=name, namespace="serving")
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


@pytest.mark.parametrize("version", sorted(RAYSERVICE_SCHEMAS))
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_the_rayservice_validates_against_kuberays_schema_with_unknown_fields_refused(variant, version):
    (rayservice,) = by_kind(render(VARIANTS[variant]), "RayService")
    assert errors(rayservice, RAYSERVICE_SCHEMAS[version]) == []


def test_the_schema_check_refuses_an_unknown_field_and_a_number_where_a_string_belongs():  # the check above can fail
    (rayservice,) = by_kind(render({}), "RayService")
    rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 1
    rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["serviceTyp"] = "ClusterIP"
    found = errors(rayservice, RAYSERVICE_SCHEMAS["v1.7.0"])
    assert any("num-cpus" in e and "string" in e for e in found) and any("serviceTyp" in e for e in found), found


def test_the_servicemonitor_validates_against_its_schema():
    (monitor,) = by_kind(render(MULTI_GPU), "ServiceMonitor")
    assert errors(monitor, SERVICEMONITOR_SCHEMA) == []
    monitor["spec"]["endpoints"][0]["scrapeIntervall"] = "15s"
    assert errors(monitor, SERVICEMONITOR_SCHEMA) != []


def serve_schema_errors(serve: dict) -> list[str]:
    """Ray Serve's own validation, plus the unknown keys its models let pass (extra fields
    are allowed there, so a typo would be ignored, not refused)."""
    ServeDeploySchema.model_validate(serve)
    unknown = [f"{key}" for key in set(serve) - set(ServeDeploySchema.model_fields)]
    return unknown + [f"applications[{i}].{key}" for i, app in enumerate(serve["applications"]) for key in set(app) - set(ServeApplicationSchema.model_fields)]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_the_serve_config_is_one_ray_serve_deploys(variant):
    (rayservice,) = by_kind(render(VARIANTS[variant]), "RayService")
    serve = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    assert serve_schema_errors(serve) == []
    serve["applications"][0]["import_paht"] = serve["applications"][0]["import_path"]
    assert serve_schema_errors({**serve, "proxy_locaton": "Disabled"}) == ["proxy_locaton", "applications[0].import_paht"]


def head_container(rayservice: dict) -> dict:
    return rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]


def probes(container: dict) -> dict:
    return {k: v for k, v in container.items() if k.endswith("Probe")}


# --- KubeRay's rules, one test each, citing the operator code (v1.7.0 unless said) ----------


def test_rule_1_the_head_turns_ready_before_the_application_exists():
    """rayservice_controller.go reconcileServe: "Skipping the update of Serve applications
    because the Ray head Pod is not ready", so a head probe on an application port never
    passes. With no probes of ours, KubeRay's initLivenessAndReadinessProbe (common/pod.go)
    gives the head Ray's own raylet and GCS health checks (it fills only nil probes)."""
    for values in (VARIANTS["default"], MULTI_GPU):
        (rayservice,) = by_kind(render(values), "RayService")
        assert probes(head_container(rayservice)) == {}


def test_rule_2_the_head_names_a_serve_port():
    """common/service.go BuildServeService: "Please specify a port named 'serve' (or with the
    prefix 'serve-')" on every reconcile otherwise; the serve Service carries those ports."""
    (rayservice,) = by_kind(render({}), "RayService")
    ports = {p["name"]: p["containerPort"] for p in head_container(rayservice)["ports"]}
    assert (ports["serve"], ports["serve-grpc"]) == (8000, 50051)


def test_rule_3_kuberay_marks_pods_serving_by_the_gateways_healthz():
    """The head's ray.io/serve label is KubeRay's GET http://<pod>:<serve>/-/healthz answering
    200 (rayservice_controller.go updateHeadPodServeLabel, utils/httpproxy_httpclient.go),
    which the gateway answers (tests/services/gateway, tests/cluster); RayServiceReady needs
    serve endpoints > 0. Worker pods without a readinessProbe get KubeRay's default, which adds
    `wget localhost:8000/-/healthz | grep success` with failure threshold 1 (common/pod.go):
    they host no gateway, so they carry Ray's node health probe of their own. The chart's
    public Services follow the same label, so traffic waits for a gateway that can serve."""
    docs = render({})
    (rayservice,) = by_kind(docs, "RayService")
    for group in rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        probe = group["template"]["spec"]["containers"][0]["readinessProbe"]
        assert probe["httpGet"] == {"path": "/api/healthz", "port": 52365} and "8000" not in str(probe)
    services = {d["metadata"]["name"].rsplit("-", 1)[1]: d["spec"]["selector"] for d in by_kind(docs, "Service")}
    assert services["grpc"]["ray.io/serve"] == services["http"]["ray.io/serve"] == "true"
    assert "ray.io/serve" not in services["metrics"]  # scrapes continue while it cannot serve


def test_rule_4_with_tls_on_every_check_stays_plaintext():
    """Kubelet gRPC probes speak no TLS, and KubeRay's /-/healthz check is plain HTTP
    (utils/httpproxy_httpclient.go): with TLS on, the port named serve is the scrape port,
    which answers /-/healthz in plaintext, and no probe touches the TLS ports."""
    (rayservice,) = by_kind(render(MULTI_GPU), "RayService")
    container = head_container(rayservice)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["serve"] == 9464 and ports["eft-http"] == 8000 and probes(container) == {}


def test_rule_5_no_liveness_probe_restarts_the_cluster_for_a_gateway_outage():
    """A liveness failure restarts the head container, and with it the GCS and every model.
    Only KubeRay's own liveness (raylet and GCS health, failure threshold 120) stays."""
    for values in (VARIANTS["default"], MULTI_GPU):
        (rayservice,) = by_kind(render(values), "RayService")
        cluster = rayservice["spec"]["rayClusterConfig"]
        containers = [head_container(rayservice)] + [g["template"]["spec"]["containers"][0] for g in cluster["workerGroupSpecs"]]
        assert all("livenessProbe" not in c and "startupProbe" not in c for c in containers)


def test_rule_6_ray_token_auth_only_where_the_operator_and_ray_honour_it():
    """rayClusterConfig.authOptions first appears in KubeRay v1.5.1's CRD (older API servers
    prune it without a word, and the cluster runs without auth); token mode needs Ray >= 2.52."""
    (rayservice,) = by_kind(render({}), "RayService")
    assert rayservice["spec"]["rayClusterConfig"]["authOptions"] == {"mode": "token"}
    with pytest.raises(helm_python.HelmError, match="needs KubeRay 1.5.1 or newer, kuberayVersion is 1.4.2"):
        render({"kuberayVersion": "1.4.2"})
    (older,) = by_kind(render({"kuberayVersion": "1.4.2", "rayAuth": {"mode": "disabled"}}), "RayService")
    assert "authOptions" not in older["spec"]["rayClusterConfig"]
    with pytest.raises(helm_python.HelmError, match="rayVersion 2.51.0: the chart needs Ray 2.53 or newer"):
        render({"rayVersion": "2.51.0"})


def test_rule_7a_names_fit_kuberay_and_kubernetes_limits():
    """utils/constant.go MaxRayServiceNameLength = 53 - 6 = 47 (KubeRay >= 1.4 refuses longer
    RayService names); Service names are DNS labels of 63 at most."""
    docs = render({}, name="a-release-name-that-is-rather-long-for-its-own-good-really")
    (rayservice,) = by_kind(docs, "RayService")
    assert len(rayservice["metadata"]["name"]) <= 47
    assert all(len(d["metadata"]["name"]) <= 63 for d in docs), [d["metadata"]["name"] for d in docs]


def test_rule_7b_ray_start_params_are_strings():
    """The CRD types rayStartParams as map[string]string: a number is refused."""
    (rayservice,) = by_kind(render(VARIANTS["numeric-start-params"]), "RayService")
    cluster = rayservice["spec"]["rayClusterConfig"]
    params = [cluster["headGroupSpec"]["rayStartParams"]] + [g["rayStartParams"] for g in cluster["workerGroupSpecs"]]
    assert params[0]["object-store-memory"] == "1000000000" and params[1]["object-store-memory"] == "2000000000"
    assert all(isinstance(v, str) for p in params for v in p.values())


def test_rule_7c_the_network_policy_is_on_by_default_and_keeps_worker_ports_private():
    """Model workers listen without auth on the pod network: by default only this release's
    pods (and the operator, on Ray's dashboard and agent ports) reach anything but the public ports."""
    (policy,) = by_kind(render({}), "NetworkPolicy")
    rules = policy["spec"]["ingress"]
    open_ports = {p["port"] for rule in rules if "from" not in rule for p in rule["ports"]}
    assert open_ports == {50051, 8000, 9464}
    assert policy["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/instance": "eft", "app.kubernetes.io/name": "eft-serve"}


def test_rule_7d_no_model_worker_fits_on_the_head():
    """The head offers Ray exactly the gateway's CPUs and GPUs, so Ray places worker groups on
    worker pods, never beside the GCS."""
    for values in ({}, MULTI_GPU, {"serve": {**yaml.safe_load((CHART / "values.yaml").read_text())["serve"], "gateway_num_gpus": 1, "decide_device": "cuda"}}):
        (rayservice,) = by_kind(render(values), "RayService")
        _, config = serve_config(rayservice)
        params = rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]
        assert (float(params["num-cpus"]), float(params["num-gpus"])) == (config.gateway_num_cpus, config.gateway_num_gpus)


def test_rule_7e_an_upgrade_keeps_the_replicas_the_autoscaler_chose():
    """With enableInTreeAutoscaling the autoscaler owns workerGroupSpecs[].replicas; the chart
    reads them back from the live RayService (Helm's lookup, empty under `helm template`: then
    the values' count). Without a live API server only the fallback can be rendered here."""
    (rayservice,) = by_kind(render(VARIANTS["autoscaling"]), "RayService")
    assert [g["replicas"] for g in rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]] == [1]
    template = (CHART / "templates" / "rayservice.yaml").read_text()
    assert 'lookup "ray.io/v1" "RayService"' in template and "get $chosen .name" in template


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


@pytest.mark.parametrize("values", [{}, MULTI_GPU, VARIANTS["autoscaling"]], ids=["default", "multi-gpu", "autoscaling"])
def test_the_serve_config_validates_with_our_config_model(values):
    (rayservice,) = by_kind(render(values), "RayService")
    serve, config = serve_config(rayservice)
    assert serve["proxy_location"] == "Disabled" and serve["applications"][0]["import_path"] == "cluster.app:app_builder"
    assert config.host == "0.0.0.0" and config.gateway_resources == {"eft-gateway": 1.0}
    assert (config.grpc_port, config.http_port, config.metrics_port) == (50051, 8000, 9464)
    head = rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert head["rayStartParams"]["resources"] == '"{\\"eft-gateway\\": 1}"' and head_container(rayservice)["image"]


def test_a_typo_in_the_serve_values_is_refused_by_the_config_model():
    values = {"serve": {**yaml.safe_load((CHART / "values.yaml").read_text())["serve"], "default_compositon": "upscaled"}}
    (rayservice,) = by_kind(render(values), "RayService")
    with pytest.raises(ValueError, match="default_compositon"):
        serve_config(rayservice)


def test_services_select_the_gateways_and_the_ray_dashboard_stays_private():
    docs = render({})
    services = {d["metadata"]["name"]: d for d in by_kind(docs, "Service")}
    assert set(services) == {"eft-eft-serve-grpc", "eft-eft-serve-http", "eft-eft-serve-metrics"}
    for service in services.values():
        assert service["spec"]["selector"]["eft-serve/gateway"] == "true"
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


def test_more_gateways_run_on_gateway_pods_behind_the_same_services():
    """serve.gateway_replicas > 1: each pod of a gateway: true group offers one eft-gateway and
    serves the public ports; its readiness is the gateway's /-/healthz (KubeRay labels worker
    pods ray.io/serve=true, so readiness alone gates their traffic); the Services select every
    gateway pod. More gateways than pods offering eft-gateway refuse to render."""
    docs = render(VARIANTS["gateways"])
    (rayservice,) = by_kind(docs, "RayService")
    _, config = serve_config(rayservice)
    assert config.gateway_replicas == 3
    groups = {g["groupName"]: g for g in rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    gateway, models = groups["gateways"], groups["workers"]
    assert gateway["rayStartParams"]["resources"] == '"{\\"eft-gateway\\": 1}"' and "resources" not in models["rayStartParams"]
    pod = gateway["template"]
    container = pod["spec"]["containers"][0]
    assert pod["metadata"]["labels"]["eft-serve/gateway"] == "true" and "eft-serve/gateway" not in models["template"]["metadata"]["labels"]
    assert container["readinessProbe"]["httpGet"] == {"path": "/-/healthz", "port": 9464}  # TLS on: the plaintext scrape port
    assert {p["name"] for p in container["ports"]} == {"serve", "serve-grpc", "eft-http"} and {m["name"] for m in container["volumeMounts"]} >= {"tls"}
    selectors = [d["spec"]["selector"] for d in by_kind(docs, "Service") if not d["metadata"]["name"].endswith("dashboard")]
    assert all(sel["eft-serve/gateway"] == "true" and "eft-serve/role" not in sel for sel in selectors)
    with pytest.raises(helm_python.HelmError, match="serve.gateway_replicas 2 needs as many pods offering eft-gateway: .* at most 1"):
        render({"serve": {**VALUES["serve"], "gateway_replicas": 2}})


def test_autoscaled_gateways_fit_the_pods_that_can_host_them():
    """serve.gateway_autoscaling replaces gateway_replicas in the Serve config (which refuses
    both); its max_replicas needs as many pods offering eft-gateway as the head and the
    gateway groups' maxReplicas give, where KubeRay's autoscaler adds them."""
    (rayservice,) = by_kind(render(VARIANTS["gateway-autoscaling"]), "RayService")
    _, config = serve_config(rayservice)
    assert config.gateway_replicas is None and config.gateway_autoscaling == {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 64}
    too_many = {**VARIANTS["gateway-autoscaling"], "serve": {**VALUES["serve"], "gateway_autoscaling": {"min_replicas": 1, "max_replicas": 4}}}
    with pytest.raises(helm_python.HelmError, match="serve.gateway_autoscaling.max_replicas 4 needs as many pods offering eft-gateway: .* at most 3"):
        render(too_many)


def test_gateway_pods_drain_before_they_stop():
    """Kubelet runs a container's preStop hook before SIGTERM, which stops Ray (and every
    replica) at once: each pod that hosts a gateway runs `eft drain` against its own scrape
    port first, and its grace period covers the drain's timeout; model-only pods do not."""
    (rayservice,) = by_kind(render({**VARIANTS["gateways"], "serve": {**VARIANTS["gateways"]["serve"], "drain_timeout_s": 120}}), "RayService")
    cluster = rayservice["spec"]["rayClusterConfig"]
    groups = {g["groupName"]: g["template"]["spec"] for g in cluster["workerGroupSpecs"]}
    for pod in (cluster["headGroupSpec"]["template"]["spec"], groups["gateways"]):
        assert pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"] == ["eft", "drain", "--metrics-port", "9464", "--timeout", "120"]
        assert pod["terminationGracePeriodSeconds"] == 150
    assert "lifecycle" not in groups["workers"]["containers"][0] and "terminationGracePeriodSeconds" not in groups["workers"]
    _, config = serve_config(rayservice)
    assert config.drain_timeout_s == 120
