"""EFT serving against its baselines, in one run (`make bench`).

Systems, measured interleaved round by round so that machine drift cancels:

- ``naive``: the in-process oracle engine as research code runs it: the models called one
  after another for every token, KV caches, one request at a time;
- ``batched_loop``: what the published proxy-tuning code does: the same, on a batch of
  ``c`` requests sharing one left-padded KV cache per model, in process;
- ``base_only``: the served large base alone (a composition with no deltas);
- ``base_alone``: the large base alone in process, in the batched loop below (Hugging Face's
  own batched decoding: the floor of up-scaling's cost);
- ``eft``: served up-scaling (large-base + small-tuned - small-base), speculation off;
- ``eft_spec_k<k>`` / ``eft_spec_auto``: the same with speculation, fixed k or adaptive.

"Served" is the real stack on 127.0.0.1: one worker process per worker group (base: the
large models; pair: the small ones), the coordinator and gateway in this process, and
clients calling EFTService over gRPC, streaming. Requests are chat questions of the demo
family, generating ``--max-tokens`` tokens each (``ignore_eos``), greedy and at temperature
1 (seeded), at concurrency 1, 4 and 16.

The cost-scaled study repeats ``eft`` against speculation on a deepened large base
(services/family/deepen.py: extra zero-output layers, the same function at about 10x the
small model's per-token latency), as a 70B base is next to a 7B drafter.

Speculative efficiency compares the speedup achieved with the one the cost model promises
for what was measured (eft_core/draft_length.py):

    ideal = (L + 1) / (1 + k * t_draft / t_step)

with L the mean accepted length per draft, k the drafts per step, t_draft the measured cost
of one draft step (Draft call wall time per drafted token) and t_step the measured time of
one plain EFT step (1 / tokens per second of ``eft`` at concurrency 1).

    python bench/serving.py [--rounds N] [--max-tokens N] [--out bench/results.json] [--quick]
"""

import argparse
import json
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc
import torch

from cluster.loadtest import percentile, rss_bytes
from eft_core import Composition, Delta, SamplingBatch, SamplingParams, eft_logprobs
from eft_core.sampling import sample
from services.coordinator.engine import Engine, pools_of
from services.coordinator.scheduler import Scheduler
from services.family.build import build_family
from services.family.deepen import deepen
from services.gateway.gateway import Gateway, Limits
from services.gateway.server import create_server
from services.metrics import ServingMetrics
from services.oracle import OracleEngine, load_model
from services.pb.eft.v1 import eft_pb2, eft_pb2_grpc
from services.hf_compat import cache_kwargs, full_cache
from services.prompts import composition_vocab_sizes, render_prompt
from services.worker.client import GrpcWorkerClient, model_contexts
from services.worker.processes import start_worker, wait_listening

BASE_MODELS = ("large-base", "large-base-deep")
PAIR_MODELS = ("small-base", "small-tuned")
CHAT = Delta("chat", "small-tuned", "small-base", 1.0)
COMPOSITIONS = {
    "upscaled": Composition("upscaled", "large-base", (CHAT,)),
    "base-only": Composition("base-only", "large-base"),
    "upscaled-deep": Composition("upscaled-deep", "large-base-deep", (CHAT,)),
}
DEEP_EXTRA_LAYERS = 20


@dataclass
class Run:
    """One measurement: ``concurrency`` clients, each sending its share of the requests."""

    tokens: int = 0
    wall: float = 0.0
    per_request_tps: list[float] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    drafted: int = 0
    accepted: int = 0
    iterations: int = 0  # the engine's, during the run
    overhead: float = 0.0  # seconds of them outside the slowest worker's compute (services.coordinator.engine.IterationTiming)

    @property
    def tps(self) -> float:
        return self.tokens / self.wall

    @property
    def overhead_per_iteration(self) -> float:
        return self.overhead / self.iterations if self.iterations else float("nan")


# --- the systems -------------------------------------------------------------------------


