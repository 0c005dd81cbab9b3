"""`eft generate` and `eft compositions`: a small gRPC client of EFTService."""

import json
import sys
import time

import grpc

from eft_core import InvalidArgumentError
from services.errors import error_from_rpc
from services.pb.eft.v1 import eft_pb2, eft_pb2_grpc

FINISH = {v: k.removeprefix("FINISH_REASON_").lower() for k, v in eft_pb2.FinishReason.items()}


def build_request(args) -> eft_pb2.GenerateRequest:
    request = eft_pb2.GenerateRequest(composition=args.composition)
    if args.text:
        request.text = args.prompt
    else:
        request.messages.messages.add(role="user", content=args.prompt)
    for spec in args.weight:
        name, sep, value = spec.partition("=")
        try:
            request.weights[name] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name:
            raise InvalidArgumentError(f"expected NAME=W, got {spec!r}", field="--weight")
    sampling = request.sampling
    if args.temperature is not None:
        sampling.temperature = args.temperature
    if args.top_p is not None:
        sampling.top_p = args.top_p
    if args.seed is not None:
        sampling.seed = args.seed
    if args.max_tokens is not None:
        sampling.max_tokens = args.max_tokens
    request.speculation.CopyFrom(_speculation(args.speculate))
    request.return_options.token_ids = True
    return request


def _speculation(spec: str) -> eft_pb2.Speculation:
    if spec == "default":
        return eft_pb2.Speculation()
    if spec == "off":
        return eft_pb2.Speculation(mode=eft_pb2.SPECULATION_MODE_OFF)
    if spec == "auto":
        return eft_pb2.Speculation(mode=eft_pb2.SPECULATION_MODE_ADAPTIVE)
    if spec.isdigit() and int(spec) > 0:
        return eft_pb2.Speculation(mode=eft_pb2.SPECULATION_MODE_FIXED, k=int(spec))
    raise InvalidArgumentError(f"must be a number >= 1, auto or off, got {spec!r}", field="--speculate")


def open_channel(args) -> grpc.Channel:
    """A channel to ``args.address``: TLS when ``args.ca_cert`` names the CA to trust."""
    if not getattr(args, "ca_cert", None):
        return grpc.insecure_channel(args.address)
    with open(args.ca_cert, "rb") as ca:
        return grpc.secure_channel(args.address, grpc.ssl_channel_credentials(root_certificates=ca.read()))


def call_metadata(args) -> tuple[tuple[str, str], ...]:
    token = getattr(args, "token", None)
    return (("authorization", f"Bearer {token}"),) if token else ()


def stream_reply(stub, request, on_text=None, metadata=()) -> eft_pb2.GenerateResponse:
    """Stream a request; returns the whole reply, calling ``on_text`` with each new piece."""
    reply = eft_pb2.GenerateResponse()
    try:
        for chunk in stub.GenerateStream(request, timeout=600, metadata=metadata):
            if on_text and chunk.text:
                on_text(chunk.text)
            reply.text += chunk.text
            reply.token_ids.extend(chunk.token_ids)
            if chunk.finish_reason:
                reply.finish_reason = chunk.finish_reason
                reply.usage.CopyFrom(chunk.usage)
                reply.stats.CopyFrom(chunk.stats)
    except grpc.RpcError as error:
        raise error_from_rpc(error) from None
    return reply


def as_json(reply: eft_pb2.GenerateResponse) -> dict:
    return {
        "text": reply.text,
        "token_ids": list(reply.token_ids),
        "finish_reason": FINISH[reply.finish_reason],
        "usage": {"prompt_tokens": reply.usage.prompt_tokens, "completion_tokens": reply.usage.completion_tokens},
        "stats": {"draft_tokens": reply.stats.drafted, "accepted_tokens": reply.stats.accepted},
    }


def acceptance_line(reply: eft_pb2.GenerateResponse) -> str:
    drafted, accepted = reply.stats.drafted, reply.stats.accepted
    rate = f"{accepted / drafted:.0%}" if drafted else "n/a (no speculation)"
    return f"[{FINISH[reply.finish_reason]}; {reply.usage.completion_tokens} tokens; drafts accepted {accepted}/{drafted}: {rate}]"


def generate_command(args) -> int:
    request = build_request(args)
    with open_channel(args) as channel:
        stub = eft_pb2_grpc.EFTServiceStub(channel)
        printer = (lambda text: print(text, end="", flush=True)) if args.stream and not args.json else None
        reply = stream_reply(stub, request, printer, call_metadata(args))
    if args.json:
        print(json.dumps(as_json(reply)))
    else:
        print(reply.text if printer is None else "")
        print(acceptance_line(reply), file=sys.stderr)
    return 0


def compositions_command(args) -> int:
    with open_channel(args) as channel:
        try:
            listing = eft_pb2_grpc.EFTServiceStub(channel).ListCompositions(eft_pb2.ListCompositionsRequest(), timeout=30, metadata=call_metadata(args))
        except grpc.RpcError as error:
            raise error_from_rpc(error) from None
    for c in listing.compositions:
        deltas = " ".join(f"+ {d.weight:g} x ({d.tuned} - {d.reference}) [{d.name}]" for d in c.deltas)
        default = "  (default)" if c.name == listing.default_composition else ""
        print(f"{c.name}: {c.base} {deltas}".rstrip() + (f"; drafter {c.drafter}" if c.drafter else "") + default)
    return 0


def drain_command(metrics_port: int, timeout_s: float) -> int:
    """Ask the local gateway to drain (services.security.DRAIN_PATH) until it says drained."""
    import urllib.error
    import urllib.request

    from services.security import DRAIN_PATH

    url, deadline, said = f"http://127.0.0.1:{metrics_port}{DRAIN_PATH}", time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as reply:
                status, text = reply.status, reply.read().decode()
        except urllib.error.HTTPError as error:
            status, text = error.code, error.read().decode()
        except OSError as error:  # nothing listens: no gateway here (any more)
            print(f"no gateway answers on {url}: {error}; nothing to drain", flush=True)
            return 0
        if text != said:
            print(text, flush=True)
            said = text
        if status == 200:
            return 0
        if status != 202:
            return 1
        time.sleep(0.5)
    print(f"still draining after {timeout_s:g} s", flush=True)
    return 1
