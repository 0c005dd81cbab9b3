"""Requests in, text out: validation, per-model prompts, stop strings, streaming text, and
the request metrics. Every transport (gRPC, HTTP) goes through ``Gateway.generate``."""

import math
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from eft_core import Composition, DeadlineExceededError, EFTError, InvalidArgumentError, NotFoundError, ResourceExhaustedError, SamplingParams
from eft_core.errors import require
from services.coordinator.engine import EngineRequest
from services.coordinator.scheduler import Handle, Scheduler
from services.gateway.text import TextStream
from services.metrics import RequestClock, ServingMetrics
from services.pb.eft.v1 import eft_pb2
from services.prompts import render_prompt, stop_token_ids, tokenizer_fingerprint


@dataclass(frozen=True)
class Limits:
    """What one request may ask for."""

    max_prompt_tokens: int = 2048
    max_tokens: int = 512
    default_max_tokens: int = 64
    max_stop_strings: int = 8
    max_weight_magnitude: float = 10.0
    default_draft_k: int = 4  # speculation when a request does not say (0: off by default)
    max_draft_k: int = 16
    max_request_bytes: int = 4 << 20  # a request message or HTTP body (gRPC's own default)


@dataclass
class Prepared:
    """A validated request, ready for the scheduler."""

    request: EngineRequest
    stop: list[str]
    options: eft_pb2.ReturnOptions
    prompt_tokens: int


