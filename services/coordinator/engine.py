"""The EFT decoding engine over model workers: every active request advances one step per
iteration, with one batched call per worker, issued concurrently.

Per iteration:

1. **draft**: requests that speculate ask their drafter for k tokens and the q each was
   drawn from (one Draft call per drafter worker, for all of them);
2. **score**: every request sends each scored model the tokens its cache lacks, plus the
   drafts, asking for the last k + 1 logits (one Extend call per worker, for all requests);
3. **decide**: one batched decide per composition: eft_core combines the logits of every
   position, then accepts a prefix of each row's drafts plus a recovered or bonus token (a
   row without drafts samples one token), and gathers logprobs and implicit rewards;
4. **roll back**: each request's cache ledger (services/coordinator/ledger.py) keeps the
   accepted drafts; caches holding rejected ones are truncated by their next call
   (``truncate_to``, no call of its own); finished requests release every session they
   held, off the loop (``release`` never waits on a worker).

Faults: every call has a deadline (``CallPolicy``). A call that fails or times out fails the
requests in it with UNAVAILABLE and ejects its replica from placement
(services/coordinator/health.py), so later phases and iterations do not wait on it: one
stalled replica costs the other requests one gap of at most its deadline. A call answers per
item, and an item's error fails that request alone.

Requests that do not speculate wait for the draft call in iterations where others
speculate: one batched scoring call per worker per iteration costs the base model less than
two smaller ones would, and the draft call is short next to a scoring call of a larger base.

Sessions on workers: ``<request id>`` for the scored models, ``<request id>#draft`` for the
drafter (a drafter that is also a scored model keeps two caches: simple, and cheap for the
small model that drafts).
"""

import logging
import threading
import time
from collections import Counter, defaultdict
from itertools import accumulate
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace

import torch

from eft_core import (
    Composition, DeadlineExceededError, EFTError, InternalError, InvalidArgumentError, NotFoundError, OverloadedError, ResourceExhaustedError, SamplingBatch,
    SamplingParams, SpeculationStats, UnavailableError, eft_logprobs, implicit_rewards,
)  # fmt: skip
from eft_core.draft_length import DraftLengthTuner
from eft_core.sampling import sampling_probs, seeded_generator, stream_seed
from eft_core.speculative import DraftProbs, accept_greedy_ragged, accept_ragged
from services.coordinator.health import CallPolicy, ReplicaHealth
from services.coordinator.load import ReplicaLoad
from services.coordinator.ledger import DRAFT, CacheLedger
from services.worker.api import DraftItem, Drafted, DraftQ, Extended, ExtendItem
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
    adaptive: bool = False  # draft what the engine's tuner chooses each iteration (eft_core.draft_length)
    score_prompt: bool = False  # the EFT logprob of each prompt token after the first (every scored model has the same prompt)
    score_only: bool = False  # score the prompt and emit nothing (max_tokens 0)
    top_logprobs: int = 0  # per scored or emitted position, its most probable tokens to return
    model_logprobs: bool = False  # per emitted token, each scored model's own logprob and top logprobs
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    rewards: list[list[float]] = field(default_factory=list)
    top: list[list[tuple[int, float]]] = field(default_factory=list)  # per token: (id, logprob) of the top_logprobs most probable
    model_views: list[dict[str, tuple[float, list[tuple[int, float]]]]] = field(default_factory=list)  # per token, if asked: model -> (its logprob, its top)
    prompt_logprobs: list[float] = field(default_factory=list)  # per prompt token after the first, as scored
    prompt_top: list[list[tuple[int, float]]] = field(default_factory=list)  # as top, per prompt token after the first
    prompt_sent: int = 0  # while scoring: the prompt tokens its scored models have been sent
    finish_reason: str | None = None
    error: EFTError | None = None
    stats: SpeculationStats = field(default_factory=SpeculationStats)
    placement: dict[str, WorkerClient] = field(default_factory=dict)  # model -> the replica holding its caches
    released: Future | None = None  # done when the release of its sessions is

    def __post_init__(self):
        self.weights_tensor = torch.tensor([self.weights], dtype=torch.float32).reshape(1, len(self.composition.deltas))
        self.emitted_from = 0  # where this iteration's tokens start
        self.current_k = 0  # what it drafted in its latest iteration
        seed = self.params.seed
        self.generator = seeded_generator(seed) if seed is not None else None  # sampling and acceptance
        self.draft_params = replace(self.params, seed=stream_seed(seed, "draft")) if seed is not None else self.params  # the drafter's own stream
        drafter = {DRAFT: self.prompts[self.composition.drafter_model]} if self.draft_k else {}
        self.cache = CacheLedger({**{m: self.prompts[m] for m in self.composition.scored_models}, **drafter})

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def next_k(self, tuned: int | None) -> int:
        """Drafts this iteration: the tuner's choice for an adaptive request (``tuned``), its
        own k otherwise; never more than its remaining tokens need."""
        k = tuned if self.adaptive and tuned is not None else self.draft_k
        return min(k, self.params.max_tokens - len(self.tokens) - 1)

    @property
    def scoring(self) -> bool:
        """Its prompt is being scored: sent in parts, each part's every position scored, before
        it drafts or generates."""
        return self.score_prompt and self.prompt_sent < len(self.prompts[self.composition.base])

    def prompt_part(self, rows: int) -> int:
        """While scoring, the prompt tokens to send this iteration: as many as ``rows`` logits
        (what one worker answer holds) cover; 0 once scored."""
        return min(len(self.prompts[self.composition.base]) - self.prompt_sent, rows) if self.scoring else 0

    @property
    def tuning_context(self) -> tuple | None:
        """Its composition and sampling, for the draft-length tuner (None: it cannot speculate)."""
        return (self.composition.name, self.params.greedy) if self.composition.drafter_model else None


