"""The coordinator's cost per iteration at real vocabularies and batch sizes (`make bench`).

The real ``Engine.step`` runs against workers that answer at once with logits of real
shapes: each answer is a serialized ``ExtendResponse`` / ``DraftResponse`` made once, and
every call parses and decodes it through the real wire path (``convert``), so a step costs
what the coordinator does per iteration: building the calls, decoding the logits, and the
decide phase (combine, filters, sampling or acceptance, rewards, logprobs, emitting).

Beside each figure, in the same run, the **floor**: one read of the iteration's decoded
logits (``torch.sum`` over each). ``decide_over_floor`` = step time / floor.

Grid: up-scaling (3 scored models) and two-delta mixing (4), V in {32000, 128256, 151936},
B in {1, 8, 32, 64}, greedy / sampled (T = 1, top_p 0.9) / speculative k = 4 (greedy and
sampled). One torch thread, as the coordinator runs.

    python bench/decide.py [--vocab 32000,128256,151936] [--batch 1,8,32,64] [--iterations N] [--logits-dtype bfloat16] [--out FILE]
"""

import os

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as the gateway replica runs (cluster/app.py); read when torch first allocates

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import statistics
import sys
import time
from pathlib import Path

import torch

from eft_core import Composition, Delta, SamplingBatch, SamplingParams
from eft_core.sampling import draft_distribution
from services.coordinator.engine import Engine, EngineRequest, pools_of
from services.pb.eft.v1 import worker_pb2
from services.wire import DTYPE_NAMES
from services.worker import convert
from services.worker.api import Drafted, DraftQ, Extended

COMPOSITIONS = {
    "upscaled": Composition("upscaled", "base", (Delta("chat", "tuned", "reference"),), "tuned"),
    "mixed": Composition("mixed", "base", (Delta("chat", "tuned", "reference"), Delta("safe", "safe", "reference")), "tuned"),
}
MODES = {  # name: (sampling, draft k)
    "greedy": (SamplingParams(temperature=0, max_tokens=1 << 30), 0),
    "sampled": (SamplingParams(temperature=1.0, top_p=0.9, max_tokens=1 << 30), 0),
    "spec_greedy": (SamplingParams(temperature=0, max_tokens=1 << 30), 4),
    "spec_sampled": (SamplingParams(temperature=1.0, top_p=0.9, max_tokens=1 << 30), 4),
}
PROMPT = 16


class InstantWorker:
    """Answers Extend and Draft at once with answers of the asked shape (serialized once per
    shape, parsed and decoded on every call), keeping each session's length as a worker does:
    Extend with logits in ``dtype``, Draft with the q its drafts were drawn from (sparse
    where it is, as a worker sends it)."""

    def __init__(self, vocab: int, seed: int, dtype: torch.dtype = torch.float32):
        self.vocab, self.seed, self.dtype, self.lengths, self.encoded = vocab, seed, dtype, {}, {}
        self.received: list[torch.Tensor] = []  # the tensors of the latest calls: the floor reads them
        self.received_bytes = 0  # tensor bytes received, over all calls
        self.decoders = {
            "extend": convert.raw_decoder(worker_pb2.ExtendResponse, convert.extended_from_proto, convert.EXTEND_TENSORS),
            "draft": convert.raw_decoder(worker_pb2.DraftResponse, convert.drafted_from_proto, convert.DRAFT_TENSORS),
        }

    def start(self, method, items, timeout=None):
        answers = self._answers(method, items)
        tensors = [t for a in answers for t in ((a.logits,) if method == "extend" else (a.q.at_drafts, a.q.dense, a.q.indices, a.q.values)) if t is not None]
        self.received += tensors
        self.received_bytes += sum(t.nbytes for t in tensors)
        return _Now(answers)

    def release(self, session_ids, timeout=None):
        for key in [k for k in self.lengths if k[0] in set(session_ids)]:
            del self.lengths[key]
        return 0

    def info(self, timeout=None):
        raise NotImplementedError

    def _answers(self, method: str, items) -> list:
        positions = [item.num_logits if method == "extend" else item.num_draft for item in items]
        sampling = None if method == "extend" else items[0].sampling  # a cell's requests share their sampling
        key = (method, tuple(positions), sampling)
        if key not in self.encoded:
            self.encoded[key] = self._encode(method, positions, sampling)
        answers, _ = self.decoders[method](self.encoded[key])  # as GrpcWorkerClient decodes what gRPC received
        lengths = [self._advance(item, method) for item in items]
        if method == "extend":
            return [Extended(a.logits, n) for a, n in zip(answers, lengths)]
        return [Drafted(a.draft_tokens, a.q, n) for a, n in zip(answers, lengths)]

    def _encode(self, method: str, positions: list[int], sampling) -> bytes:
        generator = torch.Generator().manual_seed(self.seed + len(positions))
        logits = [lm_like_logits(n, self.vocab, generator) for n in positions]
        if method == "extend":
            return convert.extend_response([Extended(t.to(self.dtype), 0) for t in logits]).SerializeToString()
        drafts = [t.argmax(dim=-1) for t in logits]  # a token every q keeps
        if sampling.greedy:
            qs = [DraftQ.one_hot(d) for d in drafts]
        else:
            qs = [DraftQ.of(draft_distribution(t.to(self.dtype), SamplingBatch.from_params([sampling] * len(t))), d) for t, d in zip(logits, drafts)]
        return convert.draft_response([Drafted(d.tolist(), q, 0) for d, q in zip(drafts, qs)]).SerializeToString()

    def _advance(self, item, method: str) -> int:
        key = (item.session_id, item.model)
        kept = item.truncate_to if item.truncate_to is not None else self.lengths.get(key, 0)
        self.lengths[key] = kept + len(item.token_ids) + (item.num_draft - 1 if method == "draft" else 0)
        return self.lengths[key]