class Gateway:
    """``tokenizers`` and ``contexts`` (the positions each model's sessions may hold, from the
    workers' Info: services.worker.client.model_contexts) by model name."""

    def __init__(self, compositions: Mapping[str, Composition], tokenizers: Mapping[str, object], contexts: Mapping[str, int], scheduler: Scheduler, default_composition: str, limits: Limits = Limits(), metrics: ServingMetrics | None = None):
        self.compositions, self.tokenizers, self.contexts, self.scheduler = dict(compositions), dict(tokenizers), dict(contexts), scheduler
        self.default_composition, self.limits = default_composition, limits
        self.metrics = metrics or ServingMetrics()

    def list_compositions(self) -> eft_pb2.ListCompositionsResponse:
        infos = [
            eft_pb2.CompositionInfo(
                name=c.name,
                base=c.base,
                deltas=[eft_pb2.DeltaInfo(name=d.name, tuned=d.tuned, reference=d.reference, weight=d.weight) for d in c.deltas],
                drafter=c.drafter_model or "",
                tokenizer_fingerprint=tokenizer_fingerprint(self.tokenizers[c.base]),
            )
            for c in self.compositions.values()
        ]
        return eft_pb2.ListCompositionsResponse(compositions=infos, default_composition=self.default_composition)

    def health(self) -> dict[str, bool]:
        """What the server can do now, per composition: take a request (the scheduler's loop
        runs, and every worker group the composition needs has a replica in placement);
        under "": whether any composition can."""
        alive, engine = self.scheduler.thread.is_alive(), self.scheduler.engine
        serving = {name: alive and engine.servable(c) for name, c in self.compositions.items()}
        return {"": any(serving.values()), **serving}

    def healthz(self) -> tuple[int, str]:
        """Ray Serve's proxy health contract, which KubeRay polls on the port named ``serve``
        (HEALTHZ_PATH): 200 with "success" to take traffic, 503 otherwise."""
        return (200, "success") if self.health()[""] else (503, "unavailable: no composition can serve")

    def prepare(self, message: eft_pb2.GenerateRequest) -> Prepared:
        """Validate everything once; errors name the field."""
        composition = self._composition(message.composition or self.default_composition)
        weights = self._weights(composition, message.weights)
        self._check_stop(message.sampling)
        draft_k, adaptive = self._speculation(message.speculation, composition)
        prompts = self._prompts(composition, self._prompt(message))
        params = self._sampling(message.sampling, composition, self._max_tokens(message.sampling, prompts))
        request = EngineRequest(uuid.uuid4().hex, composition, prompts, params, weights, draft_k, adaptive)
        return Prepared(request, list(message.sampling.stop), message.return_options, len(prompts[composition.base]))

    def generate(self, message: eft_pb2.GenerateRequest, timeout: float | None = None) -> tuple[Handle, Iterator[eft_pb2.GenerateStreamResponse]]:
        """Validate and submit; returns the handle (to cancel) and the stream of response
        messages (iterate it to the end). ``timeout``: seconds from now for the whole request."""
        arrived = time.monotonic()
        try:
            prepared = self.prepare(message)
            handle = self.scheduler.submit(prepared.request, timeout)
        except EFTError as error:
            self.metrics.requests.labels(error.code).inc()
            raise
        return handle, self._counted(self._responses(prepared, handle, arrived))

    def _counted(self, replies: Iterator[eft_pb2.GenerateStreamResponse]) -> Iterator[eft_pb2.GenerateStreamResponse]:
        code = "CANCELLED"  # unless it ends otherwise: the caller stopped reading
        try:
            for reply in replies:
                yield reply
                if reply.finish_reason:
                    code = "CANCELLED" if reply.finish_reason == eft_pb2.FINISH_REASON_CANCELLED else "OK"
        except EFTError as error:
            code = error.code
            raise
        finally:
            self.metrics.requests.labels(code).inc()

    def _responses(self, prepared: Prepared, handle: Handle, arrived: float) -> Iterator[eft_pb2.GenerateStreamResponse]:
        composition, options = prepared.request.composition, prepared.options
        text = TextStream(self.tokenizers[composition.base], prepared.stop)
        clock = RequestClock(self.metrics, composition.name, arrived)
        self.metrics.prompt_tokens.labels(composition.name).inc(prepared.prompt_tokens)
        for chunk in handle.stream():
            if chunk.error is not None:
                raise chunk.error
            new_text, kept = text.add(chunk.tokens)
            clock.on_tokens(kept, handle.submitted_at, handle.admitted_at)
            clock.on_rewards([d.name for d in composition.deltas], chunk.rewards[:kept])
            if text.stopped and not chunk.final:
                handle.cancel()
                for _ in handle.stream():  # until the scheduler has released its sessions
                    pass
            final = chunk.final or text.stopped
            reply = eft_pb2.GenerateStreamResponse(text=new_text + (text.finish() if final else ""))
            if options.token_ids:
                reply.token_ids.extend(chunk.tokens[:kept])
            if options.logprobs:
                reply.logprobs.extend(chunk.logprobs[:kept])
            if options.rewards:
                reply.rewards.extend(eft_pb2.TokenRewards(values=v) for v in chunk.rewards[:kept])
            if final:
                reason = "stop" if text.stopped else chunk.finish_reason
                clock.on_finish(reason)
                if reason == "deadline":
                    raise DeadlineExceededError(f"the request's deadline passed after {len(text.tokens)} tokens")
                reply.finish_reason = _FINISH[reason]
                reply.usage.CopyFrom(eft_pb2.Usage(prompt_tokens=prepared.prompt_tokens, completion_tokens=len(text.tokens)))
                stats = prepared.request.stats
                reply.stats.CopyFrom(eft_pb2.DraftStats(drafted=stats.draft_tokens, accepted=stats.accepted_tokens))
            yield reply
            if final:
                return

    # --- validation ----------------------------------------------------------------------

    def _composition(self, name: str) -> Composition:
        if name not in self.compositions:
            raise NotFoundError(f"no composition {name!r} (served: {sorted(self.compositions)})", field="composition")
        return self.compositions[name]

    def _weights(self, composition: Composition, weights: Mapping[str, float]) -> tuple[float, ...]:
        for name, value in weights.items():
            require(math.isfinite(value) and abs(value) <= self.limits.max_weight_magnitude, f"weights[{name!r}]", f"must be finite with |w| <= {self.limits.max_weight_magnitude}, got {value}")
        return composition.weights(dict(weights))

    def _prompts(self, composition: Composition, prompt) -> dict[str, list[int]]:
        """Each model's rendered prompt, within the prompt limit."""
        prompts = {m: render_prompt(self.tokenizers[m], prompt) for m in composition.models}
        longest = max(len(p) for p in prompts.values())
        if longest > self.limits.max_prompt_tokens:
            raise ResourceExhaustedError(f"{longest} prompt tokens, over the limit of {self.limits.max_prompt_tokens}", field="prompt")
        return prompts

    def _max_tokens(self, message: eft_pb2.Sampling, prompts: dict[str, list[int]]) -> int:
        """The request's max_tokens: within the limit, and such that every model's prompt plus
        every generated token fits that model's context (an unset one: what fits, up to the
        default). Checked here once, so no request outgrows a worker's session in a batch."""
        if message.max_tokens > self.limits.max_tokens:
            raise ResourceExhaustedError(f"max_tokens {message.max_tokens} is over the limit of {self.limits.max_tokens}", field="sampling.max_tokens")
        tightest = min(prompts, key=lambda m: self.contexts[m] - len(prompts[m]))
        room, used, context = self.contexts[tightest] - len(prompts[tightest]), len(prompts[tightest]), self.contexts[tightest]
        require(room >= 1, "prompt", f"{used} prompt tokens fill the context of model {tightest!r} ({context} positions): no room to generate")
        max_tokens = message.max_tokens or min(self.limits.default_max_tokens, self.limits.max_tokens, room)
        require(max_tokens <= room, "sampling.max_tokens", f"{used} prompt tokens + max_tokens {max_tokens} is over the context of model {tightest!r} ({context} positions; at most {room} new tokens fit)")
        return max_tokens

    def _check_stop(self, message: eft_pb2.Sampling) -> None:
        require(len(message.stop) <= self.limits.max_stop_strings, "sampling.stop", f"at most {self.limits.max_stop_strings} stop strings, got {len(message.stop)}")
        require(all(s for s in message.stop), "sampling.stop", "stop strings must not be empty")

    def _sampling(self, message: eft_pb2.Sampling, composition: Composition, max_tokens: int) -> SamplingParams:
        try:
            return SamplingParams(
                temperature=float(message.temperature) if message.HasField("temperature") else 1.0,
                top_k=int(message.top_k),
                top_p=float(message.top_p) if message.HasField("top_p") else 1.0,
                conservative_top_p=bool(message.conservative_top_p),
                seed=int(message.seed) if message.HasField("seed") else None,
                max_tokens=int(max_tokens),
                stop_token_ids=() if message.ignore_eos else stop_token_ids(self.tokenizers, composition),
            )
        except InvalidArgumentError as error:
            raise InvalidArgumentError(error.message, field=f"sampling.{error.field}") from None

    def _speculation(self, message: eft_pb2.Speculation, composition: Composition) -> tuple[int, bool]:
        mode = message.mode
        require(mode in _SPECULATION_MODES, "speculation.mode", f"unknown mode {mode}")
        require(0 <= message.k <= self.limits.max_draft_k, "speculation.k", f"must be in [0, {self.limits.max_draft_k}], got {message.k}")
        if mode == eft_pb2.SPECULATION_MODE_OFF or (mode == eft_pb2.SPECULATION_MODE_UNSPECIFIED and not self.limits.default_draft_k):
            return 0, False
        if composition.drafter_model is None:
            require(mode == eft_pb2.SPECULATION_MODE_UNSPECIFIED, "speculation.mode", f"composition {composition.name!r} has no drafter")
            return 0, False
        k = message.k or self.limits.default_draft_k or 4
        return k, mode == eft_pb2.SPECULATION_MODE_ADAPTIVE

    @staticmethod
    def _prompt(message: eft_pb2.GenerateRequest):
        kind = message.WhichOneof("prompt")
        require(kind is not None, "prompt", "set text or messages")
        if kind == "text":
            require(message.text != "", "text", "must not be empty")
            return message.text
        return [{"role": m.role, "content": m.content} for m in message.messages.messages]


_FINISH = {"stop": eft_pb2.FINISH_REASON_STOP, "length": eft_pb2.FINISH_REASON_LENGTH, "cancelled": eft_pb2.FINISH_REASON_CANCELLED}
_SPECULATION_MODES = {eft_pb2.SPECULATION_MODE_UNSPECIFIED, eft_pb2.SPECULATION_MODE_OFF, eft_pb2.SPECULATION_MODE_FIXED, eft_pb2.SPECULATION_MODE_ADAPTIVE}
