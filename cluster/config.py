"""The serving configuration: validated pydantic models (unknown keys are errors), loadable
from YAML. Cross-field rules live in model validators; ``load_tokenizers`` loads every
model's tokenizer (not the weights), refuses a composition whose models' tokenizers differ
naming both models, and a chat template that does not render; the gateway replica runs the
same check when it starts."""

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cluster.autoscaling import REQUESTS_METRIC, SESSIONS_METRIC, check_autoscaling
from eft_core import Composition, Delta, EFTError
from services.coordinator.health import CallPolicy
from services.family.compositions import family_compositions
from services.family.recipe import default_family_dir
from services.gateway.connections import Connections
from services.gateway.gateway import Limits
from services.worker.api import WorkerLimits


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Strict):
    path: str = Field(description="local folder or Hugging Face hub id, loaded with from_pretrained")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="weights' dtype")
    device: str = Field("cpu", description="cpu, or cuda (the replica's GPU)")
    chat_template: str | None = Field(
        None,
        description="Jinja chat template for this model's prompts (default: the one its tokenizer folder holds; a model with none sees a chat as its messages' contents joined by a blank line)",
    )

    @field_validator("chat_template")
    @classmethod
    def _compiles(cls, template: str | None) -> str | None:
        """Compiled as ``apply_chat_template`` compiles it (its extensions: ``{% generation %}``, loop controls)."""
        if template is not None:
            from jinja2 import TemplateSyntaxError
            from transformers.utils.chat_template_utils import _compile_jinja_template

            try:
                _compile_jinja_template(template)
            except TemplateSyntaxError as error:
                raise ValueError(f"not a valid Jinja template: {error.message} (line {error.lineno})") from None
        return template