class Served:
    """Worker processes, and the coordinator + gateway in this process behind gRPC."""

    def __init__(self, family_dir: Path, threads: int | None, device: str = "cpu", base_models=BASE_MODELS):
        family = {name: str(family_dir / name) for name in (*base_models, *PAIR_MODELS)}
        extra = ["--threads", str(threads)] if threads else []
        extra += ["--device", device] + (["--dtype", "bfloat16"] if device.startswith("cuda") else [])
        self.processes = [start_worker(*[a for m in group for a in ("--model", f"{m}={family[m]}")], "--max-sessions", "1024", *extra) for group in (base_models, PAIR_MODELS)]
        try:
            addresses = [wait_listening(p, timeout=300) for p in self.processes]
        except RuntimeError:
            for process in self.processes:
                process.kill()
            raise
        self.clients = [GrpcWorkerClient(a) for a in addresses]
        placement = {m: self.clients[0] for m in base_models} | {m: self.clients[1] for m in PAIR_MODELS}
        from transformers import AutoTokenizer

        tokenizers = {m: AutoTokenizer.from_pretrained(path) for m, path in family.items()}
        self.metrics = ServingMetrics()
        self.scheduler = Scheduler(Engine(pools_of(placement), composition_vocab_sizes(COMPOSITIONS.values(), tokenizers), metrics=self.metrics), max_running=64, max_waiting=1024)
        gateway = Gateway(COMPOSITIONS, tokenizers, model_contexts(self.clients), self.scheduler, "upscaled", Limits(max_tokens=256, max_draft_k=16), self.metrics)
        self.server, port = create_server(gateway, "127.0.0.1:0")
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stub = eft_pb2_grpc.EFTServiceStub(self.channel)

    def run(self, composition: str, speculation: eft_pb2.Speculation, prompts: list, concurrency: int, temperature: float, max_tokens: int) -> Run:
        run, lock = Run(), threading.Lock()
        shares = [prompts[i::concurrency] for i in range(concurrency)]

        def client(share, offset):
            for i, prompt in enumerate(share):
                request = eft_pb2.GenerateRequest(composition=composition, speculation=speculation)
                request.sampling.CopyFrom(eft_pb2.Sampling(temperature=temperature, max_tokens=max_tokens, ignore_eos=True, seed=offset * 1000 + i))
                if isinstance(prompt, str):
                    request.text = prompt
                else:
                    request.messages.messages.extend(eft_pb2.ChatMessage(**m) for m in prompt)
                try:
                    self._one(request, run, lock)
                except grpc.RpcError as error:  # reported once, after the run
                    errors.append(error)
                    return

        errors: list[grpc.RpcError] = []
        threads = [threading.Thread(target=client, args=(share, n)) for n, share in enumerate(shares)]
        timing, before = self.scheduler.engine.timing, replace(self.scheduler.engine.timing)
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        run.wall = time.perf_counter() - started
        run.iterations = timing.iterations - before.iterations
        run.overhead = (timing.wall_seconds - before.wall_seconds) - (timing.compute_seconds - before.compute_seconds)
        if errors:
            raise RuntimeError(f"{len(errors)} requests of {composition!r} failed, the first with {errors[0].code().name}: {errors[0].details()}")
        return run

    def _one(self, request, run: Run, lock) -> None:
        request.return_options.token_ids = True
        sent = last = time.perf_counter()
        ttft, itl, final = None, [], None
        for chunk in self.stub.GenerateStream(request, timeout=600):
            now, n = time.perf_counter(), len(chunk.token_ids)
            if n and ttft is None:
                ttft, last = now - sent, now
            elif n:
                itl += [(now - last) / n] * n
                last = now
            final = chunk
        with lock:
            run.tokens += final.usage.completion_tokens
            run.per_request_tps.append(final.usage.completion_tokens / (last - sent))
            run.ttft.append(ttft)
            run.itl += itl
            run.drafted += final.stats.drafted
            run.accepted += final.stats.accepted

    def drafts(self, composition: str) -> float:
        return self.metrics.registry.get_sample_value("eft_spec_decode_num_drafts_total", {"composition": composition}) or 0.0

    def logits_bytes(self) -> float:
        return sum(s.value for m in self.metrics.registry.collect() if m.name == "eft_logits_bytes" for s in m.samples if s.name.endswith("_total"))

    def timing(self) -> dict[str, tuple[float, float, int]]:
        """Per method: wall seconds, worker compute seconds, calls (both workers)."""
        totals = {}
        for method in ("extend", "draft"):
            timings = [c.timing[method] for c in self.clients]
            totals[method] = (sum(t.wall_seconds for t in timings), sum(t.compute_seconds for t in timings), sum(t.calls for t in timings))
        return totals

    def pids(self) -> dict[str, int]:
        return {"coordinator": os.getpid(), "base worker": self.processes[0].pid, "pair worker": self.processes[1].pid}

    def close(self) -> None:
        self.channel.close()
        self.server.stop(grace=None)
        self.scheduler.close()
        for process in self.processes:
            process.terminate()
            process.wait(timeout=30)