def lm_like_logits(positions: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    """Logits shaped like a language model's: a noise floor over the vocabulary and a head of
    40 likely tokens per position (boosted 16 down to 8), so a top-p 0.9 nucleus holds tens
    to a few hundred tokens, as real models' do (uniform noise would make it thousands)."""
    logits = 2 * torch.randn(positions, vocab, generator=generator)
    head = torch.randint(0, vocab, (positions, 40), generator=generator)
    return logits.scatter_add_(-1, head, torch.linspace(16, 8, 40).expand(positions, -1))


class _Now:
    def __init__(self, answers):
        self.answers, self.compute_seconds = answers, 0.0  # answers made before the call: no compute to wait for

    def result(self):
        return self.answers


def measure(composition: Composition, vocab: int, batch: int, mode: str, iterations: int, dtype: torch.dtype = torch.float32, device: str = "cpu", tokens: list | None = None) -> dict:
    """One cell; ``tokens``, when given, receives each request's tokens (to compare devices)."""
    params, k = MODES[mode]
    workers = {m: InstantWorker(vocab, i, dtype) for i, m in enumerate(composition.models)}
    engine = Engine(pools_of(workers), {composition.name: vocab}, device=device)
    requests = [EngineRequest(f"r{i}", composition, {m: list(range(3, 3 + PROMPT)) for m in composition.models}, params, composition.weights(), k) for i in range(batch)]
    engine.step(requests)  # prefill: not measured
    steps, floors, faults, emitted, received_bytes = [], [], [], 0, 0
    for iteration in range(iterations + 1):  # the first is a warm-up
        for worker in workers.values():
            worker.received.clear()
        faults_before, tokens_before, bytes_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, sum(len(r.tokens) for r in requests), sum(w.received_bytes for w in workers.values())
        started = time.perf_counter()
        engine.step(requests)
        steps.append(time.perf_counter() - started)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before)
        if iteration:
            emitted += sum(len(r.tokens) for r in requests) - tokens_before
            received_bytes += sum(w.received_bytes for w in workers.values()) - bytes_before
        received = [t for w in workers.values() for t in w.received]
        started = time.perf_counter()
        for tensor in received:
            torch.sum(tensor)
        floors.append(time.perf_counter() - started)
    if tokens is not None:
        tokens += [r.tokens for r in requests]
    getattr(engine, "close", lambda: None)()
    step, floor = statistics.median(steps[1:]), statistics.median(floors[1:])
    return {
        "composition": composition.name, "vocab": vocab, "batch": batch, "mode": mode, "logits_dtype": str(dtype).removeprefix("torch."), "device": device,
        "step_ms": 1e3 * step, "floor_ms": 1e3 * floor, "decide_over_floor": step / floor, "page_faults": int(statistics.median(faults[1:])),
        "wire_bytes_per_token": received_bytes / max(emitted, 1),
    }  # fmt: skip


TARGETS = {"greedy": 3.0, "sampled": 4.0, "spec_greedy": 5.0, "spec_sampled": 5.0}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", default="32000,128256,151936", help="vocabulary sizes (default: %(default)s)")
    parser.add_argument("--batch", default="1,8,32,64", help="batch sizes (default: %(default)s)")
    parser.add_argument("--modes", default=",".join(MODES), help="modes (default: %(default)s)")
    parser.add_argument("--compositions", default=",".join(COMPOSITIONS), help="(default: %(default)s)")
    parser.add_argument("--iterations", type=int, default=3, help="timed iterations per cell; the median is reported (default: %(default)s)")
    parser.add_argument("--logits-dtype", choices=sorted(DTYPE_NAMES), default="float32", help="the models' logits dtype, as they travel (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="where the decide phase runs, the engine's device option (default: %(default)s); the floor stays a CPU read of what arrived")
    parser.add_argument("--out", default=str(Path(__file__).parent / "decide-results.json"), help="results file (default: %(default)s)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cells = []
    dtype = DTYPE_NAMES[args.logits_dtype]
    print(f"{'composition':<10} {'V':>7} {'B':>3} {'mode':<13} {'step ms':>9} {'floor ms':>9} {'over floor':>10} {'faults':>8} {'wire B/token':>12}  target")
    for name in args.compositions.split(","):
        for vocab in map(int, args.vocab.split(",")):
            for batch in map(int, args.batch.split(",")):
                for mode in args.modes.split(","):
                    cell = measure(COMPOSITIONS[name], vocab, batch, mode, args.iterations, dtype, args.device)
                    cell["target"] = TARGETS[mode] if batch >= 8 else None
                    cell["met"] = None if cell["target"] is None else cell["decide_over_floor"] <= cell["target"]
                    cells.append(cell)
                    verdict = "" if cell["target"] is None else f"<= {cell['target']:.0f} {'yes' if cell['met'] else 'NO'}"
                    print(f"{name:<10} {vocab:>7} {batch:>3} {mode:<13} {cell['step_ms']:>9.1f} {cell['floor_ms']:>9.2f} {cell['decide_over_floor']:>10.1f} {cell['page_faults']:>8} {cell['wire_bytes_per_token']:>12.0f}  {verdict}", flush=True)
    Path(args.out).write_text(json.dumps(cells, indent=1))
    judged = [c for c in cells if c["met"] is not None]
    print(f"targets met in {sum(c['met'] for c in judged)} of {len(judged)} cells (B >= 8); written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