class WorkerGroupConfig(_Strict):
    name: str = Field(description="deployment name of this worker group")
    models: list[str] = Field(min_length=1, description="models this worker hosts (a base alone, or a tuned/reference pair)")
    replicas: int | None = Field(None, ge=1, description="replicas of this group (1 unless autoscaling); each request stays on one replica, placed on the least loaded")
    num_cpus: float = Field(0.25, ge=0, description="CPUs reserved per replica")
    num_gpus: float = Field(0, ge=0, description="GPUs per replica (0 on a CPU machine; tp for a tensor-parallel group)")
    resources: dict[str, float] = Field(default_factory=dict, description="custom Ray resources per replica: pins the group to the nodes (pods) that offer them, e.g. {\"a100\": 1}")
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads per replica (default: Ray's OMP_NUM_THREADS, from num_cpus); more threads than cores slow every worker on the node")
    tp: int = Field(1, ge=1, description="tensor-parallel ranks (DeepSpeed AutoTP, one process each) for a group of one model")
    max_sessions: int = Field(WorkerLimits.max_sessions, ge=1, description="(session, model) caches held at once")
    max_cached_tokens: int = Field(WorkerLimits.max_cached_tokens, ge=1, description="token slots over all models' caches, each model's being its sessions x its longest session")
    max_forward_tokens: int = Field(WorkerLimits.max_forward_tokens, ge=1, description="positions one forward computes (rows x widest new tokens, padding included); a longer prefill is fed in chunks, bounding a call's activation memory")
    session_idle_timeout_s: float = Field(120.0, gt=0, description="free sessions no call has used this long (a coordinator that restarted never releases its requests' caches); running requests use theirs every step")
    stall_timeout_s: float = Field(60.0, gt=0, description="a replica whose running call has held it this long fails Ray Serve's health check, which replaces it (a hung GPU or collective)")
    autoscaling: dict[str, Any] | None = Field(None, description="Ray Serve autoscaling_config (min_replicas, max_replicas, upscale_delay_s, downscale_delay_s, ...), driven by the sessions the replicas hold: target_ongoing_requests is sessions per replica; replaces replicas")
    drain_timeout_s: float = Field(300.0, gt=0, description="a replica being removed (downscaling, a redeploy) takes no new requests and leaves once its sessions are gone, or after this long")

    @field_validator("autoscaling")
    @classmethod
    def _serve_accepts(cls, autoscaling: dict[str, Any] | None) -> dict[str, Any] | None:
        return check_autoscaling(autoscaling, SESSIONS_METRIC)

    @model_validator(mode="after")
    def _replicas_or_autoscaling(self) -> "WorkerGroupConfig":
        if self.autoscaling is not None and self.replicas is not None:
            raise ValueError("replicas: set either replicas or autoscaling (its min_replicas and max_replicas)")
        return self

    def limits(self) -> WorkerLimits:
        return WorkerLimits(self.max_sessions, self.max_cached_tokens, self.max_forward_tokens)


class DeltaConfig(_Strict):
    name: str = Field(description="the name per-request weights use")
    tuned: str = Field(description="the tuned model")
    reference: str = Field(description="the model it was tuned from")
    weight: float = Field(1.0, description="default weight")


class CompositionConfig(_Strict):
    name: str = Field(description="the name requests use")
    base: str = Field(description="the base model")
    deltas: list[DeltaConfig] = Field(default_factory=list, description="behaviour deltas")
    drafter: str | None = Field(None, description="speculative drafter (default: the first delta's tuned model)")

    def composition(self) -> Composition:
        deltas = tuple(Delta(d.name, d.tuned, d.reference, d.weight) for d in self.deltas)
        return Composition(self.name, self.base, deltas, self.drafter)


class LimitsConfig(_Strict):
    max_prompt_tokens: int = Field(2048, ge=1, description="longest rendered prompt")
    max_tokens: int = Field(512, ge=1, description="largest max_tokens a request may ask")
    default_max_tokens: int = Field(64, ge=1, description="max_tokens when a request sets none")
    max_stop_strings: int = Field(8, ge=0, description="stop strings per request")
    max_weight_magnitude: float = Field(10.0, gt=0, description="largest |weight| per delta")
    default_draft_k: int = Field(4, ge=0, description="drafts per step when a request does not say (0: off)")
    max_running: int = Field(32, ge=1, description="requests decoded together")
    max_waiting: int = Field(256, ge=0, description="requests queued beyond that (then RESOURCE_EXHAUSTED)")
    max_request_bytes: int = Field(4 << 20, ge=1024, description="largest request: a gRPC message (else RESOURCE_EXHAUSTED) or HTTP body (else 413)")
    max_messages: int = Field(Limits.max_messages, ge=1, description="messages in one chat, checked before any rendering (OpenAI's own limit)")
    max_choices: int = Field(Limits.max_choices, ge=1, description="choices one HTTP request may ask (prompts x n); each is a request of its own in the scheduler")
    max_top_logprobs: int = Field(Limits.max_top_logprobs, ge=0, description="most probable tokens returned per position (top_logprobs; completions' logprobs N)")
    request_timeout_s: float | None = Field(Limits.request_timeout_s, gt=0, description="deadline of a request that sets none (gRPC deadline, HTTP body field timeout); none by default")


class ConnectionsConfig(_Strict):
    """What one client connection may do (services/gateway/connections.py)."""

    header_timeout_s: float = Field(Connections.header_timeout_s, gt=0, description="an HTTP request's headers must arrive within this of its first byte (or the connection's start), else the connection closes")
    body_timeout_s: float = Field(Connections.body_timeout_s, gt=0, description="an HTTP request's body must arrive within this of its headers, else 408")
    keep_alive_s: float = Field(Connections.keep_alive_s, gt=0, description="an idle HTTP keep-alive connection closes after this")
    max_connections: int = Field(Connections.max_connections, ge=1, description="open HTTP connections per gateway replica; requests beyond get 503")
    grpc_keepalive_s: float = Field(Connections.grpc_keepalive_s, gt=0, description="the server pings a gRPC connection idle this long")
    grpc_keepalive_timeout_s: float = Field(Connections.grpc_keepalive_timeout_s, gt=0, description="and drops it when the ping goes unanswered this long")
    grpc_max_connection_idle_s: float = Field(Connections.grpc_max_connection_idle_s, gt=0, description="a gRPC connection without calls this long is closed (GOAWAY)")
    grpc_max_connection_age_s: float = Field(Connections.grpc_max_connection_age_s, gt=0, description="a gRPC connection lives this long, then clients reconnect (spreading over gateway replicas)")
    grpc_max_connection_age_grace_s: float = Field(Connections.grpc_max_connection_age_grace_s, gt=0, description="the calls running on an aged connection get this long to finish")


class TLSConfig(_Strict):
    cert_file: str = Field(description="PEM certificate chain of the public gRPC and HTTP ports")
    key_file: str = Field(description="PEM private key")


class ServeConfig(_Strict):
    models: dict[str, ModelConfig] = Field(description="every model, by name")
    worker_groups: list[WorkerGroupConfig] = Field(description="which models share a worker")
    compositions: list[CompositionConfig] = Field(min_length=1, description="what clients can ask for")
    default_composition: str = Field(description="used when a request names none")
    limits: LimitsConfig = Field(default_factory=LimitsConfig, description="per-request limits")
    connections: ConnectionsConfig = Field(default_factory=ConnectionsConfig, description="timeouts and caps of client connections")
    grpc_port: int = Field(50051, ge=0, le=65535, description="public gRPC port (EFTService, grpc.health.v1, reflection)")
    http_port: int = Field(8000, ge=0, le=65535, description="public HTTP port (OpenAI-compatible API, /health, /metrics)")
    metrics_port: int = Field(9464, ge=0, le=65535, description="Prometheus scrape port (/metrics)")
    host: str = Field("127.0.0.1", description="address the public ports bind (0.0.0.0 in a pod)")
    tls: TLSConfig | None = Field(None, description="TLS on the public gRPC and HTTP ports (the metrics port stays plaintext)")
    auth_token_file: str | None = Field(None, description="file holding the bearer token every public gRPC/HTTP call must carry (health and metrics excepted)")
    worker_call_timeout_s: float = Field(
        CallPolicy.timeout_s, gt=0, description="deadline of a coordinator-to-worker call (plus the prefill allowance); a replica that misses it fails its requests with UNAVAILABLE and leaves placement until it answers probes"
    )
    worker_prefill_tokens_per_s: float = Field(CallPolicy.prefill_tokens_per_s, gt=0, description="the slowest prefill a healthy worker keeps up: a call sending N tokens gets worker_call_timeout_s + N / this")
    gateway_replicas: int | None = Field(None, ge=1, description="gateway/coordinator replicas serving the public API (1 unless gateway_autoscaling); each places its requests by the workers' own reported load. Replicas on one node share the public ports (SO_REUSEPORT: the kernel spreads connections); on Kubernetes each gateway pod serves them behind the chart's Services")
    gateway_autoscaling: dict[str, Any] | None = Field(
        None, description="Ray Serve autoscaling_config of the gateway/coordinator replicas (min_replicas, max_replicas, delays, ...), driven by the requests each has admitted: target_ongoing_requests is requests (running and queued) per replica; replaces gateway_replicas"
    )
    drain_timeout_s: float = Field(300.0, gt=0, description="a gateway replica being stopped (SIGTERM through `eft drain`, a redeploy, scaling in) turns health NOT_SERVING, closes its public ports to new connections (open ones are sent elsewhere: GOAWAY, Connection: close) and lets the admitted requests finish, up to this long")
    gateway_num_cpus: float = Field(0.25, ge=0, description="CPUs reserved for each gateway/coordinator replica")
    gateway_num_gpus: float = Field(0, ge=0, description="GPUs reserved for the gateway/coordinator replica (for decide_device cuda)")
    decide_device: Literal["cpu", "cuda"] = Field("cpu", description="where the coordinator combines, filters, samples and accepts: cuda moves each iteration's logits to the gateway replica's GPU (needs gateway_num_gpus > 0)")
    gateway_resources: dict[str, float] = Field(default_factory=dict, description="custom Ray resources the gateway replica needs (the Helm chart pins it to the head pod, whose Services expose the public ports)")

    @field_validator("gateway_autoscaling")
    @classmethod
    def _gateway_serve_accepts(cls, autoscaling: dict[str, Any] | None) -> dict[str, Any] | None:
        return check_autoscaling(autoscaling, REQUESTS_METRIC)

    def call_policy(self) -> CallPolicy:
        return CallPolicy(self.worker_call_timeout_s, self.worker_prefill_tokens_per_s)

    @model_validator(mode="after")
    def _cross_checks(self) -> "ServeConfig":
        names = [g.name for g in self.worker_groups]
        _unique(names, "worker_groups", "name")
        for i, group in enumerate(self.worker_groups):
            if group.tp > 1 and len(group.models) != 1:
                raise ValueError(f"worker_groups[{i}].tp: a tensor-parallel group hosts exactly one model, {group.name!r} has {len(group.models)}")
        placed = [m for g in self.worker_groups for m in g.models]
        for i, group in enumerate(self.worker_groups):
            for model in group.models:
                if model not in self.models:
                    raise ValueError(f"worker_groups[{i}].models: unknown model {model!r} (models: {sorted(self.models)})")
        for model in self.models:
            if placed.count(model) != 1:
                raise ValueError(f"models.{model}: must be in exactly one worker group, is in {placed.count(model)}")
        _unique([c.name for c in self.compositions], "compositions", "name")
        for i, composition in enumerate(self.compositions):
            for field, model in [("base", composition.base), ("drafter", composition.drafter)] + [(f"deltas[{j}].{r}", getattr(d, r)) for j, d in enumerate(composition.deltas) for r in ("tuned", "reference")]:
                if model is not None and model not in self.models:
                    raise ValueError(f"compositions[{i}].{field}: unknown model {model!r} (models: {sorted(self.models)})")
        if self.default_composition not in {c.name for c in self.compositions}:
            raise ValueError(f"default_composition: no composition {self.default_composition!r}")
        if self.gateway_autoscaling is not None and self.gateway_replicas is not None:
            raise ValueError("gateway_replicas: set either gateway_replicas or gateway_autoscaling (its min_replicas and max_replicas)")
        if self.decide_device == "cuda" and self.gateway_num_gpus <= 0:
            raise ValueError("decide_device: cuda needs a GPU for the gateway replica: set gateway_num_gpus > 0")
        return self


def _unique(values: list[str], where: str, field: str) -> None:
    for i, value in enumerate(values):
        if value in values[:i]:
            raise ValueError(f"{where}[{i}].{field}: duplicate {value!r}")


def load_config(path: str | Path) -> ServeConfig:
    data = yaml.safe_load(Path(path).read_text()) or {}
    return ServeConfig.model_validate(data)


def load_tokenizers(config: ServeConfig) -> dict:
    """Every model's tokenizer (with the config's chat template, where it sets one), checked:
    each chat template renders a one-message chat, and each composition's models share one
    tokenizer (different compositions may use different tokenizer families). A failed check
    is a ValueError naming the field."""
    from transformers import AutoTokenizer

    from services.prompts import check_chat_template, composition_vocab_sizes

    tokenizers = {}
    try:
        for name, model in config.models.items():
            tokenizers[name] = AutoTokenizer.from_pretrained(model.path)
            if model.chat_template is not None:
                tokenizers[name].chat_template = model.chat_template
            check_chat_template(tokenizers[name], f"models.{name}.chat_template")
        composition_vocab_sizes([c.composition() for c in config.compositions], tokenizers)
    except EFTError as error:
        raise ValueError(str(error)) from None
    return tokenizers


def demo_config(family_dir: Path | None = None, grpc_port: int = 50051, http_port: int = 8000, metrics_port: int = 9464) -> ServeConfig:
    """The demo family's compositions under their names, ``upscaled`` the default."""
    family = Path(family_dir or default_family_dir())
    names = ["large-base", "large-tuned", "small-base", "small-tuned", "small-safe"]
    compositions = [
        CompositionConfig(name=c.name, base=c.base, deltas=[DeltaConfig(name=d.name, tuned=d.tuned, reference=d.reference, weight=d.weight) for d in c.deltas], drafter=c.drafter)
        for c in family_compositions().values()
    ]
    return ServeConfig(
        models={n: ModelConfig(path=str(family / n)) for n in names},
        worker_groups=[WorkerGroupConfig(name="base", models=["large-base", "large-tuned"]), WorkerGroupConfig(name="pair", models=["small-base", "small-tuned", "small-safe"])],
        compositions=compositions,
        default_composition="upscaled",
        grpc_port=grpc_port,
        http_port=http_port,
        metrics_port=metrics_port,
    )
