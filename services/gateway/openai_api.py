"""OpenAI-compatible HTTP: ``GET /v1/models`` (and ``/v1/models/{id}``), ``POST
/v1/completions`` and ``POST /v1/chat/completions`` (streaming as server-sent events, or
not), vLLM's ``/tokenize``, ``/detokenize`` and ``/version``, plus ``/health``,
``/-/healthz`` (KubeRay's check, as Ray Serve's proxies answer it) and ``/metrics``.

Each body is checked for shape here (unknown fields are 400 errors naming them), turned
into an ``eft.v1.GenerateRequest`` and handed to ``Gateway.generate``: the gRPC and HTTP
paths share one validation and one set of limits.

EFT options ride as extra body fields (the ``openai`` client's ``extra_body``):
``weights`` ({delta: weight}), ``speculation`` ("off", "auto", or k), ``implicit_rewards``
(bool: per-token rewards per delta), ``return_token_ids`` (vLLM's: ``token_ids`` on each
choice, and ``prompt_token_ids``, the base model's prompt, on a completion's choice or at a
chat reply's top level, in a stream's first chunk), ``top_k``,
``conservative_top_p``, ``ignore_eos``, ``timeout`` (seconds for the whole request; default
limits.request_timeout_s). The ``model`` field names the composition. Each response carries
an ``eft`` object: draft statistics, and the rewards asked for.

Requests wait on their tokens as asyncio tasks, never on a thread: the number of requests in
flight is bounded by the scheduler's limits (then 429) and the connection cap, and health
answers at once however many wait. A client that disconnects, streaming or not, is
cancelled: its sessions are freed within an iteration.
"""

import asyncio
import importlib.metadata
import json
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator
from itertools import accumulate
from typing import Annotated, Literal

import anyio
import pydantic_core
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from eft_core import EFTError, InvalidArgumentError, NotFoundError, OverloadedError, ResourceExhaustedError
from eft_core.errors import require
from services.gateway.connections import Connections
from services.gateway.gateway import Gateway, Submitted
from services.pb.eft.v1 import eft_pb2
from services.security import HEALTHZ_PATH, OPEN_HTTP_PATHS, Security

VERSION = importlib.metadata.version("eft-serve")
FINISH = {eft_pb2.FINISH_REASON_STOP: "stop", eft_pb2.FINISH_REASON_LENGTH: "length", eft_pb2.FINISH_REASON_CANCELLED: "abort"}
HTTP_STATUS = {"INVALID_ARGUMENT": 400, "NOT_FOUND": 404, "RESOURCE_EXHAUSTED": 400, "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504, "UNAUTHENTICATED": 401}
ERROR_TYPE = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error", 408: "timeout", 413: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable", 504: "timeout"}
INT32, UINT32 = 2**31 - 1, 2**32 - 1


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field("", description="the composition (empty: the server's default)")
    max_tokens: Annotated[int, Field(ge=1, le=INT32)] | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: Annotated[int, Field(ge=0, le=2**64 - 1)] | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict | None = None
    user: str | None = None
    n: Annotated[int, Field(ge=1, le=INT32)] = 1  # samples per prompt, each its own request (limits.max_choices)
    # EFT and vLLM-style extras
    weights: dict[str, float] = Field(default_factory=dict)
    speculation: Literal["off", "auto"] | Annotated[int, Field(ge=0, le=INT32)] | None = None
    implicit_rewards: bool = False
    model_logprobs: bool = False  # per token, each scored model's own logprob (and top_logprobs) under eft.model_logprobs
    return_token_ids: bool = False
    top_k: Annotated[int, Field(ge=-1, le=INT32)] = 0
    conservative_top_p: bool = False
    ignore_eos: bool = False
    timeout: Annotated[float, Field(gt=0)] | None = None


class CompletionBody(_Body):
    prompt: str | list[str] | list[int] | list[list[int]]  # text or token ids (vLLM's), one prompt or several
    max_tokens: Annotated[int, Field(ge=0, le=INT32)] | None = None  # 0 with echo: score the prompt only
    logprobs: Annotated[int, Field(ge=0, le=INT32)] | None = None  # each token's, and its N most probable (limits.max_top_logprobs)
    echo: bool = False  # the prompt before the completion, with its tokens' logprobs where logprobs is set