@dataclass(frozen=True)
class ReplicaPool:
    """A worker group as the engine places requests on it: the models each of its replicas
    hosts, and the replicas running now."""

    models: tuple[str, ...]
    replicas: tuple[WorkerClient, ...] = ()


def _models_on(placement: Mapping[str, WorkerClient]) -> Counter:
    """How many of a request's models each replica of its placement hosts: the sessions it
    holds there (drafts aside)."""
    return Counter(placement.values())


def pools_of(placement: Mapping[str, WorkerClient]) -> dict[str, ReplicaPool]:
    """A fixed placement (each model -> the one worker hosting it) as pools of one replica,
    one per worker, named ``worker-<i>`` in order of first appearance."""
    models_of = defaultdict(list)
    for model, client in placement.items():
        models_of[client].append(model)
    return {f"worker-{i}": ReplicaPool(tuple(models), (client,)) for i, (client, models) in enumerate(models_of.items())}


log = logging.getLogger(__name__)
DRAFT_CHOICES = (0, 1, 2, 3, 4, 6, 8)  # what adaptive speculation drafts per step


@dataclass
class IterationTiming:
    """Totals over the engine's iterations. An iteration's compute is, per call phase (draft,
    score), its slowest worker's compute time; the rest of its wall time is overhead (the
    coordinator's deciding, transport, (de)serialisation, waiting)."""

    iterations: int = 0
    wall_seconds: float = 0.0
    compute_seconds: float = 0.0

    def add(self, wall: float, compute: float) -> None:
        self.iterations, self.wall_seconds, self.compute_seconds = self.iterations + 1, self.wall_seconds + wall, self.compute_seconds + compute


