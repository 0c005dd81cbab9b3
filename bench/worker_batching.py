"""One model worker's decode: throughput at 1, 4, 8, 16 sessions, and a step's cost over a
plain Hugging Face forward.

Runs on the demo family's large model (built if missing). Throughput goes through a real
gRPC server on 127.0.0.1: tokens/s per concurrency with the ratio to 1 session (measured in
the same process, interleaved, so machine drift cancels), plus logits bytes on the wire per
session-step. Then ``worker_step_vs_hf_forward``: a decode step of 16 sessions holding 1024
tokens each, in process (``ModelWorker.extend``: admission, the slot cache, logits cut to
the vocabulary), over one plain forward of the same batch on a prebuilt ``DynamicCache``
(cropped back after each forward, so every forward sees the same 1024 tokens), interleaved.

    python bench/worker_batching.py [--family DIR] [--steps N] [--model large-base]
"""

import argparse
import json
import statistics
import time
import uuid

import torch

from transformers import AutoModelForCausalLM, DynamicCache

from services.family.build import build_family, default_family_dir, load_family
from services.hf_compat import cache_kwargs
from services.worker.api import ExtendItem, WorkerLimits
from services.worker.client import GrpcWorkerClient
from services.worker.server import create_server
from services.worker.worker import HostedModel, ModelWorker, load_hosted_model

PROMPT_LENGTH = 12
CONCURRENCY = (1, 4, 8, 16)
STEP_SESSIONS, STEP_CACHED = 16, 1024  # the decode-step comparison's batch


def decode_rate(client: GrpcWorkerClient, model: str, sessions: int, steps: int) -> tuple[float, int]:
    """Tokens/s over ``steps`` batched single-token Extend calls, and wire bytes per session-step."""
    ids = [uuid.uuid4().hex for _ in range(sessions)]
    client.extend([ExtendItem(i, model, list(range(3, 3 + PROMPT_LENGTH))) for i in ids])  # prefill, not timed
    started = time.perf_counter()
    bytes_per_step = 0
    for step in range(steps):
        results = client.extend([ExtendItem(i, model, [3 + (step % 40)]) for i in ids])
        bytes_per_step = sum(r.logits.numel() * r.logits.element_size() for r in results) // sessions
    elapsed = time.perf_counter() - started
    client.release(ids)
    return sessions * steps / elapsed, bytes_per_step


def step_vs_hf_forward(path, steps: int, rounds: int) -> dict:
    """Median seconds of a worker decode step and of a plain forward, same batch and cache."""
    model = AutoModelForCausalLM.from_pretrained(str(path), max_position_embeddings=2 * STEP_CACHED).eval()  # room for 1024 tokens
    vocab = model.config.vocab_size
    worker = ModelWorker([HostedModel("m", model, "bench", vocab)], WorkerLimits(max_sessions=STEP_SESSIONS))
    ids = [f"s{i}" for i in range(STEP_SESSIONS)]
    prompt = torch.randint(3, vocab, (STEP_SESSIONS, STEP_CACHED), generator=torch.Generator().manual_seed(0))
    worker.extend([ExtendItem(s, "m", prompt[i].tolist(), num_logits=1) for i, s in enumerate(ids)])
    cache = DynamicCache()
    with torch.inference_mode():
        model(input_ids=prompt, use_cache=True, **cache_kwargs(model, cache))
    token = torch.full((STEP_SESSIONS, 1), 5)
    positions = torch.full((STEP_SESSIONS, 1), STEP_CACHED)

    def worker_step() -> float:
        started = time.perf_counter()
        worker.extend([ExtendItem(s, "m", [5]) for s in ids])
        elapsed = time.perf_counter() - started
        for s in ids:  # back to 1024 tokens, untimed
            worker.truncate(s, "m", STEP_CACHED)
        return elapsed

    def plain_forward() -> float:
        with torch.inference_mode():
            started = time.perf_counter()
            model(input_ids=token, position_ids=positions, use_cache=True, **cache_kwargs(model, cache))
            elapsed = time.perf_counter() - started
            cache.crop(-1)  # back to 1024 tokens
        return elapsed

    times = {"worker": [], "hf": []}
    for _ in range(rounds):
        for name, step in (("worker", worker_step), ("hf", plain_forward)):
            times[name].append(sum(step() for _ in range(steps)) / steps)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", type=str, default=str(default_family_dir()))
    parser.add_argument("--model", default="large-base")
    parser.add_argument("--steps", type=int, default=40, help="decode steps per measurement (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is reported (default: %(default)s)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    family = build_family(args.family) if args.family == str(default_family_dir()) else load_family(args.family)
    worker = ModelWorker([load_hosted_model(args.model, family.model_path(args.model))], WorkerLimits(max_sessions=64))
    server, port = create_server(worker, "127.0.0.1:0")
    client = GrpcWorkerClient(f"127.0.0.1:{port}")
    decode_rate(client, args.model, 4, 5)  # warm-up
    rates = {n: [] for n in CONCURRENCY}
    wire = {}
    for _ in range(args.rounds):
        for n in CONCURRENCY:
            rate, wire[n] = decode_rate(client, args.model, n, args.steps)
            rates[n].append(rate)
    median = {n: statistics.median(r) for n, r in rates.items()}
    print(f"{args.model}, torch threads {torch.get_num_threads()}, {args.steps} steps x {args.rounds} rounds")
    print(f"{'sessions':>8} {'tokens/s':>10} {'vs 1':>6} {'wire bytes/session-step':>24}")
    for n in CONCURRENCY:
        print(f"{n:>8} {median[n]:>10.1f} {median[n] / median[1]:>5.2f}x {wire[n]:>24}")
    client.close()
    server.stop(grace=None)
    step = step_vs_hf_forward(family.model_path(args.model), args.steps, args.rounds)
    ratio = step["worker"] / step["hf"]
    print(f"decode step, {STEP_SESSIONS} sessions x {STEP_CACHED} cached tokens: worker {step['worker'] * 1e3:.2f} ms, plain HF forward {step['hf'] * 1e3:.2f} ms: {ratio:.2f}x")
    if args.json:
        rows = [{"name": f"worker_decode_tokens_per_s_c{n}", "value": median[n], "unit": "tokens/s"} for n in CONCURRENCY]
        rows += [{"name": f"worker_batching_speedup_c{n}", "value": median[n] / median[1], "unit": "ratio"} for n in CONCURRENCY]
        rows.append({"name": "worker_wire_bytes_per_session_step", "value": wire[1], "unit": "bytes"})
        rows.append({"name": "worker_step_vs_hf_forward", "value": ratio, "unit": "ratio"})
        with open(args.json, "w") as out:
            json.dump(rows, out, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