class InProcess:
    """A research loop with the up-scaling models in this process, run at its best torch
    thread count (1 or 2 here); ``_run`` generates ``max_tokens`` per prompt, ``batch`` at once."""

    def __init__(self, family_dir: Path, device: str = "cpu", models: dict | None = None):
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        self.models = models or {m: load_model(family_dir / m, dtype, device) for m in ("large-base", *PAIR_MODELS)}

    def calibrate(self, prompts: list) -> int:
        timings = {}
        for threads in (1, 2):
            self.threads = threads
            timings[threads] = self.run(prompts, 0.0, 16, len(prompts)).tps
        self.threads = max(timings, key=timings.get)
        return self.threads

    def run(self, prompts: list, temperature: float, max_tokens: int, batch: int = 1) -> Run:
        threads, coordinator = getattr(self, "threads", torch.get_num_threads()), torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return self._run(prompts, temperature, max_tokens, batch)
        finally:
            torch.set_num_threads(coordinator)


class Naive(InProcess):
    """The research loop: the oracle engine, the models called one after another for every
    token, one request at a time."""

    def __init__(self, family_dir: Path, device: str = "cpu"):
        super().__init__(family_dir, device)
        self.engine = OracleEngine(self.models, {"upscaled": COMPOSITIONS["upscaled"]})

    def _run(self, prompts: list, temperature: float, max_tokens: int, batch: int) -> Run:
        run = Run()
        started = time.perf_counter()
        for i, messages in enumerate(prompts):
            t0 = time.perf_counter()
            result = self.engine.generate("upscaled", messages, SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=i), ignore_eos=True)
            elapsed = time.perf_counter() - t0
            n = len(result.generation.tokens)
            run.tokens += n
            run.per_request_tps.append(n / elapsed)
        run.wall = time.perf_counter() - started
        return run