class Engine:
    """``pools``: the worker groups by name (``pools_of`` makes them from a fixed placement).
    A request is placed on one replica per group when it starts and stays there;
    ``set_replicas`` changes a group's replicas for the requests placed afterwards.
    ``vocab_sizes``: the vocabulary each composition's models share, by composition name
    (compositions of different tokenizer families may be served together).
    ``calls``: the deadlines and sizes of worker calls. ``device``: where the decide phase
    runs (each iteration's logits are moved there; "cuda" where the coordinator has a GPU)."""

    def __init__(self, pools: Mapping[str, ReplicaPool], vocab_sizes: Mapping[str, int], metrics=None, calls: CallPolicy = CallPolicy(), device: str = "cpu"):
        self.pools = dict(pools)  # replaced whole by set_replicas, never changed in place
        self.pool_of = {model: name for name, pool in self.pools.items() for model in pool.models}
        twice = sorted(m for m in self.pool_of if sum(m in p.models for p in self.pools.values()) > 1)
        if twice:
            raise ValueError(f"models {twice} are in more than one worker group")
        self.vocab_sizes, self.calls, self.device = dict(vocab_sizes), calls, torch.device(device)
        self.metrics = metrics  # services.metrics.ServingMetrics, or None
        self.health = ReplicaHealth()
        self.releaser = ThreadPoolExecutor(max_workers=8, thread_name_prefix="engine-release")
        self.releasing: set[Future] = set()  # releases in flight
        self.releasing_lock = threading.Lock()
        self.load = ReplicaLoad()  # sessions on each replica: this coordinator's, and the replicas' own reports
        self.placements, self.last_placed = 0, {}  # placements so far; the number of each replica's latest
        self.tuner = DraftLengthTuner(choices=DRAFT_CHOICES)
        self.phase_seconds: dict[str, float] = {}  # the latest iteration's draft, score and decide phases
        self.timing = IterationTiming()  # over every iteration so far
        self._compute = 0.0  # the running iteration's worker compute so far

    def step(self, requests: list[EngineRequest]) -> None:
        """Advance every unfinished request by one iteration."""
        for r in requests:
            if not r.done and not r.placement:
                self._place(r)
        active = [r for r in requests if not r.done]
        started, emitted_before, self._compute = time.perf_counter(), {r.id: len(r.tokens) for r in active}, 0.0
        tuned = {c: self.tuner.choose(self.tuner.context(*c, len(active))) for c in {r.tuning_context for r in active if r.adaptive}}
        parts = {r.id: r.prompt_part(self._answer_rows(r.composition)) for r in active}
        ks = {r.id: 0 if parts[r.id] else r.next_k(tuned.get(r.tuning_context)) for r in active}
        for r in active:
            r.current_k = ks[r.id]
        drafted = self._draft([r for r in active if ks[r.id] > 0], ks)
        drafted_at = time.perf_counter()
        scored = self._score([r for r in active if not r.done], drafted, parts)
        scored_at = time.perf_counter()
        deciding = [r for r in active if not r.done]
        for rows in _by_composition(deciding).values():
            self._decide(rows, scored, drafted, parts)
        for r in deciding:
            if r.done:
                continue
            if r.scoring:  # a part of its prompt: the rest stays unsent
                r.cache.prefilled(r.composition.scored_models, parts[r.id])
            else:
                r.cache.stepped(r.composition.scored_models, drafted.get(r.id, ([], None))[0], r.tokens[r.emitted_from :], r.draft_k > 0)
        self.phase_seconds = {"draft": drafted_at - started, "score": scored_at - drafted_at, "decide": time.perf_counter() - scored_at}
        self.release([r for r in active if r.done])
        wall = time.perf_counter() - started
        self.timing.add(wall, self._compute)
        if self.metrics is not None:
            self.metrics.iteration_overhead.observe(wall - self._compute)
        self._observe_iteration(active, tuned, emitted_before, wall)

    def _observe_iteration(self, active: list[EngineRequest], tuned: dict, emitted_before: dict[str, int], seconds: float) -> None:
        """Tell the tuner what this iteration's draft length gave, per context whose requests
        all ran one k: the tuner's, where any of them is adaptive, else their common k. Not
        where a quarter or more of them were prefilling: their prompts' cost says nothing
        about k, and would be charged to whichever k ran."""
        groups = defaultdict(list)
        for r in active:
            if r.tuning_context is not None:
                groups[r.tuning_context].append(r)
        for context, rows in groups.items():
            ks = {r.draft_k for r in rows if not r.adaptive} | ({tuned[context]} if context in tuned else set())
            joined = sum(emitted_before[r.id] == 0 for r in rows)
            if len(ks) == 1 and 4 * joined < len(rows):
                self.tuner.observe(self.tuner.context(*context, len(active)), ks.pop(), sum(len(r.tokens) - emitted_before[r.id] for r in rows), seconds)

    def release(self, requests: list[EngineRequest]) -> Future:
        """Free every worker session the requests hold (idempotent), without waiting on the
        workers: the returned future is done once each replica answered or its deadline
        passed (for a request released before, once that release is). A replica out of
        placement frees them when it returns; one that cannot be reached is logged and
        skipped (its sessions died with it, or its idle reaper frees them)."""
        by_client, earlier, releasing = defaultdict(list), [], []
        for r in requests:
            if not r.placement:
                earlier += [r.released] if r.released is not None else []
                continue
            releasing.append(r)
            for client, models in _models_on(r.placement).items():
                by_client[client] += [r.id, r.id + DRAFT]
                self.load.released(client, models)
            r.placement = {}
            r.cache.released()
        sent = [self.releaser.submit(self._release_on, c, ids) for c, ids in by_client.items() if not self.health.defer_release(c, ids)]
        done = _when_all(sent)
        with self.releasing_lock:
            self.releasing.add(done)
        done.add_done_callback(self._released)
        for r in releasing:
            r.released = done
        return _when_all([done, *earlier])

    def wait_released(self, timeout: float | None = None) -> None:
        """Wait for the releases in flight (shutdown, tests)."""
        with self.releasing_lock:
            pending = list(self.releasing)
        wait(pending, timeout)

    def _released(self, future: Future) -> None:
        with self.releasing_lock:
            self.releasing.discard(future)

    def _release_on(self, client: WorkerClient, session_ids: list[str]) -> None:
        try:
            client.release(session_ids, timeout=self.calls.timeout_s)
        except EFTError as error:
            log.warning("could not release %d sessions on %s: %s", len(session_ids), client, error)

    def set_replicas(self, group: str, clients: list[WorkerClient]) -> None:
        """The worker group's replicas are now ``clients`` (called from another thread: the
        pools are replaced whole, never changed in place)."""
        pools = dict(self.pools)
        gone = set(pools[group].replicas) - set(clients)
        pools[group] = replace(pools[group], replicas=tuple(clients))
        self.pools = pools
        self.health.forget(gone)
        self.load.forget(gone)

    def report_load(self, client: WorkerClient, sessions: int) -> None:
        """The replica holds ``sessions`` now, over every coordinator (its Info)."""
        self.load.report(client, sessions)

    def servable(self, composition: Composition) -> bool:
        """Whether every worker group the composition needs has a replica in placement."""
        pools = self.pools
        return all(any(self.health.is_ejected(c) is None for c in pools[self.pool_of[m]].replicas) for m in composition.models)

    def close(self) -> None:
        self.health.close()
        self.releaser.shutdown(wait=False)

    def _place(self, r: EngineRequest) -> None:
        """One replica per worker group for the request's models: the least loaded of those
        in placement (sessions, every coordinator's: ReplicaLoad), the least recently chosen
        among equals (a replica on probation takes one request at a time). A group with none
        fails the request with UNAVAILABLE."""
        pools, chosen = self.pools, {}
        for model in r.composition.models:
            group = self.pool_of[model]
            if group not in chosen:
                live = [c for c in pools[group].replicas if self._placeable(c)]
                if not live:
                    r.placement.clear()
                    r.error, r.finish_reason = UnavailableError(_no_replica(model, group, pools[group], self.health)), "error"
                    return
                chosen[group] = min(live, key=lambda client: (self.load.of(client), self.last_placed.get(client, -1)))
            r.placement[model] = chosen[group]
        for client, models in _models_on(r.placement).items():
            self.load.placed(client, models)
            self.last_placed[client] = self.placements = self.placements + 1

    def _placeable(self, client: WorkerClient) -> bool:
        if self.health.is_ejected(client) is not None:
            return False
        return not (self.health.on_probation(client) and self.load.holds_mine(client))

    # --- the phases ----------------------------------------------------------------------

    def _draft(self, requests: list[EngineRequest], ks: dict[str, int]) -> dict[str, tuple[list[int], torch.Tensor]]:
        calls = defaultdict(list)
        for r in requests:
            drafter = r.composition.drafter_model
            tokens, truncate_to = r.cache.to_send(DRAFT)
            calls[r.placement[drafter]].append((r, DraftItem(r.id + DRAFT, drafter, tokens, ks[r.id], r.draft_params, truncate_to)))
        results = {}
        for (r, item), answer in self._call_all(calls, "draft"):
            if self._well_formed(r, item, answer) and self._cache_kept(r, DRAFT, len(item.token_ids) + item.num_draft - 1, answer.cache_length):
                results[r.id] = (answer.draft_tokens, answer.q)
        return results

    def _answer_rows(self, composition: Composition) -> int:
        """Logits rows one worker answer holds at the composition's vocabulary (float32 at most)."""
        return max(1, self.calls.max_answer_bytes // (4 * self.vocab_sizes[composition.name]))

    def _score(self, requests: list[EngineRequest], drafted, parts: dict[str, int]) -> dict[str, dict[str, torch.Tensor]]:
        """Every request's scored models get the tokens they lack plus its drafts, asking the
        last k + 1 logits; a request scoring its prompt sends the next part, asking all of it."""
        calls = defaultdict(list)
        for r in requests:
            drafts, part = drafted.get(r.id, ([], None))[0], parts[r.id]
            for model in r.composition.scored_models:
                unsent, truncate_to = r.cache.to_send(model, most=part or None)
                calls[r.placement[model]].append((r, ExtendItem(r.id, model, unsent + drafts, part or len(drafts) + 1, truncate_to)))
        results = defaultdict(dict)
        for (r, item), answer in self._call_all(calls, "extend"):
            if self._well_formed(r, item, answer) and self._cache_kept(r, item.model, len(item.token_ids), answer.cache_length):
                results[r.id][item.model] = answer.logits
        return results

    def _well_formed(self, r: EngineRequest, item: ExtendItem | DraftItem, answer: Extended | Drafted) -> bool:
        """An answer whose shape does not fit its item (a worker's bug) fails its request alone,
        with INTERNAL, before any of it is decided from: the batch's other requests go on."""
        vocab = self.vocab_sizes[r.composition.name]
        if isinstance(answer, Drafted):
            q, k = answer.q, item.num_draft
            fits = len(answer.draft_tokens) == len(q.at_drafts) == k and all(0 <= t < vocab for t in answer.draft_tokens)
            fits = fits and (tuple(q.dense.shape) == (k, vocab) if q.dense is not None else not len(q.indices) or 0 <= int(q.indices.min()) <= int(q.indices.max()) < vocab)
        else:
            fits = answer.logits.dim() == 2 and answer.logits.shape[0] == max(1, item.num_logits) and answer.logits.shape[1] >= vocab
        if not fits:
            _fail([r], InternalError(f"a worker answered model {item.model!r} with a malformed result ({_malformed(answer, item, vocab)}); retry the request"))
        return fits

    @staticmethod
    def _cache_kept(r: EngineRequest, key: str, added: int, length: int) -> bool:
        """Record a cache's new length; a lost cache fails the request rather than let it
        emit tokens from a wrong context."""
        expected = r.cache.answered(key, added, length)
        if expected is not None and not r.done:
            r.error, r.finish_reason = UnavailableError(f"the worker lost this request's cache for {key!r} (it holds {length} tokens, {expected} expected); retry the request"), "error"
        return not r.done

    def _decide(self, rows: list[EngineRequest], scored, drafted, parts: dict[str, int]) -> None:
        """One decide for every request of a composition, speculating or not: the positions
        of all rows (1, or k + 1 for a row that drafted k; a prompt part's every position)
        combined at once, the prompt parts' tokens scored, one acceptance over the generating
        positions (a row without drafts samples plainly), then the emitted tokens' logprobs,
        top logprobs and implicit rewards gathered, and emitted. A row generates once its
        prompt is scored (the part's last position predicts its first token); a score-only
        row ends there instead."""
        composition = rows[0].composition
        vocab = self.vocab_sizes[composition.name]
        drafts = [drafted[r.id][0] if r.id in drafted else [] for r in rows]
        positions = [parts[r.id] or len(d) + 1 for r, d in zip(rows, drafts)]
        per_model = {m: torch.cat([scored[r.id][m][:, :vocab] for r in rows]).to(self.device)[:, None] for m in composition.scored_models}  # [positions, 1, vocab]
        weights = torch.cat([r.weights_tensor.expand(n, -1) for r, n in zip(rows, positions)]).to(self.device)
        target = eft_logprobs(per_model, composition, weights, vocab)[:, 0]  # [positions, vocab]
        starts = [0, *accumulate(positions)][:-1]
        prompt_positions = [_score_prompt_part(r, parts[r.id], target[start : start + n]) if parts[r.id] else 0 for r, start, n in zip(rows, starts, positions)]
        deciding = [i for i, r in enumerate(rows) if not r.scoring and not r.score_only]
        generating = [starts[i] + prompt_positions[i] + j for i in deciding for j in range(len(drafts[i]) + 1)]
        nucleus = per_model[composition.nucleus_model][:, 0]
        if len(generating) < len(target):  # a prompt scored, or a score-only row: decide from the rest
            generating = torch.tensor(generating, dtype=torch.long, device=self.device)
            target_at, nucleus = target[generating], nucleus[generating]
        else:
            target_at = target
        emitted = self._accepted([rows[i] for i in deciding], [drafts[i] for i in deciding], target_at, nucleus, [drafted[rows[i].id][1] for i in deciding if rows[i].id in drafted], vocab)
        first = [starts[i] + prompt_positions[i] for i in deciding]  # each deciding row's first generating position
        chosen = torch.tensor([start + j for start, tokens in zip(first, emitted) for j in range(len(tokens))], dtype=torch.long, device=self.device)
        tokens = torch.tensor([t for tokens in emitted for t in tokens], dtype=torch.long, device=self.device)
        whole = len(chosen) == len(target)  # no drafts, or all accepted: no positions to pick

        def at_chosen(model: str) -> torch.Tensor:  # [tokens, 1, vocab]: the model's logits at the emitted tokens
            return per_model[model] if whole else per_model[model][chosen]

        picked = {m: at_chosen(m) for d in composition.deltas for m in (d.tuned, d.reference)}
        logprobs, rewards = target[chosen, tokens].tolist(), implicit_rewards(picked, composition, tokens[:, None], vocab)[:, 0].tolist()
        most = max((rows[i].top_logprobs for i in deciding), default=0)
        tops = _top(target[chosen], most) if most else [[] for _ in range(len(tokens))]  # no [tokens, vocab] copy unless asked
        views = _model_views({m: picked[m] if m in picked else at_chosen(m) for m in composition.scored_models}, tokens, most) if any(rows[i].model_logprobs for i in deciding) else None
        offset = 0
        for i, row_tokens in zip(deciding, emitted):
            r, n = rows[i], len(row_tokens)
            if drafts[i]:
                self._observe_drafts(r, len(drafts[i]), n - 1)
            r.emitted_from = len(r.tokens)
            mine = slice(offset, offset + n)
            row_views = [{m: (lp, top[: r.top_logprobs]) for m, (lp, top) in v.items()} for v in views[mine]] if r.model_logprobs else [{}] * n
            self._emit(r, row_tokens, logprobs[mine], rewards[mine], [t[: r.top_logprobs] for t in tops[mine]], row_views)
            offset += n
        for r in rows:
            if r.score_only and not r.scoring:
                r.finish_reason = "length"

    @staticmethod
    def _accepted(rows, drafts: list[list[int]], target: torch.Tensor, nucleus_logits: torch.Tensor, qs: list[DraftQ], vocab: int) -> list[list[int]]:
        """Per row, its accepted drafts and one recovered or bonus token (or its one sampled
        token): greedy rows by argmax alone; otherwise the exact rule over p and the q each
        drafter sent. ``target``: the rows' generating positions, row after row."""
        if not rows:
            return []
        positions = [len(d) + 1 for d in drafts]
        batch = SamplingBatch.from_params([r.params for r in rows], {i: r.generator for i, r in enumerate(rows) if r.generator is not None})
        if batch.all_greedy:
            return accept_greedy_ragged(drafts, target.argmax(dim=-1))
        nucleus = torch.log_softmax(nucleus_logits.float(), dim=-1) if bool(batch.conservative.any()) else None
        p = sampling_probs(target, batch.rows_of([i for i, n in enumerate(positions) for _ in range(n)]), nucleus)
        return accept_ragged(drafts, p, _draft_probs(qs, vocab), batch.generators)

    def _observe_drafts(self, r: EngineRequest, drafted: int, accepted: int) -> None:
        r.stats.observe_draft(drafted, accepted)
        if self.metrics is not None:
            self.metrics.observe_draft(r.composition.name, drafted, accepted)

    @staticmethod
    def _emit(r: EngineRequest, emitted: list[int], logprobs: list[float], rewards: list[list[float]], tops: list[list[tuple[int, float]]], views: list[dict]) -> None:
        """Append the tokens, their logprobs, implicit rewards, top logprobs and model views,
        until a stop."""
        for token, logprob, reward, top, view in zip(emitted, logprobs, rewards, tops, views):
            r.tokens.append(token)
            r.logprobs.append(logprob)
            r.rewards.append(reward)
            r.top.append(top)
            r.model_views.append(view)
            if token in r.params.stop_token_ids:
                r.finish_reason = "stop"
            elif len(r.tokens) >= r.params.max_tokens:
                r.finish_reason = "length"
            if r.done:
                return

    def _call_all(self, calls: dict, method: str):
        """One call per worker (a few where one answer could pass the message limit), all
        started before any is awaited, each under its deadline. A failed call fails just its
        requests (and ejects its replica); a failed item, just its request. Replicas already
        out of placement are not called."""
        started, pending, compute = time.perf_counter(), [], defaultdict(float)
        for client, batch in calls.items():
            if (reason := self.health.is_ejected(client)) is not None:
                _fail([r for r, _ in batch], UnavailableError(f"worker replica {_name(client)} left placement ({reason}); retry the request"))
                continue
            chunks = self._chunks(batch)
            timeout = self.calls.deadline(sum(len(item.token_ids) for _, item in batch)) * len(chunks)  # a worker runs them one after another
            pending += [(client, chunk, client.start(method, [item for _, item in chunk], timeout), timeout) for chunk in chunks]
        for client, chunk, call, timeout in pending:
            try:
                answers = call.result()
            except EFTError as error:
                _fail([r for r, _ in chunk], self._call_failed(client, method, timeout, error))
                continue
            if self.health.is_ejected(client) is None:
                self.health.succeeded(client)
            compute[client] += call.compute_seconds  # a worker runs its chunks one after another
            self._observe_call(client, method, time.perf_counter() - started, chunk, answers)
            for (r, item), answer in zip(chunk, answers):
                if isinstance(answer, EFTError):
                    _fail([r], _item_failed(client, answer))
                else:
                    yield (r, item), answer
        self._compute += max(compute.values(), default=0.0)  # the phase waits on its slowest worker

    def _chunks(self, batch: list) -> list[list]:
        """The batch in calls whose answers stay under ``calls.max_answer_bytes``, counting
        each answered position as a float32 row of its vocabulary (the most an Extend's
        logits or a Draft's q take)."""
        chunks, size = [[]], 0
        for r, item in batch:
            answer = 4 * self.vocab_sizes[r.composition.name] * (item.num_draft if isinstance(item, DraftItem) else max(1, item.num_logits))
            if chunks[-1] and size + answer > self.calls.max_answer_bytes:
                chunks, size = chunks + [[]], 0
            chunks[-1].append((r, item))
            size += answer
        return chunks

    def _observe_call(self, client: WorkerClient, method: str, seconds: float, chunk: list, answers: list) -> None:
        if self.metrics is None:
            return
        by_composition = defaultdict(int)
        for (r, _), answer in zip(chunk, answers):
            if not isinstance(answer, EFTError):
                by_composition[r.composition.name] += _nbytes(answer)
        self.metrics.observe_worker_call(_name(client), method, seconds, len(answers), dict(by_composition))

    def _call_failed(self, client: WorkerClient, method: str, timeout: float, error: EFTError) -> EFTError:
        """What a failed call means for its requests; a replica at fault leaves placement."""
        if isinstance(error, (InvalidArgumentError, NotFoundError, ResourceExhaustedError)):  # the call itself was wrong: this process's bug
            return InternalError(f"worker replica {_name(client)} refused a {method} call: {error}")
        self.health.failed(client, error)
        if isinstance(error, DeadlineExceededError):
            return UnavailableError(f"worker replica {_name(client)} did not answer {method} within {timeout:.1f} s; retry the request")
        return UnavailableError(f"worker replica {_name(client)} failed {method} ({error}); retry the request")


def _score_prompt_part(r: EngineRequest, part: int, target: torch.Tensor) -> int:
    """Score the ``part`` prompt tokens sent this iteration, from ``target``, their positions'
    EFT logprobs: each position's next prompt token's logprob and its top logprobs (the
    prompt's last position predicts no prompt token). Returns the positions scored."""
    prompt = r.prompts[r.composition.base]
    following = prompt[r.prompt_sent + 1 : r.prompt_sent + part + 1]
    r.prompt_sent += part
    scored = target[: len(following)]
    r.prompt_logprobs += scored.gather(1, torch.tensor(following, dtype=torch.long, device=target.device)[:, None])[:, 0].tolist()
    r.prompt_top += _top(scored, r.top_logprobs)
    return len(following)


def _top(logprobs: torch.Tensor, n: int) -> list[list[tuple[int, float]]]:
    """Per row of ``logprobs`` [rows, vocab], its n most probable tokens (id, logprob), most
    probable first; empty lists for n = 0."""
    if n == 0:
        return [[] for _ in range(len(logprobs))]
    values, ids = logprobs.topk(min(n, logprobs.shape[-1]), dim=-1)
    return [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]


def _model_views(logits: dict[str, torch.Tensor], tokens: torch.Tensor, n: int) -> list[dict[str, tuple[float, list[tuple[int, float]]]]]:
    """Per emitted token, each model's own view (``logits``: model -> [tokens, 1, vocab] at
    the tokens' positions): its log-softmax's value at the token, and its n most probable."""
    views = [{} for _ in range(len(tokens))]
    for model, x in logits.items():
        own = torch.log_softmax(x[:, 0].float(), dim=-1)
        for view, logprob, top in zip(views, own.gather(1, tokens[:, None])[:, 0].tolist(), _top(own, n)):
            view[model] = (logprob, top)
    return views


def _draft_probs(qs: list[DraftQ], vocab: int) -> DraftProbs:
    """The drafters' q of the speculating rows, row after row, as acceptance reads it."""
    owner = [(q, j) for q in qs for j in range(len(q.at_drafts))]  # each drafted position's answer and row in it
    at_drafts = torch.cat([q.at_drafts for q in qs]) if qs else torch.zeros(0)
    return DraftProbs(at_drafts, lambda positions: torch.cat([owner[i][0].rows([owner[i][1]], vocab) for i in positions]))


def _by_composition(requests: list[EngineRequest]) -> dict[str, list[EngineRequest]]:
    groups = defaultdict(list)
    for r in requests:
        groups[r.composition.name].append(r)
    return groups


def _item_failed(client: WorkerClient, error: EFTError) -> EFTError:
    """What a worker's refusal of one item means for its request: a lost cache is the
    replica's (UNAVAILABLE), a full budget a busy server's (retry later); anything else is
    a bug of the coordinator, which validated the request (never the client's mistake)."""
    if isinstance(error, UnavailableError):
        return UnavailableError(f"worker replica {_name(client)} lost this request's cache ({error}); retry the request")
    if isinstance(error, ResourceExhaustedError):
        return OverloadedError(f"worker replica {_name(client)} is full ({error}); retry later")
    return InternalError(f"worker replica {_name(client)} refused an item of the coordinator's call: {error}")


def _fail(requests: list[EngineRequest], error: EFTError) -> None:
    for r in requests:
        if not r.done:
            r.error, r.finish_reason = error, "error"


def _malformed(answer: Extended | Drafted, item: ExtendItem | DraftItem, vocab: int) -> str:
    """What an answer that does not fit its item holds, against what was asked (for the error)."""
    if isinstance(answer, Drafted):
        return f"{len(answer.draft_tokens)} drafts and q of {len(answer.q.at_drafts)} rows, {item.num_draft} asked, token ids below {vocab}"
    return f"logits of shape {tuple(answer.logits.shape)}, expected ({max(1, item.num_logits)}, >= {vocab})"


def _nbytes(answer) -> int:
    """The tensor bytes an answer brought: an Extend's logits, a Draft's q."""
    return answer.q.nbytes if isinstance(answer, Drafted) else answer.logits.nbytes


def _name(client: WorkerClient) -> str:
    return getattr(client, "label", "in-process")  # not its address: labels and messages reach clients and scrapes


def _no_replica(model: str, group: str, pool: ReplicaPool, health: ReplicaHealth) -> str:
    if not pool.replicas:
        return f"no replica of worker group {group!r} (hosting {model!r}) is running; retry later"
    reasons = sorted({health.is_ejected(c) or "on probation" for c in pool.replicas})
    return f"every replica of worker group {group!r} (hosting {model!r}) is out of placement ({'; '.join(reasons)}); retry later"


def _when_all(futures: list[Future]) -> Future:
    """A future done when all of ``futures`` are."""
    done, left, lock = Future(), [len(futures)], threading.Lock()

    def one_done(_) -> None:
        with lock:
            left[0] -= 1
            last = left[0] == 0
        if last:
            done.set_result(None)

    if not futures:
        done.set_result(None)
    for future in futures:
        future.add_done_callback(one_done)
    return done
