"""The EFT decoding engine over model workers: every active request advances one step per
iteration, with one batched call per worker, issued concurrently.

Per iteration:

1. **draft**: requests that speculate ask their drafter for k tokens (one Draft call per
   drafter worker, for all of them);
2. **score**: every request sends each scored model the tokens its cache lacks, plus the
   drafts, asking for the last k + 1 logits (one Extend call per worker, for all requests);
3. **decide**: per request, eft_core combines the logits, then samples one token (k = 0)
   or accepts a prefix of the drafts plus a recovered or bonus token;
4. **roll back**: caches that hold rejected drafts are truncated by the cache's next call
   (``truncate_to``, no call of its own); finished requests release every session they held.

Requests that do not speculate wait for the draft call in iterations where others
speculate: one batched scoring call per worker per iteration costs the base model less than
two smaller ones would, and the draft call is short next to a scoring call of a larger base.

Sessions on workers: ``<request id>`` for the scored models, ``<request id>#draft`` for the
drafter (a drafter that is also a scored model keeps two caches: simple, and cheap for the
small model that drafts).
"""

import logging
import time
from collections import defaultdict
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from eft_core import Composition, EFTError, SamplingBatch, SamplingParams, SpeculationStats, UnavailableError, accept_drafts, eft_logprobs, implicit_rewards, sample
from eft_core.draft_length import AcceptanceEstimate, best_draft_k
from eft_core.sampling import sampling_probs, seeded_generator
from services.worker.api import DraftItem, ExtendItem
from services.worker.client import WorkerClient


@dataclass
class EngineRequest:
    """One generation in flight, and what the workers' caches hold of it."""

    id: str
    composition: Composition
    prompts: dict[str, list[int]]  # per model: its rendered prompt
    params: SamplingParams
    weights: tuple[float, ...]
    draft_k: int = 0  # drafts per step; 0: no speculation
    adaptive: bool = False  # let draft_k follow the running acceptance (eft_core.draft_length)
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    rewards: list[list[float]] = field(default_factory=list)
    finish_reason: str | None = None
    error: EFTError | None = None
    stats: SpeculationStats = field(default_factory=SpeculationStats)
    acceptance: AcceptanceEstimate = field(default_factory=AcceptanceEstimate)
    unsent: dict[str, list[int]] = field(default_factory=dict)  # session key -> tokens its cache lacks
    cached: dict[str, int] = field(default_factory=dict)  # session key -> tokens its cache holds (after pending rollbacks)
    rollback: dict[str, int] = field(default_factory=dict)  # session key -> length to truncate to, sent with its next call
    placement: dict[str, WorkerClient] = field(default_factory=dict)  # model -> the replica holding its caches

    def __post_init__(self):
        self.generator = seeded_generator(self.params.seed) if self.params.seed is not None else None
        self.sampling = SamplingBatch.from_params([self.params], {0: self.generator} if self.generator else {})
        for model in self.composition.scored_models:
            self.unsent[model] = list(self.prompts[model])
        if self.draft_k:
            self.unsent[_DRAFT] = list(self.prompts[self.composition.drafter_model])

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def next_k(self) -> int:
        return min(self.draft_k, self.params.max_tokens - len(self.tokens) - 1)


log = logging.getLogger(__name__)
_DRAFT = "#draft"  # session key of the drafter's cache
MAX_ADAPTIVE_K = 8
INITIAL_DRAFT_COST = 0.25  # until measured: a drafter a few times cheaper than scoring


