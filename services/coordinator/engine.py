"""The EFT decoding engine over model workers: every active request advances one step per
iteration, with one batched call per worker, issued concurrently.

Per iteration:

1. **draft**: requests that speculate ask their drafter for k tokens (one Draft call per
   drafter worker, for all of them);
2. **score**: every request sends each scored model the tokens its cache lacks, plus the
   drafts, asking for the last k + 1 logits (one Extend call per worker, for all requests);
3. **decide**: eft_core combines the logits, then samples one token for the requests that
   do not speculate (one batch per composition) or, per speculating request, accepts a
   prefix of its drafts plus a recovered or bonus token;
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
INITIAL_DRAFT_COST = 0.25  # until measured: a drafter a few times cheaper than an iteration


class Engine:
    """``workers`` maps each model to the client of the worker hosting it, or to a list of
    clients, one per replica of its worker group (models of one group share one list).
    A request is placed on one replica per group when it starts and stays there;
    ``set_replicas`` changes a group's replicas for the requests placed afterwards.
    ``vocab_sizes``: the vocabulary each composition's models share, by composition name
    (compositions of different tokenizer families may be served together)."""

    def __init__(self, workers: Mapping[str, WorkerClient | list[WorkerClient]], vocab_sizes: Mapping[str, int], logits_dtype: torch.dtype = torch.float32, metrics=None):
        self.replicas = {m: w if isinstance(w, list) else [w] for m, w in workers.items()}
        self.vocab_sizes, self.logits_dtype = dict(vocab_sizes), logits_dtype
        self.metrics = metrics  # services.metrics.ServingMetrics, or None
        self.pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="engine-call")
        self.load: dict[WorkerClient, int] = defaultdict(int)  # requests placed on each replica
        self.draft_cost = INITIAL_DRAFT_COST  # one draft step, in plain iterations (measured, smoothed)

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
        sampled = self._sample_all([r for r in active if not r.done and r.id not in drafted], scored)
        for r in active:
            if not r.done:
                emitted = self._accept_drafts(r, scored[r.id], drafted[r.id]) if r.id in drafted else sampled[r.id]
                if not r.done:
                    self._roll_back(r, drafted.get(r.id, ([], None))[0], emitted)
        self.release([r for r in active if r.done])
        if drafted:
            self._measure_draft_cost(drafted_at - started, time.perf_counter() - drafted_at, max(ks[i] for i in drafted))

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
        for (r, item), answer in self._call_all(calls, "draft"):
            if self._cache_kept(r, _DRAFT, len(item.token_ids) + item.num_draft - 1, answer.cache_length):
                results[r.id] = (answer.draft_tokens, answer.logits)
        return results

    def _score(self, requests: list[EngineRequest], drafted) -> dict[str, dict[str, torch.Tensor]]:
        calls = defaultdict(list)
        for r in requests:
            drafts = drafted.get(r.id, ([], None))[0]
            for model in r.composition.scored_models:
                calls[r.placement[model]].append((r, ExtendItem(r.id, model, r.unsent[model] + drafts, len(drafts) + 1, r.rollback.pop(model, None))))
        results = defaultdict(dict)
        for (r, item), answer in self._call_all(calls, "extend"):
            if self._cache_kept(r, item.model, len(item.token_ids), answer.cache_length):
                results[r.id][item.model] = answer.logits
        return results

    @staticmethod
    def _cache_kept(r: EngineRequest, key: str, added: int, length: int) -> bool:
        """Record a cache's new length; a length other than the one expected means the worker
        lost the cache (freed as idle, or a new replica at the same address) and answered
        from a fresh one: fail the request rather than emit tokens from a wrong context."""
        expected = r.cached.get(key, 0) + added
        r.cached[key] = length
        if length != expected and not r.done:
            r.error, r.finish_reason = UnavailableError(f"the worker lost this request's cache for {key!r} (it holds {length} tokens, {expected} expected); retry the request"), "error"
        return not r.done

    def _sample_all(self, requests: list[EngineRequest], scored) -> dict[str, list[int]]:
        """One token per request that does not speculate: combined, sampled and emitted as one
        batch per composition (per-row weights, sampling settings and generators)."""
        groups = defaultdict(list)
        for r in requests:
            groups[r.composition.name].append(r)
        sampled = {}
        for rows in groups.values():
            composition = rows[0].composition
            vocab = self.vocab_sizes[composition.name]
            per_model = {m: torch.stack([scored[r.id][m].float() for r in rows]) for m in composition.scored_models}  # [B, 1, vocab]
            weights = torch.tensor([list(r.weights) for r in rows], dtype=torch.float32).reshape(len(rows), len(composition.deltas))
            target = eft_logprobs(per_model, composition, weights, vocab)  # [B, 1, vocab]
            nucleus = torch.log_softmax(per_model[composition.nucleus_model][:, 0, :vocab], dim=-1)
            batch = SamplingBatch.from_params([r.params for r in rows], {i: r.generator for i, r in enumerate(rows) if r.generator is not None})
            tokens, _ = sample(target[:, 0], batch, nucleus)
            rewards = implicit_rewards(per_model, composition, tokens[:, None], vocab)  # [B, 1, deltas]
            logprobs = target[:, 0].gather(-1, tokens[:, None])[:, 0]
            for i, r in enumerate(rows):
                sampled[r.id] = [int(tokens[i])]
                self._emit(r, sampled[r.id], [float(logprobs[i])], rewards[i].tolist())
        return sampled

    def _accept_drafts(self, r: EngineRequest, logits: dict[str, torch.Tensor], drafted) -> list[int]:
        """Accept a prefix of the request's drafts plus a recovered or bonus token; emit them."""
        vocab = self.vocab_sizes[r.composition.name]
        per_model = {m: t.float()[None] for m, t in logits.items()}  # [1, k + 1, vocab]
        target = eft_logprobs(per_model, r.composition, r.weights, vocab)[0]  # [k + 1, vocab]
        nucleus = torch.log_softmax(per_model[r.composition.nucleus_model][0, :, :vocab], dim=-1)
        emitted = self._accept(r, target, nucleus, *drafted)
        n = len(emitted)
        tokens = torch.tensor([emitted])
        rewards = implicit_rewards({m: t[:, :n] for m, t in per_model.items()}, r.composition, tokens, vocab)[0]
        self._emit(r, emitted, target[torch.arange(n), tokens[0]].tolist(), rewards.tolist())
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

    def _measure_draft_cost(self, draft_s: float, rest_s: float, k: int) -> None:
        """One draft step's cost in plain iterations (scoring, deciding, rolling back: all an
        iteration does besides drafting), from this iteration's phases (smoothed)."""
        if rest_s > 0:
            self.draft_cost = 0.8 * self.draft_cost + 0.2 * (draft_s / k) / rest_s

    @staticmethod
    def _emit(r: EngineRequest, emitted: list[int], logprobs: list[float], rewards: list[list[float]]) -> None:
        """Append the tokens, their logprobs and implicit rewards, until a stop."""
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

    def _call_all(self, calls: dict, method: str):
        """One call per worker, all started before any is awaited; a failed call fails just
        its requests."""
        started = time.perf_counter()
        pending = {client: client.start(method, [item for _, item in batch], self.logits_dtype) for client, batch in calls.items()}
        for client, call in pending.items():
            try:
                answers = call.result()
            except EFTError as error:
                for r, _ in calls[client]:
                    r.error, r.finish_reason = error, "error"
                continue
            if self.metrics is not None:
                seconds, logits_bytes = time.perf_counter() - started, sum(a.logits.nbytes for a in answers)
                self.metrics.observe_worker_call(getattr(client, "address", "in-process"), method, seconds, len(answers), logits_bytes)
            yield from zip(calls[client], answers)