# OpenAI request fields EFT Serve does not support, with the values that ask for nothing (a
# client may send those: the field is then dropped); any other value is a 400 naming the
# field. A field in neither OpenAI's API nor EFT Serve's extras is a 400 naming it too.
UNSUPPORTED = {
    "best_of": (1,),
    "suffix": ("",),
    "presence_penalty": (0,),
    "frequency_penalty": (0,),
    "logit_bias": ({},),
    "tools": ([],),
    "tool_choice": ("none",),
    "functions": ([],),
    "function_call": ("none",),
    "parallel_tool_calls": (False, True),  # means nothing without tools
    "response_format": ({"type": "text"},),
    "audio": (),
    "modalities": (["text"],),
    "prediction": (),
    "reasoning_effort": (),
    "verbosity": (),
    "web_search_options": (),
    "service_tier": ("auto", "default"),
    "store": (False,),
    "metadata": ({},),
}


CHAT_UNSUPPORTED = {**UNSUPPORTED, "echo": (False,)}  # completions echo the prompt; a chat does not


def _drop_unsupported(data: dict, unsupported: dict) -> dict:
    """``data`` without the ``unsupported`` fields that ask for nothing (None included); one
    that asks for something is refused by name."""
    for name in unsupported.keys() & data.keys():
        if not _asks_nothing(data[name], unsupported[name]):
            accepted = f" (accepted: {', '.join(json.dumps(v) for v in unsupported[name])})" if unsupported[name] else ""
            raise InvalidArgumentError(f"not supported by EFT Serve{accepted}", field=name)
    return {key: value for key, value in data.items() if key not in unsupported}


def _asks_nothing(value, accepted: tuple) -> bool:
    """None, or equal to an accepted value as JSON sees it (true is not 1, 0.0 is 0)."""
    return value is None or any(value == a and isinstance(value, bool) == isinstance(a, bool) for a in accepted)


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: str
    content: str | list[dict]
    name: str | None = None


class ChatBody(_Body):
    messages: list[_Message]
    max_completion_tokens: Annotated[int, Field(ge=1, le=INT32)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=INT32)] | None = None  # with logprobs: the N most probable at each token (limits.max_top_logprobs)


class TokenizeBody(BaseModel):
    """vLLM's /tokenize: a prompt or a chat, rendered as the composition's base model sees it."""

    model_config = ConfigDict(extra="forbid")

    model: str = ""
    prompt: str | None = None
    messages: list[_Message] | None = None


class DetokenizeBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = ""
    tokens: list[Annotated[int, Field(ge=-INT32, le=INT32)]]


