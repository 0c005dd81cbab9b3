"""Requests in, text out: validation, per-model prompts, stop strings, streaming text, and
the request metrics. Every transport (gRPC, HTTP) goes through ``Gateway.submit``, then reads
the replies from a thread (``replies``) or an asyncio task (``areplies``)."""

import json
import math
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass

from eft_core import Composition, DeadlineExceededError, EFTError, InvalidArgumentError, NotFoundError, ResourceExhaustedError, SamplingParams, UnavailableError
from eft_core.errors import require
from services.coordinator.engine import EngineRequest
from services.coordinator.scheduler import Handle, Scheduler
from services.gateway.text import TextStream
from services.metrics import RequestClock, ServingMetrics
from services.pb.eft.v1 import eft_pb2
from services.prompts import TokenPrompt, render_prompt, require_in_vocabulary, stop_token_ids, tokenizer_fingerprint


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
    max_messages: int = 2048  # messages in one chat (OpenAI's own limit)
    max_choices: int = 32  # choices one HTTP request may ask (prompts x n), each a request of its own
    max_top_logprobs: int = 20  # top logprobs per position (OpenAI's own limit)
    request_timeout_s: float | None = None  # a request that sets no deadline of its own gets this one


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
        self.draining = False  # set by drain(): health turns NOT_SERVING
        self.drained = False  # set when drain() returns: a request that still gets in is UNAVAILABLE
        self.health_changed = threading.Event()  # the gRPC health service asks again when set
        self.longest_token = {name: longest_token_chars(t) for name, t in self.tokenizers.items()}

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
        under "": whether any composition can. Nothing serves while the gateway drains."""
        alive, engine = self.scheduler.thread.is_alive() and not self.draining, self.scheduler.engine
        serving = {name: alive and engine.servable(c) for name, c in self.compositions.items()}
        return {"": any(serving.values()), **serving}

    def healthz(self) -> tuple[int, str]:
        """Ray Serve's proxy health contract, which KubeRay polls on the port named ``serve``
        (HEALTHZ_PATH): 200 with "success" to take traffic, 503 otherwise."""
        return (200, "success") if self.health()[""] else (503, "unavailable: draining" if self.draining else "unavailable: no composition can serve")

    def drain(self, timeout_s: float, stop_listening: Callable[[], None] = lambda: None, poll_s: float = 0.1) -> tuple[int, int]:
        """Stop taking requests and wait, up to ``timeout_s``, for the admitted ones (running
        and queued) to end; returns (finished, still running). Health reports NOT_SERVING
        first (a health watch hears it at once), then ``stop_listening`` closes the servers'
        doors: new connections go to the replicas that share the port or the Service, open
        ones are asked to reconnect (gRPC's GOAWAY, HTTP's Connection: close) once their
        running requests end, so a client's next request lands elsewhere, not on a refusal.
        A call the servers took before they stopped listening is served, even if it reaches
        ``submit`` after the drain began (its handler waited for a thread); one arriving
        after the drain ended is refused."""
        self.draining = True
        self.health_changed.set()
        stop_listening()
        deadline = time.monotonic() + timeout_s
        time.sleep(poll_s)  # the calls taken just before the doors closed reach submit
        admitted = self.admitted()
        while self.admitted() and time.monotonic() < deadline:
            time.sleep(poll_s)
        self.drained = True
        return admitted - self.admitted(), self.admitted()

    def admitted(self) -> int:
        """Requests running or queued."""
        return sum(self.scheduler.counts)

    def tokenize(self, message: eft_pb2.GenerateRequest) -> tuple[Composition, list[int]]:
        """The composition a request names and its prompt as the base model sees it, rendered
        as a generation would be (the same checks before any rendering); no length limit:
        counting tokens is what this is for."""
        composition = self._composition(message.composition or self.default_composition)
        prompt = self._prompt(message)
        self._check_prompt_size(composition, prompt)
        return composition, render_prompt(self.tokenizers[composition.base], prompt)

    def detokenize(self, composition_name: str, token_ids: list[int]) -> str:
        """The text of ``token_ids`` in the composition's vocabulary (each id checked)."""
        composition = self._composition(composition_name or self.default_composition)
        tokenizer = self.tokenizers[composition.base]
        require_in_vocabulary(tokenizer, token_ids, "tokens")
        return tokenizer.decode(token_ids)

    def prepare(self, message: eft_pb2.GenerateRequest) -> Prepared:
        """Validate everything once; errors name the field."""
        composition = self._composition(message.composition or self.default_composition)
        weights = self._weights(composition, message.weights)
        self._check_stop(message.sampling)
        draft_k, adaptive = self._speculation(message.speculation, composition)
        prompt = self._prompt(message)
        self._check_prompt_size(composition, prompt)
        prompts = self._prompts(composition, prompt)
        options, score_only = message.return_options, self._scores_only(message)
        self._check_returns(options, composition, prompts)
        params = self._sampling(message.sampling, composition, 1 if score_only else self._max_tokens(message.sampling, prompts))
        request = EngineRequest(
            uuid.uuid4().hex, composition, prompts, params, weights, 0 if score_only else draft_k, adaptive,
            score_prompt=options.prompt_logprobs, score_only=score_only, top_logprobs=options.top_logprobs, model_logprobs=options.model_logprobs,
        )  # fmt: skip
        return Prepared(request, list(message.sampling.stop), options, len(prompts[composition.base]))

    def submit(self, message: eft_pb2.GenerateRequest, timeout: float | None = None) -> "Submitted":
        """Validate and queue a request. ``timeout``: seconds from now for the whole request
        (None: limits.request_timeout_s). Refused with UNAVAILABLE once the gateway has drained."""
        arrived = time.monotonic()
        try:
            if self.drained:
                raise UnavailableError("this gateway is shutting down: retry (another replica serves)")
            prepared = self.prepare(message)
            handle = self.scheduler.submit(prepared.request, timeout if timeout is not None else self.limits.request_timeout_s)
        except EFTError as error:
            self.metrics.requests.labels(error.code).inc()
            raise
        return Submitted(prepared, handle, arrived)

    def generate(self, message: eft_pb2.GenerateRequest, timeout: float | None = None) -> tuple[Handle, Iterator[eft_pb2.GenerateStreamResponse]]:
        """Submit; returns the handle (to cancel) and the stream of response messages for a
        reading thread (iterate it to the end)."""
        submitted = self.submit(message, timeout)
        return submitted.handle, self.replies(submitted)

    def replies(self, submitted: "Submitted") -> Iterator[eft_pb2.GenerateStreamResponse]:
        made, handle = _Replies(self, submitted), submitted.handle
        try:
            for chunk in handle.stream():
                reply = made.of(chunk)
                if made.cut_short:
                    handle.cancel()
                    for _ in handle.stream():  # until the scheduler has released its sessions
                        pass
                yield reply
                if reply.finish_reason:
                    return
        finally:
            made.close()

    async def areplies(self, submitted: "Submitted") -> AsyncIterator[eft_pb2.GenerateStreamResponse]:
        """As ``replies``, for a task on an asyncio loop: it waits on chunks without a thread."""
        made, handle = _Replies(self, submitted), submitted.handle
        try:
            async for chunk in handle.astream():
                reply = made.of(chunk)
                if made.cut_short:
                    handle.cancel()
                    async for _ in handle.astream():
                        pass
                yield reply
                if reply.finish_reason:
                    return
        finally:
            made.close()

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

    def check_chat_length(self, messages: int) -> None:
        if messages > self.limits.max_messages:
            raise ResourceExhaustedError(f"{messages} messages, over the limit of {self.limits.max_messages}", field="messages")

    def _check_prompt_size(self, composition: Composition, prompt: str | list[dict] | TokenPrompt) -> None:
        """Refuse, before any rendering, a chat with too many messages, token ids past the
        prompt limit, or a prompt whose text alone must tokenize past it: a token spans at
        most longest_token_chars (times NORMALIZE_SLACK: a normalizer may merge characters),
        so this never refuses a prompt that would fit. Rendering and tokenizing a 4 MiB chat
        takes seconds per model."""
        if isinstance(prompt, TokenPrompt):
            if len(prompt.ids) > self.limits.max_prompt_tokens:
                raise ResourceExhaustedError(f"{len(prompt.ids)} prompt tokens, over the limit of {self.limits.max_prompt_tokens}", field="tokens.ids")
            return
        if isinstance(prompt, list):
            self.check_chat_length(len(prompt))
        spans = [self.longest_token[m] for m in composition.models]
        if None in spans:
            return
        chars = len(prompt) if isinstance(prompt, str) else sum(len(m["content"]) for m in prompt)
        if chars > max(spans) * NORMALIZE_SLACK * self.limits.max_prompt_tokens:
            raise ResourceExhaustedError(f"a prompt of {chars} characters is over {self.limits.max_prompt_tokens} tokens (the limit) in any tokenization", field="prompt")

    @staticmethod
    def _scores_only(message: eft_pb2.GenerateRequest) -> bool:
        """max_tokens set to 0: score the prompt, generate nothing."""
        if not message.sampling.HasField("max_tokens") or message.sampling.max_tokens:
            return False
        require(message.return_options.prompt_logprobs, "sampling.max_tokens", "0 generates nothing: set return_options.prompt_logprobs to score the prompt, or ask for at least 1 token")
        return True

    def _check_returns(self, options: eft_pb2.ReturnOptions, composition: Composition, prompts: dict[str, list[int]]) -> None:
        """Top logprobs within the limit, of logprobs asked; a scored prompt that every scored
        model sees alike."""
        top = options.top_logprobs
        require(0 <= top <= self.limits.max_top_logprobs, "return_options.top_logprobs", f"must be in [0, {self.limits.max_top_logprobs}], got {top}")
        require(not top or options.logprobs or options.prompt_logprobs or options.model_logprobs, "return_options.top_logprobs", "needs logprobs, prompt_logprobs or model_logprobs: they are what it ranks")
        if not options.prompt_logprobs:
            return
        differ = sorted(m for m in composition.scored_models if prompts[m] != prompts[composition.base])
        require(not differ, "return_options.prompt_logprobs", f"needs every model of {composition.name!r} to see the same prompt tokens, but this prompt renders differently for {differ} than for {composition.base!r} (their chat templates or BOS): send token ids, which every model sees as they are")

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
        if kind == "tokens":
            return TokenPrompt(tuple(message.tokens.ids))
        return [{"role": m.role, "content": m.content} for m in message.messages.messages]