class BatchedLoop(InProcess):
    """What the published proxy-tuning code does: a batch of prompts, and per token the three
    models called one after another, each over one left-padded KV cache of the whole batch
    (positions from the attention mask, as Hugging Face's generate sets them), then the EFT
    combination and sampling of eft_core. Up-scaling, ``ignore_eos``."""

    composition = COMPOSITIONS["upscaled"]

    def check(self, naive: Naive, prompts: list, max_tokens: int) -> None:
        """The loop computes what the oracle does: the same greedy tokens, batched."""
        got = self._generate(prompts, SamplingBatch.from_params([SamplingParams(temperature=0)] * len(prompts)), max_tokens)
        want = [naive.engine.generate("upscaled", p, SamplingParams(temperature=0, max_tokens=max_tokens), ignore_eos=True).generation.tokens for p in prompts]
        if got != want:
            raise RuntimeError(f"the batched loop's greedy tokens differ from the oracle's for {sum(a != b for a, b in zip(got, want))} of {len(prompts)} prompts")

    def _run(self, prompts: list, temperature: float, max_tokens: int, batch: int) -> Run:
        run = Run()
        started = time.perf_counter()
        for first in range(0, len(prompts), batch):
            chunk, t0 = prompts[first : first + batch], time.perf_counter()
            self._generate(chunk, SamplingBatch.from_params([SamplingParams(temperature=temperature, seed=first + i) for i in range(len(chunk))]), max_tokens)
            elapsed = time.perf_counter() - t0
            run.tokens += len(chunk) * max_tokens
            run.per_request_tps += [max_tokens / elapsed] * len(chunk)
        run.wall = time.perf_counter() - started
        return run

    @torch.inference_mode()
    def _generate(self, prompts: list, sampling: SamplingBatch, max_tokens: int) -> list[list[int]]:
        vocab = composition_vocab_sizes([self.composition], {m: lm.tokenizer for m, lm in self.models.items()})[self.composition.name]
        state = {m: _left_padded([render_prompt(lm.tokenizer, p) for p in prompts], lm.model.device) for m, lm in self.models.items()}
        generated = []
        for _ in range(max_tokens):
            logits = {}
            for m, lm in self.models.items():
                ids, mask, cache = state[m]
                positions = (mask.cumsum(-1) - 1).clamp_min(0)[:, -ids.shape[1] :]
                logits[m] = lm.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **cache_kwargs(lm.model, cache)).logits[:, -1:].float()
            tokens, _ = sample(eft_logprobs(logits, self.composition, None, vocab)[:, 0], sampling)
            generated.append(tokens.tolist())
            for m, (_, mask, cache) in state.items():
                state[m] = (tokens[:, None].to(mask.device), torch.cat([mask, mask.new_ones(len(prompts), 1)], dim=1), cache)
        return [list(t) for t in zip(*generated)]


class BaseAlone(BatchedLoop):
    """The same loop with the large base alone: Hugging Face's own batched decoding, in
    process, the floor of up-scaling's cost."""

    composition = COMPOSITIONS["base-only"]


def _left_padded(prompts: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor, object]:
    """Input ids, attention mask and an empty KV cache for a batch of prompts, left-padded."""
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    return ids, mask, full_cache()


# --- the study ---------------------------------------------------------------------------


def spec(mode: str) -> eft_pb2.Speculation:
    if mode == "off":
        return eft_pb2.Speculation(mode=eft_pb2.SPECULATION_MODE_OFF)
    if mode == "auto":
        return eft_pb2.Speculation(mode=eft_pb2.SPECULATION_MODE_ADAPTIVE, k=4)
    return eft_pb2.Speculation(mode=eft_pb2.SPECULATION_MODE_FIXED, k=int(mode))


def questions(family, n: int) -> list:
    world = family.world()
    attributes = ("capital", "animal", "color")
    return [[{"role": "user", "content": f"what is the {attributes[i % 3]} of {world.entities[i % len(world.entities)]} ?"}] for i in range(n)]