def create_app(gateway: Gateway, security: Security = Security(), connections: Connections = Connections()) -> FastAPI:
    app = FastAPI(title="EFT Serve", description="OpenAI-compatible API of EFT Serve", docs_url=None, redoc_url=None)
    app.add_middleware(BodyGuard, max_bytes=gateway.limits.max_request_bytes, timeout_s=connections.body_timeout_s)

    @app.middleware("http")
    async def bearer_token(request: Request, call_next):
        if request.url.path in OPEN_HTTP_PATHS or security.authorized(request.headers.get("authorization")):
            return await call_next(request)
        message = "missing bearer token (header Authorization: Bearer <token>)" if "authorization" not in request.headers else "invalid bearer token"
        return _error_json(401, message, None)

    @app.exception_handler(EFTError)
    async def eft_error(request: Request, error: EFTError):
        return _error_response(error)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):  # a body too large or too slow, an unknown route
        return _error_json(error.status_code, str(error.detail), None, error.headers)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(c) for c in gateway.list_compositions().compositions]}

    @app.get("/v1/models/{name}")
    async def model(name: str):
        cards = {c.name: c for c in gateway.list_compositions().compositions}
        if name not in cards:
            raise NotFoundError(f"no composition {name!r} (served: {sorted(cards)})", field="model")
        return _model_card(cards[name])

    @app.post("/tokenize", openapi_extra=_body_schema(TokenizeBody))
    async def tokenize(request: Request):
        body = await _parsed(request, TokenizeBody, gateway)
        composition, ids = await anyio.to_thread.run_sync(gateway.tokenize, _tokenize_request(body))
        return {"count": len(ids), "max_model_len": gateway.contexts[composition.base], "tokens": ids, "token_strs": None}

    @app.post("/detokenize", openapi_extra=_body_schema(DetokenizeBody))
    async def detokenize(request: Request):
        body = await _parsed(request, DetokenizeBody, gateway)
        return {"prompt": gateway.detokenize(body.model, body.tokens)}

    @app.get("/version")
    async def version():
        return {"version": VERSION}

    @app.post("/v1/completions", openapi_extra=_body_schema(CompletionBody))
    async def completions(request: Request):
        body = await _parsed(request, CompletionBody, gateway)
        return await _respond(request, gateway, body, _completion_requests(body), _CompletionFormat(gateway, body))

    @app.post("/v1/chat/completions", openapi_extra=_body_schema(ChatBody))
    async def chat_completions(request: Request):
        body = await _parsed(request, ChatBody, gateway)
        return await _respond(request, gateway, body, [_chat_request(body)], _ChatFormat(gateway, body))

    @app.get("/health")
    async def health():
        """200 while some composition can serve (as gRPC health's ""), with each one's state."""
        serving = gateway.health()
        overall = serving.pop("")
        compositions = {name: "serving" if ok else "not_serving" for name, ok in serving.items()}
        status = "ok" if overall else ("draining" if gateway.draining else "unavailable")
        return JSONResponse({"status": status, "compositions": compositions}, status_code=200 if overall else 503)

    @app.get(HEALTHZ_PATH)
    async def healthz():
        status, text = gateway.healthz()
        return PlainTextResponse(text, status_code=status)

    @app.get("/metrics")
    def metrics():  # a thread of its own: the workers' state is read with a deadline per worker
        return Response(generate_latest(gateway.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


async def _parsed(request: Request, model: type[BaseModel], gateway: Gateway):
    """The body as ``model``, its errors naming the field. A chat's length is checked on the
    parsed JSON before the model's validation, which costs about 10 us per message."""
    try:
        data = pydantic_core.from_json(await request.body())
    except ValueError as error:
        raise InvalidArgumentError(f"not valid JSON: {error}", field="body") from None
    if not isinstance(data, dict):
        raise InvalidArgumentError(f"must be a JSON object, got {type(data).__name__}", field="body")
    if isinstance(data.get("messages"), list):
        gateway.check_chat_length(len(data["messages"]))
    try:
        return model.model_validate(_drop_unsupported(data, CHAT_UNSUPPORTED if model is ChatBody else UNSUPPORTED))
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        problem = "unknown field (neither OpenAI's nor one of EFT Serve's extras)" if first["type"] == "extra_forbidden" else first["msg"]
        raise InvalidArgumentError(problem, field=where or "body") from None  # the error's text leads with its field


def _body_schema(model: type[BaseModel]) -> dict:
    """The OpenAPI request body of an endpoint that parses its own body."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


# --- OpenAI body -> eft.v1.GenerateRequest ---------------------------------------------------


def _model_card(c: eft_pb2.CompositionInfo) -> dict:
    """An OpenAI model object for a composition, its models and deltas under ``eft``."""
    deltas = [{"name": d.name, "tuned": d.tuned, "reference": d.reference, "weight": d.weight} for d in c.deltas]
    return {"id": c.name, "object": "model", "created": 0, "owned_by": "eft-serve", "root": c.base, "eft": {"base": c.base, "deltas": deltas, "drafter": c.drafter or None}}


def _tokenize_request(body: TokenizeBody) -> eft_pb2.GenerateRequest:
    if (body.prompt is None) == (body.messages is None):
        raise InvalidArgumentError("set prompt or messages, not both", field="prompt")
    if body.prompt is not None:
        return eft_pb2.GenerateRequest(composition=body.model, text=body.prompt)
    return _with_messages(eft_pb2.GenerateRequest(composition=body.model), body.messages)


def _completion_prompts(body: CompletionBody) -> list[str | list[int]]:
    """A completion's prompts: one text or token-id list, or a list of them."""
    one = isinstance(body.prompt, str) or (body.prompt and isinstance(body.prompt[0], int))
    prompts = [body.prompt] if one else body.prompt
    require(len(prompts) > 0, "prompt", "must not be empty")
    return prompts


def _completion_requests(body: CompletionBody) -> list[eft_pb2.GenerateRequest]:
    """One request per prompt."""
    messages = []
    for prompt in _completion_prompts(body):
        message = _common(body, body.max_tokens, logprobs=body.logprobs is not None, top=body.logprobs or 0)
        message.return_options.prompt_logprobs = body.echo and (body.logprobs is not None or body.max_tokens == 0)
        if isinstance(prompt, str):
            message.text = prompt
        else:  # the gateway checks them against the vocabulary; the wire's uint32 first
            for i, token in enumerate(prompt):
                require(0 <= token <= UINT32, f"tokens.ids[{i}]", f"{token} is not a token id")
            message.tokens.ids.extend(prompt)
        messages.append(message)
    return messages


def _chat_request(body: ChatBody) -> eft_pb2.GenerateRequest:
    top = body.top_logprobs or 0
    require(not top or body.logprobs, "top_logprobs", "needs logprobs: true")
    return _with_messages(_common(body, body.max_completion_tokens or body.max_tokens, logprobs=body.logprobs, top=top), body.messages)


def _with_messages(message: eft_pb2.GenerateRequest, messages: list[_Message]) -> eft_pb2.GenerateRequest:
    message.messages.SetInParent()  # a chat prompt, even when empty (the gateway refuses that)
    for i, m in enumerate(messages):
        message.messages.messages.add(role=m.role, content=_text_content(m.content, i))
    return message


def _text_content(content: str | list[dict], index: int) -> str:
    if isinstance(content, str):
        return content
    parts = []
    for j, part in enumerate(content):
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise InvalidArgumentError("only text parts ({'type': 'text', 'text': ...}) are supported", field=f"messages[{index}].content[{j}]")
        parts.append(part["text"])
    return "".join(parts)


def _common(body: _Body, max_tokens: int | None, logprobs: bool, top: int) -> eft_pb2.GenerateRequest:
    sampling = eft_pb2.Sampling(
        top_k=max(body.top_k, 0),  # -1: off, as in vLLM
        conservative_top_p=body.conservative_top_p,
        max_tokens=max_tokens,
        stop=[body.stop] if isinstance(body.stop, str) else list(body.stop or []),
        ignore_eos=body.ignore_eos,
    )
    for name in ("temperature", "top_p", "seed"):
        if getattr(body, name) is not None:
            setattr(sampling, name, getattr(body, name))
    return eft_pb2.GenerateRequest(
        composition=body.model,
        weights=body.weights,
        sampling=sampling,
        speculation=_speculation(body.speculation),
        return_options=eft_pb2.ReturnOptions(token_ids=True, logprobs=logprobs, rewards=body.implicit_rewards, top_logprobs=top, model_logprobs=body.model_logprobs),
    )


def _speculation(value) -> eft_pb2.Speculation:
    if value is None:
        return eft_pb2.Speculation()
    if value == "off" or value == 0:
        return eft_pb2.Speculation(mode=eft_pb2.SPECULATION_MODE_OFF)
    if value == "auto":
        return eft_pb2.Speculation(mode=eft_pb2.SPECULATION_MODE_ADAPTIVE)
    return eft_pb2.Speculation(mode=eft_pb2.SPECULATION_MODE_FIXED, k=value)


# --- responses ---------------------------------------------------------------------------


class _Format:
    """Turns gateway replies into one OpenAI object type (completion or chat): ``choice``
    makes a choice from one sample's replies (all of them, or a stream's one chunk)."""

    object_whole = object_chunk = ""

    def __init__(self, gateway: Gateway, body: _Body):
        self.gateway, self.body = gateway, body
        self.id, self.created = f"{self.prefix}-{uuid.uuid4().hex}", int(time.time())
        self.model = body.model or gateway.default_composition
        self.tokenizer, self.prompt_ids = None, []  # the base model's, and each choice's prompt as it renders it: once asked
        self.told: set[int] = set()  # the choices that have made their first object

    def asked(self, submitted: list[Submitted]) -> None:
        """The requests are in, one per choice: the composition they named is known."""
        base = submitted[0].prepared.request.composition.base
        self.tokenizer, self.prompt_ids = self.gateway.tokenizers[base], [one.prepared.request.prompts[base] for one in submitted]

    def first(self, index: int) -> bool:
        """Whether this is choice ``index``'s first object (the whole reply, or a stream's
        first chunk): what is said once per choice goes there."""
        first = index not in self.told
        self.told.add(index)
        return first

    def token_ids(self, token_ids) -> dict:
        """A choice's ``token_ids`` (return_token_ids, where vLLM puts them)."""
        return {"token_ids": list(token_ids)} if self.body.return_token_ids else {}

    def prompt_token_ids(self, index: int, first: bool) -> dict:
        """``prompt_token_ids`` (return_token_ids) in a choice's first object, nowhere after."""
        return {"prompt_token_ids": self.prompt_ids[index]} if self.body.return_token_ids and first else {}

    def top_level(self) -> dict:
        return {}

    def envelope(self, object_type: str, choices: list, **extra) -> dict:
        return {"id": self.id, "object": object_type, "created": self.created, "model": self.model, "choices": choices, **extra}

    def token_string(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def model_view(self, view: eft_pb2.TokenModelLogprobs) -> dict:
        """One token's per-model view: {model: {logprob, top_logprobs: [{token, logprob}]}}."""
        return {m: {"logprob": v.logprob, "top_logprobs": [{"token": self.token_string(t), "logprob": lp} for t, lp in zip(v.top.token_ids, v.top.logprobs)]} for m, v in view.models.items()}


class _Joined:
    """One sample's replies, joined: its text, tokens, logprobs and top logprobs, and the
    prompt's scores (in its first reply)."""

    def __init__(self, replies: list[eft_pb2.GenerateStreamResponse]):
        self.text = "".join(r.text for r in replies)
        self.token_ids = [t for r in replies for t in r.token_ids]
        self.logprobs = [lp for r in replies for lp in r.logprobs]
        self.top = [top for r in replies for top in r.top_logprobs]
        self.prompt = replies[0]  # prompt_token_ids, prompt_logprobs, prompt_top_logprobs
        self.finish_reason = FINISH.get(replies[-1].finish_reason)


class _CompletionFormat(_Format):
    prefix, object_whole, object_chunk = "cmpl", "text_completion", "text_completion"

    def __init__(self, gateway: Gateway, body: CompletionBody):
        super().__init__(gateway, body)
        self.offsets: dict[int, int] = {}  # per choice: the characters its objects' tokens have covered

    def choice(self, index: int, replies: list[eft_pb2.GenerateStreamResponse], whole: bool) -> dict:
        """vLLM's completion choice carries the prompt's ids too; with echo, the prompt's text
        (and its tokens' logprobs) comes first."""
        joined, first = _Joined(replies), self.first(index)
        echoed = self.body.echo and first
        text = (self._prompt_text(index) if echoed else "") + joined.text
        return {"index": index, "text": text, "logprobs": self._logprobs(index, joined, echoed), "finish_reason": joined.finish_reason, **self.token_ids(joined.token_ids), **self.prompt_token_ids(index, first)}

    def _logprobs(self, index: int, joined: _Joined, echoed: bool) -> dict | None:
        """OpenAI's legacy logprobs: per token its string, logprob, and a dict of the N most
        probable (with the token itself, as vLLM adds it); the prompt's first token has none."""
        if self.body.logprobs is None:
            return None
        entries = list(zip(joined.token_ids, joined.logprobs, joined.top))
        if echoed and joined.prompt.prompt_token_ids:  # scored: the reply holds the prompt's tokens
            prompt = joined.prompt
            entries = [(prompt.prompt_token_ids[0], None, None), *zip(prompt.prompt_token_ids[1:], prompt.prompt_logprobs, prompt.prompt_top_logprobs or [None] * len(prompt.prompt_logprobs))] + entries
        if not self.body.logprobs:
            entries = [(t, lp, None) for t, lp, _ in entries]
        strings = [self.token_string(t) for t, _, _ in entries]
        offsets = list(accumulate((len(s) for s in strings), initial=self.offsets.get(index, 0)))
        self.offsets[index] = offsets.pop()
        tops = [self._ranked(top, token, lp) if top is not None else None for (token, lp, top) in entries] if self.body.logprobs else None
        return {"tokens": strings, "token_logprobs": [lp for _, lp, _ in entries], "top_logprobs": tops, "text_offset": offsets}

    def _ranked(self, top: eft_pb2.TopLogprobs, token: int, logprob: float) -> dict[str, float]:
        ranked = {self.token_string(t): lp for t, lp in zip(top.token_ids, top.logprobs)}
        ranked.setdefault(self.token_string(token), logprob)
        return ranked

    def _prompt_text(self, index: int) -> str:
        """Choice ``index``'s prompt as the client sent it: its text, or its token ids' text."""
        prompt = _completion_prompts(self.body)[index // self.body.n]
        return prompt if isinstance(prompt, str) else self.tokenizer.decode(prompt)

    def first_chunk(self, n: int):
        return None


class _ChatFormat(_Format):
    prefix, object_whole, object_chunk = "chatcmpl", "chat.completion", "chat.completion.chunk"

    def choice(self, index: int, replies: list[eft_pb2.GenerateStreamResponse], whole: bool) -> dict:
        joined = _Joined(replies)
        self.first(index)
        content = {"role": "assistant", "content": joined.text} if whole else ({"content": joined.text} if joined.text else {})
        key = "message" if whole else "delta"
        return {"index": index, key: content, "logprobs": self._logprobs(joined), "finish_reason": joined.finish_reason, **self.token_ids(joined.token_ids)}

    def top_level(self) -> dict:
        """vLLM's chat reply carries the prompt's ids at its top level, once."""
        return self.prompt_token_ids(0, self.first(-1))

    def _logprobs(self, joined: _Joined) -> dict | None:
        if not self.body.logprobs:
            return None
        tops = joined.top or [eft_pb2.TopLogprobs()] * len(joined.token_ids)
        return {"content": [{**self._entry(t, lp), "top_logprobs": [self._entry(i, v) for i, v in zip(top.token_ids, top.logprobs)]} for t, lp, top in zip(joined.token_ids, joined.logprobs, tops)]}

    def _entry(self, token: int, logprob: float) -> dict:
        string = self.token_string(token)
        return {"token": string, "logprob": logprob, "bytes": list(string.encode())}

    def first_chunk(self, n: int):
        roles = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None} for i in range(n)]
        return self.envelope(self.object_chunk, roles, **self.top_level())


async def _respond(request: Request, gateway: Gateway, body: _Body, messages: list[eft_pb2.GenerateRequest], form: _Format):
    samples = _samples(messages, body, gateway.limits.max_choices)
    submitted = await anyio.to_thread.run_sync(_submit_all, gateway, samples, body.timeout)  # renders and tokenizes off the loop
    form.asked(submitted)
    if body.stream:
        return StreamingResponse(_events(submitted, gateway, body, form), media_type="text/event-stream")
    try:
        chunks = await _collected(request, submitted, gateway)
    finally:
        for one in submitted:
            one.handle.cancel()  # a no-op once finished; frees everything if this task was cancelled
    return _whole(chunks, body, form, len(submitted))


def _samples(messages: list[eft_pb2.GenerateRequest], body: _Body, max_choices: int) -> list[eft_pb2.GenerateRequest]:
    """Each prompt's ``n`` samples, each a request of its own, choice p * n + i being prompt
    p's sample i (OpenAI's order): sample i of a seeded request is seeded seed + i (mod
    2^64), so sample 0 is the request itself and each can be reproduced alone."""
    choices = len(messages) * body.n
    if choices > max_choices:
        raise ResourceExhaustedError(f"{len(messages)} prompts x n {body.n}: {choices} choices, over the limit of {max_choices}", field="n" if body.n > 1 else "prompt")
    for extra in ("implicit_rewards", "model_logprobs"):  # reported once per reply, under eft
        require(choices == 1 or not getattr(body, extra), "n" if body.n > 1 else "prompt", f"{extra} needs one choice (one prompt, n = 1)")
    samples = []
    for message in messages:
        for i in range(body.n):
            sample = eft_pb2.GenerateRequest()
            sample.CopyFrom(message)
            if message.sampling.HasField("seed"):
                sample.sampling.seed = (message.sampling.seed + i) % 2**64
            samples.append(sample)
    return samples


def _submit_all(gateway: Gateway, samples: list[eft_pb2.GenerateRequest], timeout: float | None) -> list[Submitted]:
    """Every sample queued, or none: one refused (over a limit, the queue full) cancels the
    ones already in."""
    submitted = []
    try:
        for sample in samples:
            submitted.append(gateway.submit(sample, timeout))
    except EFTError:
        for one in submitted:
            one.handle.cancel()
        raise
    return submitted


async def _merged(gateway: Gateway, submitted: list[Submitted]) -> AsyncIterator[tuple[int, eft_pb2.GenerateStreamResponse]]:
    """Every sample's chunks as they come, each with its sample's index; a sample's error
    is raised here. Leaving early stops reading them all."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, one: Submitted) -> None:
        try:
            async for chunk in gateway.areplies(one):
                queue.put_nowait((index, chunk))
            queue.put_nowait((index, None))
        except Exception as error:  # the reader raises it
            queue.put_nowait((index, error))

    pumps = [asyncio.ensure_future(pump(i, one)) for i, one in enumerate(submitted)]
    try:
        running = len(pumps)
        while running:
            index, item = await queue.get()
            if isinstance(item, Exception):
                raise item
            if item is None:
                running -= 1
            else:
                yield index, item
    finally:
        for task in pumps:
            task.cancel()


async def _collected(request: Request, submitted: list[Submitted], gateway: Gateway) -> list[tuple[int, eft_pb2.GenerateStreamResponse]]:
    """Every reply of every sample, unless the client disconnects first (which cancels them)."""

    async def cancel_on_disconnect():
        while (await request.receive())["type"] != "http.disconnect":
            pass
        for one in submitted:
            one.handle.cancel()

    watcher = asyncio.ensure_future(cancel_on_disconnect())  # not a task group: the request's own error must reach the handlers unwrapped
    try:
        return [pair async for pair in _merged(gateway, submitted)]
    finally:
        watcher.cancel()


def _whole(chunks: list[tuple[int, eft_pb2.GenerateStreamResponse]], body: _Body, form: _Format, n: int) -> dict:
    choices, finals = [], []
    for index in range(n):
        mine = [c for i, c in chunks if i == index]
        choices.append(form.choice(index, mine, whole=True))
        finals.append(mine[-1])
    return form.envelope(form.object_whole, choices, **form.top_level(), usage=_usage(dict(enumerate(finals)), body.n), eft=_extension(body, form, finals, [c for _, c in chunks]))


async def _events(submitted: list[Submitted], gateway: Gateway, body: _Body, form: _Format):
    """Server-sent events: one per chunk of any sample (its choice's index), an optional
    usage chunk once all have finished, then [DONE]. An error after the headers went out is
    sent as an event holding OpenAI's error object. Starlette cancels this task when the
    client disconnects."""
    try:
        if (first := form.first_chunk(len(submitted))) is not None:
            yield _event(first)
        finals = {}
        async for index, chunk in _merged(gateway, submitted):
            finish = FINISH.get(chunk.finish_reason)
            choice = form.choice(index, [chunk], whole=False)
            extra = {"eft": _extension(body, form, [chunk] if finish else [], [chunk])} if (finish or body.implicit_rewards or body.model_logprobs) else {}
            yield _event(form.envelope(form.object_chunk, [choice], **extra))
            if finish:
                finals[index] = chunk
        if (body.stream_options or {}).get("include_usage"):
            yield _event(form.envelope(form.object_chunk, [], usage=_usage(finals, body.n)))
        yield "data: [DONE]\n\n"
    except EFTError as error:
        yield _event({"error": _error_object(error)})
    finally:
        for one in submitted:
            one.handle.cancel()  # the client went away mid-stream: stop generating, free the sessions


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def _usage(finals: dict[int, eft_pb2.GenerateStreamResponse], n: int) -> dict:
    """From every choice's final chunk: each prompt once (its n samples share it), every
    sample's completion."""
    prompt = sum(f.usage.prompt_tokens for index, f in finals.items() if index % n == 0)
    completion = sum(f.usage.completion_tokens for f in finals.values())
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _extension(body: _Body, form: _Format, finals: list, replies: list[eft_pb2.GenerateStreamResponse]) -> dict:
    """The eft object: the finished samples' draft statistics, summed; the per-token extras
    asked (one choice: _samples), of ``replies``' tokens."""
    extension = {"draft_tokens": sum(f.stats.drafted for f in finals), "accepted_tokens": sum(f.stats.accepted for f in finals)} if finals else {}
    if body.implicit_rewards:
        extension["implicit_rewards"] = [list(r.values) for c in replies for r in c.rewards]
    if body.model_logprobs:
        extension["model_logprobs"] = [form.model_view(view) for c in replies for view in c.model_logprobs]
    return extension


# --- errors ------------------------------------------------------------------------------


def http_status(error: EFTError) -> int:
    if isinstance(error, OverloadedError):
        return 429  # the server is busy, unlike a request over a limit
    return HTTP_STATUS.get(error.code, 500)


def _error_object(error: EFTError) -> dict:
    status = http_status(error)
    return {"message": str(error), "type": ERROR_TYPE.get(status, "server_error"), "param": error.field, "code": error.code.lower()}


def _error_response(error: EFTError) -> JSONResponse:
    return JSONResponse({"error": _error_object(error)}, status_code=http_status(error))


def _error_json(status: int, message: str, param: str | None, headers: dict | None = None) -> JSONResponse:
    kind = ERROR_TYPE.get(status, "invalid_request_error" if status < 500 else "server_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status_code=status, headers=headers)


class BodyGuard:
    """ASGI middleware: a body over ``max_bytes``, declared or counted as it arrives, is
    answered 413, and one that has not fully arrived ``timeout_s`` after the headers 408 (in
    OpenAI's error shape), before the application parses it."""

    def __init__(self, app, max_bytes: int, timeout_s: float):
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message = f"request body over {self.max_bytes} bytes (limits.max_request_bytes)"
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.max_bytes:
            return await _error_json(413, message, None)(scope, receive, send)
        received, complete, deadline = 0, False, anyio.current_time() + self.timeout_s

        async def guarded():  # a chunked body declares no length
            nonlocal received, complete
            if complete:  # after the body: the wait for a disconnect has no deadline
                return await receive()
            with anyio.move_on_after(deadline - anyio.current_time()) as scope_:
                event = await receive()
            if scope_.cancelled_caught:
                raise StarletteHTTPException(408, f"the request body did not arrive within {self.timeout_s:g} s (http.body_timeout_s)", headers={"Connection": "close"})
            received += len(event.get("body", b""))
            complete = event["type"] != "http.request" or not event.get("more_body", False)
            if received > self.max_bytes:
                raise StarletteHTTPException(413, message)  # FastAPI passes it to the app's handler
            return event

        await self.app(scope, guarded, send)


# --- the server --------------------------------------------------------------------------


def start_http_server(app: FastAPI, host: str, port: int, tls_files: tuple[str, str] | None = None, connections: Connections = Connections(), drain_timeout_s: float = 5.0) -> tuple[uvicorn.Server, int]:
    """Serve ``app`` on host:port (0: any free port) from a daemon thread, over TLS with
    ``tls_files`` (cert, key PEM paths), with ``connections``' timeouts and cap; returns the
    server and the bound port. ``should_exit = True`` stops it as a drain does: the port
    closes at once, idle connections too, and running requests get ``drain_timeout_s`` to
    end (their connections close after)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # gateway replicas on one node share the port, as gRPC's does
    sock.bind((host, port))
    cert, key = tls_files or (None, None)
    config = uvicorn.Config(
        app,
        http=connections.http_protocol(),
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=drain_timeout_s,
        timeout_keep_alive=connections.keep_alive_s,
        limit_concurrency=connections.max_connections,
        ssl_certfile=cert,
        ssl_keyfile=key,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="eft-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    if not server.started:
        raise RuntimeError(f"the HTTP server did not start on {host}:{port}")
    return server, sock.getsockname()[1]