NORMALIZE_SLACK = 4


def longest_token_chars(tokenizer) -> int | None:
    """The most characters of text one token of ``tokenizer`` can stand for: its longest
    vocabulary entry (a byte-level entry's bytes, at least its characters), or a WordPiece
    word's limit; None where an unknown token may stand for any run of text (WordLevel,
    Unigram, BPE that fuses unknowns), which leaves the rendered length the only bound."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    model = json.loads(backend.to_str())["model"]
    longest = max(len(token.encode()) for token in tokenizer.get_vocab())
    if model["type"] == "WordPiece":
        return max(longest, model["max_input_chars_per_word"])
    if model["type"] == "BPE" and (model.get("byte_fallback") or not model.get("unk_token") or not model.get("fuse_unk")):
        return longest
    return None


@dataclass
class Submitted:
    prepared: Prepared
    handle: Handle
    arrived: float  # monotonic seconds


class _Replies:
    """One request's response messages, made chunk by chunk for either kind of reader, and
    its final status for the metrics (CANCELLED unless it ends otherwise: the reader left)."""

    def __init__(self, gateway: Gateway, submitted: Submitted):
        self.prepared, self.metrics = submitted.prepared, gateway.metrics
        self.composition = self.prepared.request.composition
        self.text = TextStream(gateway.tokenizers[self.composition.base], self.prepared.stop)
        self.handle = submitted.handle
        self.clock = RequestClock(gateway.metrics, self.composition.name, submitted.arrived)
        self.metrics.prompt_tokens.labels(self.composition.name).inc(self.prepared.prompt_tokens)
        self.code, self.cut_short = "CANCELLED", False
        self.prompt_told = False  # the prompt's scores go in the first reply

    def _tell_prompt(self, reply: eft_pb2.GenerateStreamResponse) -> None:
        request = self.prepared.request
        if request.scoring:  # it ended before its prompt was scored (cancelled, an error)
            return
        reply.prompt_token_ids.extend(request.prompts[self.composition.base])
        reply.prompt_logprobs.extend(request.prompt_logprobs)
        if request.top_logprobs:
            reply.prompt_top_logprobs.extend(_top_logprobs(top) for top in request.prompt_top)
        self.prompt_told = True

    def of(self, chunk) -> eft_pb2.GenerateStreamResponse:
        """The message for ``chunk``; ``cut_short`` after it when a stop string ended the text
        before the scheduler did (the reader then cancels and waits for the release)."""
        try:
            return self._reply(chunk)
        except EFTError as error:
            self.code = error.code
            raise

    def _reply(self, chunk) -> eft_pb2.GenerateStreamResponse:
        if chunk.error is not None:
            raise chunk.error
        options, text, handle = self.prepared.options, self.text, self.handle
        new_text, kept = text.add(chunk.tokens)
        self.clock.on_tokens(kept, handle.submitted_at, handle.admitted_at)
        self.clock.on_rewards([d.name for d in self.composition.deltas], chunk.rewards[:kept])
        self.cut_short = text.stopped and not chunk.final
        final = chunk.final or text.stopped
        reply = eft_pb2.GenerateStreamResponse(text=new_text + (text.finish() if final else ""))
        if options.token_ids:
            reply.token_ids.extend(chunk.tokens[:kept])
        if options.logprobs:
            reply.logprobs.extend(chunk.logprobs[:kept])
        if options.rewards:
            reply.rewards.extend(eft_pb2.TokenRewards(values=v) for v in chunk.rewards[:kept])
        if options.logprobs and options.top_logprobs:
            reply.top_logprobs.extend(_top_logprobs(top) for top in chunk.top[:kept])
        if options.model_logprobs:
            reply.model_logprobs.extend(_model_logprobs(view) for view in chunk.views[:kept])
        if options.prompt_logprobs and not self.prompt_told:
            self._tell_prompt(reply)
        if final:
            self._finish(reply, "stop" if text.stopped else chunk.finish_reason)
        return reply

    def _finish(self, reply: eft_pb2.GenerateStreamResponse, reason: str) -> None:
        self.clock.on_finish(reason)
        if reason == "deadline":
            raise DeadlineExceededError(f"the request's deadline passed after {len(self.text.tokens)} tokens")
        reply.finish_reason = _FINISH[reason]
        reply.usage.CopyFrom(eft_pb2.Usage(prompt_tokens=self.prepared.prompt_tokens, completion_tokens=len(self.text.tokens)))
        stats = self.prepared.request.stats
        reply.stats.CopyFrom(eft_pb2.DraftStats(drafted=stats.draft_tokens, accepted=stats.accepted_tokens))
        self.code = "CANCELLED" if reason == "cancelled" else "OK"

    def close(self) -> None:
        self.metrics.requests.labels(self.code).inc()


def _top_logprobs(top: list[tuple[int, float]]) -> eft_pb2.TopLogprobs:
    return eft_pb2.TopLogprobs(token_ids=[t for t, _ in top], logprobs=[lp for _, lp in top])


def _model_logprobs(view: dict[str, tuple[float, list[tuple[int, float]]]]) -> eft_pb2.TokenModelLogprobs:
    return eft_pb2.TokenModelLogprobs(models={m: eft_pb2.ModelLogprobs(logprob=lp, top=_top_logprobs(top)) for m, (lp, top) in view.items()})


_FINISH = {"stop": eft_pb2.FINISH_REASON_STOP, "length": eft_pb2.FINISH_REASON_LENGTH, "cancelled": eft_pb2.FINISH_REASON_CANCELLED}
_SPECULATION_MODES = {eft_pb2.SPECULATION_MODE_UNSPECIFIED, eft_pb2.SPECULATION_MODE_OFF, eft_pb2.SPECULATION_MODE_FIXED, eft_pb2.SPECULATION_MODE_ADAPTIVE}