class Study:
    def __init__(self, args):
        self.args = args
        if args.device.startswith("cuda"):  # random weights of real shapes; no cost-scaled stand-in needed
            from real_shapes import build, prompts  # beside this script

            self.family_dir = build(Path.home() / ".cache" / "eft-serve" / "bench-real-shapes")
            self.base_models, self.prompts = ("large-base",), lambda n: prompts(n)
        else:
            family = build_family()
            self.family_dir = Path(family.path)
            deep = self.family_dir / "large-base-deep"
            if not (deep / "config.json").is_file():
                print(f"building the cost-scaled base (+{DEEP_EXTRA_LAYERS} zero-output layers) ...", flush=True)
                deepen(self.family_dir / "large-base", deep, DEEP_EXTRA_LAYERS)
            self.base_models, self.prompts = BASE_MODELS, lambda n: questions(family, n)
        self.results: dict[str, list] = {}

    def record(self, key: str, value) -> None:
        self.results.setdefault(key, []).append(value)

    def measure_round(self, served: Served, naive: Naive, loop: "BatchedLoop", alone: "BaseAlone", prompts: dict) -> None:
        a = self.args
        for temperature in (0.0, 1.0):
            t = "greedy" if temperature == 0 else "t1"
            for c in a.concurrency:
                reqs = prompts[c]
                self.record(("naive", c, t), naive.run(reqs, temperature, a.max_tokens) if c == 1 or t == "greedy" else None)
                self.record(("batched_loop", c, t), loop.run(reqs, temperature, a.max_tokens, batch=c))
                self.record(("base_alone", c, t), alone.run(reqs, temperature, a.max_tokens, batch=c))
                self.record(("base_only", c, t), served.run("base-only", spec("off"), reqs, c, temperature, a.max_tokens))
                self.record(("eft", c, t), served.run("upscaled", spec("off"), reqs, c, temperature, a.max_tokens))
                for k in a.ks:
                    if c == 1 or k == a.ks[len(a.ks) // 2]:
                        self.record((f"eft_spec_k{k}", c, t), self._spec_run(served, "upscaled", str(k), reqs, c, temperature))
                self.record(("eft_spec_auto", c, t), self._spec_run(served, "upscaled", "auto", reqs, c, temperature))
        for k in ("off", *a.deep_ks, "auto") if "large-base-deep" in self.base_models else ():
            name = "deep_eft" if k == "off" else f"deep_eft_spec_{'auto' if k == 'auto' else 'k' + k}"
            self.record((name, 1, "greedy"), self._spec_run(served, "upscaled-deep", k, prompts[1], 1, 0.0))

    def _spec_run(self, served: Served, composition: str, k: str, reqs, c, temperature) -> Run:
        drafts_before = served.drafts(composition)
        timing_before = served.timing()
        run = served.run(composition, spec(k), reqs, c, temperature, self.args.max_tokens)
        run.drafts = served.drafts(composition) - drafts_before
        after = served.timing()
        run.timing = {m: tuple(x - y for x, y in zip(after[m], timing_before[m])) for m in after}
        return run


def median_run(runs: list[Run], attribute: str) -> float:
    return statistics.median(getattr(r, attribute) for r in runs if r is not None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds; medians are reported (default: %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=24, help="tokens per request (default: %(default)s)")
    parser.add_argument("--requests", type=int, default=16, help="requests per measurement (default: %(default)s)")
    parser.add_argument("--rss-requests", type=int, default=500, help="requests of the memory-growth run (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker process (default: %(default)s: two workers and the coordinator share 2 cores)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results.json"), help="results file (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="a short smoke run: 1 round, fewer requests and settings")
    parser.add_argument("--device", default="cpu", help="cpu (the demo family), or cuda: random-weight models of real shapes (bench/real_shapes.py), bfloat16")
    parser.add_argument("--concurrency", default="1,4,16", help="concurrency levels (default: %(default)s)")
    parser.add_argument("--ks", default="2,3,4,6", help="fixed draft lengths tried at concurrency 1 (default: %(default)s)")
    args = parser.parse_args()
    if args.device.startswith("cuda"):
        args.threads = None
    args.concurrency, args.ks = tuple(int(c) for c in args.concurrency.split(",")), tuple(int(k) for k in args.ks.split(","))
    args.deep_ks = ("3", "4", "6", "8")
    if args.quick:
        args.rounds, args.requests, args.rss_requests, args.concurrency, args.ks, args.deep_ks = 1, 4, 40, (1, 4), (3,), ("4",)
    study = Study(args)
    torch.set_num_threads(1)  # the coordinator, as the gateway replica sets it
    print("starting the worker processes and the coordinator ...", flush=True)
    served = Served(study.family_dir, args.threads, args.device, study.base_models)
    naive = Naive(study.family_dir, args.device)
    loop = BatchedLoop(study.family_dir, args.device, naive.models)
    alone = BaseAlone(study.family_dir, args.device, {"large-base": naive.models["large-base"]})
    prompts = {c: study.prompts(max(args.requests, c)) for c in args.concurrency}
    served.run("upscaled", spec("3"), prompts[args.concurrency[-1]], args.concurrency[-1], 0.0, 4)  # warm-up
    print(f"naive loop: {naive.calibrate(prompts[1][:4])} torch thread(s) is its fastest", flush=True)
    loop.check(naive, prompts[args.concurrency[-1]], args.max_tokens)
    print(f"batched loop: greedy tokens equal the oracle's; {loop.calibrate(prompts[args.concurrency[-1]][:4])} torch thread(s) is its fastest", flush=True)
    print(f"base alone: {alone.calibrate(prompts[args.concurrency[-1]][:4])} torch thread(s) is its fastest", flush=True)
    for r in range(args.rounds):
        print(f"round {r + 1}/{args.rounds} ...", flush=True)
        study.measure_round(served, naive, loop, alone, prompts)
    rows, table = report(study, served, naive, args)
    print(table)
    Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    print(f"wrote {args.out}")
    served.close()
    return 0


def report(study: Study, served: Served, naive: Naive, args) -> tuple[list[dict], str]:
    r = study.results
    tps = {key: median_run(runs, "tps") for key, runs in r.items() if any(runs)}
    rows, lines = [], []

    def add(name, value, unit):
        rows.append({"name": name, "value": round(float(value), 4), "unit": unit})

    lines.append(f"{'system':<20} {'c':>3} {'temp':>6} {'tok/s':>8} {'per-req':>8} {'TTFT p50':>9} {'p99':>7} {'ITL p50':>8} {'p99':>7} {'accept':>7} {'acc.len':>7}")
    for (system, c, t), runs in sorted(r.items(), key=lambda kv: (kv[0][2], kv[0][1], kv[0][0])):
        runs = [x for x in runs if x is not None]
        if not runs:
            continue
        last = runs[-1]
        ttft, itl = [v for x in runs for v in x.ttft], [v for x in runs for v in x.itl]
        drafted, accepted = sum(x.drafted for x in runs), sum(x.accepted for x in runs)
        drafts = sum(getattr(x, "drafts", 0) for x in runs)
        rate = accepted / drafted if drafted else float("nan")
        length = accepted / drafts if drafts else float("nan")
        per_request = statistics.median(v for x in runs for v in x.per_request_tps)
        lines.append(
            f"{system:<20} {c:>3} {t:>6} {tps[(system, c, t)]:>8.1f} {per_request:>8.1f} {1e3 * percentile(ttft, 0.5):>7.1f}ms {1e3 * percentile(ttft, 0.99):>5.1f}ms"
            f" {1e3 * percentile(itl, 0.5):>6.1f}ms {1e3 * percentile(itl, 0.99):>5.1f}ms {rate:>7.2f} {length:>7.2f}"
        )
        prefix = f"{system}_c{c}_{t}"
        add(f"{prefix}_tokens_per_s", tps[(system, c, t)], "tokens/s")
        add(f"{prefix}_per_request_tokens_per_s", per_request, "tokens/s")
        if ttft and last.ttft[0] is not None:
            add(f"{prefix}_ttft_p50", percentile(ttft, 0.5), "s")
            add(f"{prefix}_ttft_p99", percentile(ttft, 0.99), "s")
            add(f"{prefix}_itl_p50", percentile(itl, 0.5), "s")
            add(f"{prefix}_itl_p99", percentile(itl, 0.99), "s")
        if drafted:
            add(f"{prefix}_acceptance_rate", rate, "fraction")
            add(f"{prefix}_mean_accepted_length", length, "tokens")
    headline(study, served, tps, add, lines, args)
    memory(served, naive, study, add, lines, args)
    return rows, "\n".join(lines)


def best_spec(tps: dict, prefix: str, ks, c=1, t="greedy") -> tuple[str, float]:
    options = {k: tps.get((f"{prefix}_k{k}", c, t), 0.0) for k in ks}
    k = max(options, key=options.get)
    return k, options[k]


def headline(study: Study, served: Served, tps: dict, add, lines: list, args) -> None:
    k, spec_tps = best_spec(tps, "eft_spec", args.ks)
    eft, base = tps[("eft", 1, "greedy")], tps[("base_only", 1, "greedy")]
    runs = [x for x in study.results[(f"eft_spec_k{k}", 1, "greedy")] if x is not None]
    drafts, accepted = sum(x.drafts for x in runs), sum(x.accepted for x in runs)
    length = accepted / drafts
    draft_wall, _, _ = [sum(v) for v in zip(*(x.timing["draft"] for x in runs))]
    drafted = sum(x.drafted for x in runs)
    t_draft, t_step = draft_wall / drafted, 1.0 / eft
    ideal = (length + 1) / (1 + int(k) * t_draft / t_step)
    c16 = max(args.concurrency)
    add("eft_spec_best_k", int(k), "drafts/step")
    add("eft_spec_speedup_c1", spec_tps / eft, "ratio")
    add("eft_spec_auto_speedup_c1", tps[("eft_spec_auto", 1, "greedy")] / eft, "ratio")
    add("eft_spec_ideal_speedup", ideal, "ratio")
    add("eft_spec_efficiency", spec_tps / eft / ideal, "fraction")
    add("eft_spec_draft_step_cost", t_draft / t_step, "scoring steps")
    add("eft_vs_base_only_c1", eft / base, "ratio")
    add("eft_spec_vs_base_only_c1", spec_tps / base, "ratio")
    add(f"eft_c{c16}_vs_naive", tps[("eft", c16, "greedy")] / tps[("naive", c16, "greedy")], "ratio")
    add(f"eft_c{c16}_vs_batched_loop", tps[("eft", c16, "greedy")] / tps[("batched_loop", c16, "greedy")], "ratio")
    add("eft_c1_vs_batched_loop", eft / tps[("batched_loop", 1, "greedy")], "ratio")
    add("naive_c1_vs_eft_c1", tps[("naive", 1, "greedy")] / eft, "ratio")
    lines.append("")
    lines.append(f"speculation at c=1, greedy: best fixed k={k}: {spec_tps:.1f} tok/s vs eft {eft:.1f} -> {spec_tps / eft:.2f}x;"
                 f" ideal (L+1)/(1+k*t_draft/t_step) = ({length:.2f}+1)/(1+{k}*{t_draft * 1e3:.2f}ms/{t_step * 1e3:.2f}ms) = {ideal:.2f}x; efficiency {spec_tps / eft / ideal:.2f}")
    if ("deep_eft", 1, "greedy") in tps:
        cost_scaled(tps, add, lines, args)
    lines.append(f"eft / base_only (c=1): {eft / base:.2f}; eft_spec / base_only: {spec_tps / base:.2f}; eft c={c16} / naive c={c16}: {tps[('eft', c16, 'greedy')] / tps[('naive', c16, 'greedy')]:.2f}")
    lines.append(f"eft / batched_loop (the proxy-tuning loop, in process): c=1 {eft / tps[('batched_loop', 1, 'greedy')]:.2f}, c={c16} {tps[('eft', c16, 'greedy')] / tps[('batched_loop', c16, 'greedy')]:.2f}")
    overhead(study, add, lines, c16)
    never_loses(tps, add, lines)
    alone = tps[("base_alone", c16, "greedy")]
    add(f"eft_c{c16}_vs_base_alone", tps[("eft", c16, "greedy")] / alone, "ratio")
    lines.append(f"eft c={c16} / the base alone in process at batch {c16} ({alone:.0f} tok/s): {tps[('eft', c16, 'greedy')] / alone:.2f}")
    transport(served, study.prompts(1) * 4, add, lines)


def overhead(study: Study, add, lines: list, c16: int) -> None:
    """Served eft's iteration overhead: wall time minus the slowest worker's compute."""
    parts = []
    for c in (1, c16):
        runs = [x for x in study.results[("eft", c, "greedy")] if x is not None]
        per_iteration = statistics.median(x.overhead_per_iteration for x in runs)
        share = sum(x.overhead for x in runs) / sum(x.wall for x in runs)
        add(f"eft_iteration_overhead_c{c}", per_iteration, "s")
        add(f"eft_iteration_overhead_share_c{c}", share, "fraction of wall time")
        parts.append(f"c={c} {per_iteration * 1e3:.2f} ms ({share:.0%} of wall time)")
    lines.append("eft iteration overhead (wall minus the slowest worker's compute per phase): " + ", ".join(parts))


def never_loses(tps: dict, add, lines: list) -> None:
    """Adaptive speculation against the best of speculation off and every fixed k, per cell."""
    worst = None
    for (system, c, t), auto in sorted(tps.items()):
        if not system.endswith("eft_spec_auto"):
            continue
        family = system.removesuffix("_spec_auto")
        others = {s: v for (s, cc, tt), v in tps.items() if (cc, tt) == (c, t) and (s == family or s.startswith(family + "_spec_k"))}
        best = max(others, key=others.get)
        ratio = auto / others[best]
        add(f"{system}_vs_best_c{c}_{t}", ratio, "ratio")
        if worst is None or ratio < worst[0]:
            worst = (ratio, f"{system} c={c} {t} vs {best}")
    if worst:
        add("eft_spec_auto_vs_best_min", worst[0], "ratio")
        lines.append(f"adaptive speculation / the best of off and every fixed k: worst cell {worst[0]:.2f} ({worst[1]})")


def cost_scaled(tps: dict, add, lines: list, args) -> None:
    dk, deep_spec = best_spec(tps, "deep_eft_spec", args.deep_ks)
    deep_auto = tps.get(("deep_eft_spec_auto", 1, "greedy"), 0.0)
    deep_eft = tps[("deep_eft", 1, "greedy")]
    add("eft_spec_speedup_costscaled_c1", max(deep_spec, deep_auto) / deep_eft, "ratio")
    add("eft_spec_costscaled_best", int(dk) if deep_spec >= deep_auto else 0, "drafts/step (0: adaptive)")
    lines.append(f"cost-scaled base (+{DEEP_EXTRA_LAYERS} layers): eft {deep_eft:.1f} tok/s, best spec k={dk} {deep_spec:.1f}, auto {deep_auto:.1f} -> {max(deep_spec, deep_auto) / deep_eft:.2f}x")


def transport(served: Served, prompts: list, add, lines) -> None:
    """Wire bytes per token per model and the transport share, from a fresh eft run."""
    before_bytes, before = served.logits_bytes(), served.timing()
    run = served.run("upscaled", spec("off"), prompts, 1, 0.0, 16)
    after_bytes, after = served.logits_bytes(), served.timing()
    scored_models = len(COMPOSITIONS["upscaled"].scored_models)
    per_token = (after_bytes - before_bytes) / run.tokens / scored_models
    wall = sum(after[m][0] - before[m][0] for m in after)
    compute = sum(after[m][1] - before[m][1] for m in after)
    add("wire_bytes_per_token_per_model", per_token, "bytes")
    add("transport_share_of_worker_calls", 1 - compute / wall, "fraction")
    step = 1.0 / run.tps
    add("transport_share_of_step", (wall - compute) / run.tokens / step, "fraction")
    lines.append(f"wire: {per_token:.0f} bytes of logits per token per model; transport + (de)serialisation: {1 - compute / wall:.0%} of worker-call time, {(wall - compute) / run.tokens / step:.0%} of a decode step")


def memory(served: Served, naive: Naive, study: Study, add, lines: list, args) -> None:
    pids = served.pids()
    before = {name: rss_bytes(pid) / 1024 for name, pid in pids.items()}
    reqs = study.prompts(args.rss_requests)
    served.run("upscaled", spec("3"), reqs, 16, 1.0, 8)
    after = {name: rss_bytes(pid) / 1024 for name, pid in pids.items()}
    growth = {name: (after[name] - before[name]) / before[name] for name in pids}
    for name, pid in pids.items():
        add(f"peak_rss_{name.replace(' ', '_')}", rss_bytes(pid, "VmHWM") / 2**20, "MiB")
    add(f"rss_growth_{args.rss_requests}", max(growth.values()), "fraction")
    lines.append("memory: " + ", ".join(f"{n} {before[n] / 1024:.0f} -> {after[n] / 1024:.0f} MiB ({growth[n]:+.1%})" for n in pids) + f" over {args.rss_requests} requests (peak: " + ", ".join(f"{n} {rss_bytes(p, 'VmHWM') / 2**20:.0f} MiB" for n, p in pids.items()) + ")")


if __name__ == "__main__":
    sys.exit(main())