class Engine:
    """``workers`` maps each model to the client of the worker hosting it, or to a list of
    clients, one per replica of its worker group (models of one group share one list).
    A request is placed on one replica per group when it starts and stays there;
    ``set_replicas`` changes a group's replicas for the requests placed afterwards."""

    def __init__(self, workers: Mapping[str, WorkerClient | list[WorkerClient]], vocab_size: int, logits_dtype: torch.dtype = torch.float32, metrics=None):
        self.replicas = {m: w if isinstance(w, list) else [w] for m, w in workers.items()}
        self.vocab_size, self.logits_dtype = vocab_size, logits_dtype
        self.metrics = metrics  # services.metrics.ServingMetrics, or None
        self.pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="engine-call")
        self.load: dict[WorkerClient, int] = defaultdict(int)  # requests placed on each replica
        self.draft_cost = INITIAL_DRAFT_COST  # one draft step, in scoring calls (measured, smoothed)

    def step(self, requests: list[EngineRequest]) -> None:
        """Advance every unfinished request by one iteration."""
        for r in requests:
            if not r.done and not r.placement:
                self._place(r)
        active = [r for r in requests if not r.done]
        ks = {r.id: r.next_k() for r in active}
        started = time.perf_counter()
        drafted = self._draft([r for r in active if ks[r.id] > 0], ks)
        drafted_at = time.perf_counter()
        scored = self._score([r for r in active if not r.done], drafted)
        if drafted:
            self._measure_draft_cost(drafted_at - started, time.perf_counter() - drafted_at, max(ks[i] for i in drafted))
        for r in active:
            if not r.done:
                emitted = self._decide(r, scored[r.id], drafted.get(r.id))
                if not r.done:
                    self._roll_back(r, drafted.get(r.id, ([], None))[0], emitted)
        self.release([r for r in active if r.done])

    def release(self, requests: list[EngineRequest]) -> None:
        """Free every worker session the requests hold (idempotent). A worker that cannot be
        reached is logged and skipped: its sessions died with it, or its own idle handling
        frees them."""
        by_client = defaultdict(list)
        for r in requests:
            for client in dict.fromkeys(r.placement.values()):
                by_client[client] += [r.id, r.id + _DRAFT]
                self.load[client] -= 1
                if self.load[client] <= 0:
                    del self.load[client]
            r.placement = {}
            r.cached.clear()
        for client, future in [(client, self.pool.submit(client.release, ids)) for client, ids in by_client.items()]:
            try:
                future.result()
            except EFTError as error:
                log.warning("could not release %d sessions on %s: %s", len(by_client[client]), client, error)

    def set_replicas(self, models: list[str], clients: list[WorkerClient]) -> None:
        """The replicas of the worker group hosting ``models`` are now ``clients`` (called from
        another thread: the mapping is replaced whole, never changed in place)."""
        replicas, shared = dict(self.replicas), list(clients)
        for model in models:
            replicas[model] = shared
        self.replicas = replicas

    def _place(self, r: EngineRequest) -> None:
        """One replica per worker group for the request's models: the least loaded.
        A group with no replica running fails the request with UNAVAILABLE."""
        replicas, chosen = self.replicas, {}
        for model in r.composition.models:
            group = replicas[model]
            if not group:
                r.placement.clear()
                r.error, r.finish_reason = UnavailableError(f"no replica of the worker group hosting {model!r} is running; retry later"), "error"
                return
            if id(group) not in chosen:
                chosen[id(group)] = min(group, key=lambda client: self.load.get(client, 0))
            r.placement[model] = chosen[id(group)]
        for client in dict.fromkeys(r.placement.values()):
            self.load[client] += 1

    # --- the phases ----------------------------------------------------------------------

    def _draft(self, requests: list[EngineRequest], ks: dict[str, int]) -> dict[str, tuple[list[int], torch.Tensor]]:
        calls = defaultdict(list)
        for r in requests:
            drafter = r.composition.drafter_model
            calls[r.placement[drafter]].append((r, DraftItem(r.id + _DRAFT, drafter, r.unsent[_DRAFT], ks[r.id], r.params, r.rollback.pop(_DRAFT, None))))
        results = {}
        for (r, _), answer in self._call_all(calls, "draft", lambda client, items: client.draft(items, self.logits_dtype)):
            results[r.id] = (answer.draft_tokens, answer.logits)
            r.cached[_DRAFT] = answer.cache_length
        return results

    def _score(self, requests: list[EngineRequest], drafted) -> dict[str, dict[str, torch.Tensor]]:
        calls = defaultdict(list)
        for r in requests:
            drafts = drafted.get(r.id, ([], None))[0]
            for model in r.composition.scored_models:
                calls[r.placement[model]].append((r, ExtendItem(r.id, model, r.unsent[model] + drafts, len(drafts) + 1, r.rollback.pop(model, None))))
        results = defaultdict(dict)
        for (r, item), answer in self._call_all(calls, "extend", lambda client, items: client.extend(items, self.logits_dtype)):
            results[r.id][item.model] = answer.logits
            r.cached[item.model] = answer.cache_length
        return results

    def _decide(self, r: EngineRequest, logits: dict[str, torch.Tensor], drafted) -> list[int]:
        """Sample (no drafts) or accept drafts; emit the tokens; return them."""
        per_model = {m: t.float()[None] for m, t in logits.items()}  # [1, k + 1, vocab]
        target = eft_logprobs(per_model, r.composition, r.weights, self.vocab_size)[0]  # [k + 1, vocab]
        nucleus = torch.log_softmax(per_model[r.composition.nucleus_model][0, :, : self.vocab_size], dim=-1)
        if drafted is None:
            emitted = [int(sample(target, r.sampling, nucleus)[0][0])]
        else:
            emitted = self._accept(r, target, nucleus, *drafted)
        self._emit(r, emitted, target, per_model)
        return emitted
    def _accept(self, r: EngineRequest, target, nucleus, drafts: list[int], draft_logits: torch.Tensor) -> list[int]:
        k = len(drafts)
        target_probs = sampling_probs(target, r.sampling.rows_of([0] * (k + 1)), nucleus)
        draft_probs = sampling_probs(torch.log_softmax(draft_logits.float(), dim=-1), r.sampling.rows_of([0] * k))
        result = accept_drafts(torch.tensor([drafts]), torch.tensor([k]), draft_probs[None], target_probs[None], r.sampling.generators)
        accepted = int(result.num_accepted[0])
        r.stats.observe_draft(k, accepted)
        r.acceptance.observe(k, accepted)
        if self.metrics is not None:
            self.metrics.observe_draft(r.composition.name, k, accepted)
        if r.adaptive:
            r.draft_k = best_draft_k(r.acceptance.rate, self.draft_cost, MAX_ADAPTIVE_K)
        return result.emitted(0)

    def _measure_draft_cost(self, draft_s: float, score_s: float, k: int) -> None:
        """One draft step's cost in scoring calls, from this iteration's phases (smoothed)."""
        if score_s > 0:
            self.draft_cost = 0.8 * self.draft_cost + 0.2 * (draft_s / k) / score_s

    def _emit(self, r: EngineRequest, emitted: list[int], target: torch.Tensor, per_model: dict[str, torch.Tensor]) -> None:
        """Append the tokens (their logprobs and implicit rewards computed at once) until a stop."""
        n = len(emitted)
        tokens = torch.tensor([emitted])
        logprobs = target[torch.arange(n), tokens[0]].tolist()
        rewards = implicit_rewards({m: t[:, :n] for m, t in per_model.items()}, r.composition, tokens, self.vocab_size)[0].tolist()
        for token, logprob, reward in zip(emitted, logprobs, rewards):
            r.tokens.append(token)
            r.logprobs.append(logprob)
            r.rewards.append(reward)
            if token in r.params.stop_token_ids:
                r.finish_reason = "stop"
            elif len(r.tokens) >= r.params.max_tokens:
                r.finish_reason = "length"
            if r.done:
                return

    def _roll_back(self, r: EngineRequest, drafts: list[int], emitted: list[int]) -> None:
        """Keep the accepted drafts in every cache; the last emitted token is sent next time.
        Rejected drafts are cut by a rollback that rides on each cache's next call."""
        k, accepted, last = len(drafts), len(emitted) - 1, emitted[-1]
        for model in r.composition.scored_models:  # they hold all k drafts
            self._keep(r, model, r.cached[model] - k + accepted)
            r.unsent[model] = [last]
        if r.draft_k and k:  # the drafter holds k - 1 drafts: its last one was never fed
            fed = k - 1
            self._keep(r, _DRAFT, r.cached[_DRAFT] - fed + min(accepted, fed))
            r.unsent[_DRAFT] = ([drafts[-1]] if accepted == k else []) + [last]
        elif r.draft_k:
            r.unsent[_DRAFT] = r.unsent[_DRAFT] + [last]

    @staticmethod
    def _keep(r: EngineRequest, key: str, length: int) -> None:
        if length < r.cached[key]:
            r.cached[key] = length
            r.rollback[key] = min(length, r.rollback.get(key, length))

    def _call_all(self, calls: dict, method: str, call):
        """One call per worker, concurrently; a failed call fails just its requests."""
        futures = {client: self.pool.submit(self._timed, method, call, client, [item for _, item in batch]) for client, batch in calls.items()}
        for client, future in futures.items():
            try:
                answers = future.result()
            except EFTError as error:
                for r, _ in calls[client]:
                    r.error, r.finish_reason = error, "error"
                continue
            yield from zip(calls[client], answers)

    def _timed(self, method: str, call, client: WorkerClient, items: list):
        started = time.perf_counter()
        answers = call(client, items)
        if self.metrics is not None:
            logits_bytes = sum(a.logits.nbytes for a in answers)
            self.metrics.observe_worker_call(getattr(client, "address", "in-process"), method, time.perf_counter() - started, len(items), logits_bytes)
        return answers
