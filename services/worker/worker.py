"""ModelWorker: hosted causal LMs and their sessions. Each item of a batched call is
validated, and its share of the cache budget reserved, before any cache changes: an item
refused (lost session, full budget, bad rollback) gets its own error and leaves its session
as it was, while the call's other items are served."""

import logging
import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from eft_core import EFTError, NotFoundError, ResourceExhaustedError, SamplingBatch, UnavailableError
from eft_core.errors import require
from eft_core.sampling import draft_distribution, sample_from_probs, seeded_generator
from services.prompts import tokenizer_fingerprint
from services.worker.api import DraftItem, Drafted, DraftQ, ExtendItem, Extended, ModelInfo, WorkerInfo, WorkerLimits
from services.worker.architectures import check_supported
from services.worker.sessions import Reservation, Session, SessionStore
from services.worker.slots import SessionSlots

log = logging.getLogger(__name__)


@dataclass
class HostedModel:
    name: str
    model: torch.nn.Module
    fingerprint: str
    tokenizer_size: int
    tensor_parallel_size: int = 1

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    @property
    def max_sequence_length(self) -> int:
        return self.model.config.max_position_embeddings


def load_hosted_model(name: str, source: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu", load=None) -> HostedModel:
    """``from_pretrained`` on a local folder or a hub id; an unreachable hub says so, and an
    architecture the worker cannot step exactly is refused before its weights load.
    ``load(source, dtype)``: how the model itself is loaded (a tensor-parallel rank's shard)."""
    started = time.perf_counter()
    log.info("loading model %r from %s (%s, %s)", name, source, dtype, device)
    try:
        check_supported(name, AutoConfig.from_pretrained(str(source)).model_type)
        tokenizer = AutoTokenizer.from_pretrained(str(source))
        model = (load or _load_whole)(str(source), dtype).to(device).eval()
    except OSError as error:
        if Path(source).exists():
            raise
        raise UnavailableError(
            f"model {name!r}: {source!r} is not a local folder, and loading it from the Hugging Face hub failed "
            f"(no network or no such model?): {error}",
            field=f"models[{name!r}].path",
        ) from error
    log.info("loaded %r: %.1fM parameters in %.1f s", name, sum(p.numel() for p in model.parameters()) / 1e6, time.perf_counter() - started)
    return HostedModel(name, model, tokenizer_fingerprint(tokenizer), len(tokenizer))


def _load_whole(source: str, dtype: torch.dtype) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(source, dtype=dtype)


class ModelWorker:
    def __init__(self, models: list[HostedModel], limits: WorkerLimits = WorkerLimits()):
        self.models = {m.name: m for m in models}
        self.limits = limits
        self.store = SessionStore(limits.max_sessions, limits.max_cached_tokens)
        self.slots = {m.name: SessionSlots(m.model, limits.max_forward_tokens) for m in models}
        self.lock = threading.Lock()  # one call at a time: caches are shared state
        self.call_started: float | None = None  # time.monotonic() when the running call took the lock

    def stalled_for(self) -> float:
        """Seconds the running call has held the worker (0 when idle): read without the lock,
        so a hung call cannot hide itself from health checks."""
        started = self.call_started
        return 0.0 if started is None else time.monotonic() - started

    @contextmanager
    def _serving(self):
        """One call at a time, timed for ``stalled_for``."""
        with self.lock:
            self.call_started = time.monotonic()
            try:
                yield
            finally:
                self.call_started = None

    def sessions_held(self) -> int:
        """Caches held now, read without waiting for a running call (a stalled one must not
        stall the autoscaler's stats or a drain); a reading between two calls' changes."""
        return len(self.store)

    def info(self) -> WorkerInfo:
        models = [
            ModelInfo(m.name, m.fingerprint, m.vocab_size, m.tokenizer_size, str(m.model.dtype).removeprefix("torch."), str(m.model.device), m.max_sequence_length, m.tensor_parallel_size)
            for m in self.models.values()
        ]
        with self.lock:
            return WorkerInfo(models, self.store.max_sessions, self.store.max_cached_tokens, len(self.store), self.store.cached_tokens)

    def extend(self, items: list[ExtendItem], logits_dtype: torch.dtype | None = None) -> list[Extended | EFTError]:
        """Append tokens per session and return logits of the last ``num_logits`` positions
        (in ``logits_dtype``; None: the model's own); per item, its answer or the error that
        refused it."""
        with self._serving():
            return self._extend(items, logits_dtype)

    def draft(self, items: list[DraftItem]) -> list[Drafted | EFTError]:
        """Append tokens, then sample ``num_draft`` tokens per session in one batched loop;
        per item, its drafts and the q they were drawn from, or the error that refused it."""
        with self._serving():
            return self._draft(items)

    def truncate(self, session_id: str, model: str, length: int) -> int:
        """Keep the first ``length`` tokens of a session's cache."""
        with self._serving():
            return self._truncate(session_id, model, length)

    def release(self, session_ids: list[str]) -> int:
        """Free every cache of these sessions; returns how many (session, model) caches went."""
        with self._serving():
            return self._release_everywhere(list(session_ids))

    def release_idle(self, idle_seconds: float) -> list[str]:
        """Free the sessions no call has used for ``idle_seconds``; returns their ids."""
        with self._serving():
            idle = self.store.idle_since(time.monotonic() - idle_seconds)
            if idle:
                self._release_everywhere(idle)
            return idle

    def _release_everywhere(self, session_ids: list[str]) -> int:
        """Release on every process holding the caches (a tensor-parallel worker overrides this)."""
        return self._release(session_ids)

    # --- the verbs, without the lock (a tensor-parallel follower calls these) -------------

    def _extend(self, items: list[ExtendItem], logits_dtype: torch.dtype | None) -> list[Extended | EFTError]:
        answers = self._admit(items, [0] * len(items), _check_num_logits)
        for model, rows in self._by_model(items, answers).items():
            chosen = [items[i] for i in rows]
            wanted = [max(1, item.num_logits) for item in chosen]
            with self.slots[model].undone_on_failure([item.session_id for item in chosen]):
                logits = self._step(model, chosen, [item.token_ids for item in chosen], wanted)
            sessions = self._commit(model, chosen, self._sessions(model, chosen))
            for row, (i, n) in enumerate(zip(rows, wanted)):
                answers[i] = Extended(self._wire(logits[row, logits.shape[1] - n :], model, logits_dtype), len(sessions[row].tokens))
        return answers

    def _draft(self, items: list[DraftItem]) -> list[Drafted | EFTError]:
        answers = self._admit(items, [item.num_draft - 1 for item in items], _check_num_draft)
        for model, rows in self._by_model(items, answers).items():
            chosen = [items[i] for i in rows]
            sessions = self._sessions(model, chosen)
            with self.slots[model].undone_on_failure([item.session_id for item in chosen]):  # a draft loop is several steps
                drafted = self._draft_loop(model, chosen, sessions)
            self._commit(model, chosen, sessions, drafts=[tokens for tokens, _ in drafted])
            for row, (i, (tokens, q)) in enumerate(zip(rows, drafted)):
                answers[i] = Drafted(tokens, q, len(sessions[row].tokens))
        return answers

    def _truncate(self, session_id: str, model: str, length: int) -> int:
        self._model(model, "model")
        session = self.store.get(session_id, model, "session_id")
        require(isinstance(length, int) and 0 <= length <= len(session.tokens), "length", f"must be in [0, {len(session.tokens)}], got {length}")
        session.tokens = session.tokens[:length]
        self.slots[model].truncate(session_id, length)
        return length

    def _release(self, session_ids: list[str]) -> int:
        for slots in self.slots.values():
            slots.release(session_ids)
        return self.store.release(session_ids)

    # --- internals -----------------------------------------------------------------------

    def _admit(self, items, extra_tokens: list[int], check) -> list[EFTError | None]:
        """Validate each item and reserve its share of the budget, in order, then apply the
        rollbacks of the admitted ones. Per item: the error that refused it, or None. One
        item's problem (a lost session, a full budget, a bad rollback) fails that item alone."""
        require(len(items) > 0, "items", "must hold at least one item")
        answers, seen = [], set()
        budget = Reservation(self.store, {name: slots.shape() for name, slots in self.slots.items()})
        for i, (item, extra) in enumerate(zip(items, extra_tokens)):
            try:
                new_session, length = self._needs(i, item, extra)
                check(i, item)
                require((item.session_id, item.model) not in seen, f"items[{i}]", f"session {item.session_id!r} appears twice for model {item.model!r}")
                budget.reserve(item.model, new_session, length, f"items[{i}]")
            except EFTError as error:
                answers.append(error)
                continue
            seen.add((item.session_id, item.model))
            answers.append(None)
        for item, answer in zip(items, answers):
            if answer is None and item.truncate_to is not None:
                self._truncate(item.session_id, item.model, item.truncate_to)
        return answers

    def _needs(self, i: int, item, extra: int) -> tuple[bool, int]:
        """Whether item ``i`` starts a session, and the tokens its session will hold
        (``extra``: tokens it adds beyond its token_ids); raises what is wrong with it."""
        hosted = self._model(item.model, f"items[{i}].model")
        require(isinstance(item.session_id, str) and item.session_id != "", f"items[{i}].session_id", "must be a non-empty string")
        require(len(item.token_ids) > 0, f"items[{i}].token_ids", "must hold at least one token")
        bad = [t for t in item.token_ids if not 0 <= t < hosted.tokenizer_size]
        require(not bad, f"items[{i}].token_ids", f"ids {bad[:5]} outside the vocabulary [0, {hosted.tokenizer_size})")
        session = self.store.peek(item.session_id, item.model)
        held = kept = len(session.tokens) if session else 0
        if item.truncate_to is not None:
            if session is None:
                raise UnavailableError(f"session {item.session_id!r} holds no cache of model {item.model!r} (freed as idle, or this replica restarted)", field=f"items[{i}].truncate_to")
            require(0 <= item.truncate_to <= held, f"items[{i}].truncate_to", f"must be in [0, {held}] (the tokens this session holds), got {item.truncate_to}")
            kept = item.truncate_to
        length = kept + len(item.token_ids) + extra
        if length > hosted.max_sequence_length:
            raise ResourceExhaustedError(f"session would hold {length} tokens, over the model's {hosted.max_sequence_length}", field=f"items[{i}].token_ids")
        return session is None, length

    def _model(self, name: str, field_name: str) -> HostedModel:
        if name not in self.models:
            raise NotFoundError(f"no model {name!r} on this worker (hosted: {sorted(self.models)})", field=field_name)
        return self.models[name]

    @staticmethod
    def _by_model(items, answers: list) -> dict[str, list[int]]:
        """The admitted items (no answer yet) by model."""
        rows = defaultdict(list)
        for i, (item, answer) in enumerate(zip(items, answers)):
            if answer is None:
                rows[item.model].append(i)
        return rows

    def _step(self, model: str, items, tokens: list[list[int]], keep: list[int]) -> torch.Tensor:
        """One batched step of these items' sessions (see ``SessionSlots.step``), growing the
        model's cache within what the budget leaves beside the other models' caches."""
        others = sum(slots.allocated for name, slots in self.slots.items() if name != model)
        return self.slots[model].step([item.session_id for item in items], tokens, keep, self.store.max_cached_tokens - others)

    def _sessions(self, model: str, items) -> list[Session]:
        return [self.store.peek(item.session_id, model) or Session() for item in items]

    def _commit(self, model: str, items, sessions: list[Session], drafts: list[list[int]] | None = None) -> list[Session]:
        """Record what the items' sessions now hold; returns ``sessions``."""
        for row, (item, session) in enumerate(zip(items, sessions)):
            drafted = drafts[row][:-1] if drafts else []  # the last draft was never fed
            session.tokens = session.tokens + list(item.token_ids) + drafted
            assert self.slots[model].length(item.session_id) == len(session.tokens), (self.slots[model].length(item.session_id), len(session.tokens))
            self.store.put(item.session_id, model, session)
        return sessions

    def _draft_loop(self, model: str, items: list[DraftItem], sessions: list[Session]) -> list[tuple[list[int], DraftQ]]:
        """Feed each row its new tokens, then sample and feed drafts until every row has its k;
        per row, its drafts and the q each was drawn from (``draft_distribution``: greedy
        rows' q is one-hot, never computed). Only rows still drafting draw random numbers, so
        a seeded row ignores its batch-mates."""
        generators = {row: g for row, (item, session) in enumerate(zip(items, sessions)) if (g := self._generator(item, session))}
        sampling = SamplingBatch.from_params([item.sampling for item in items], generators)
        step_logits = self._step(model, items, [item.token_ids for item in items], [1] * len(items))[:, -1]
        tokens, qs, vocab = [[] for _ in items], [[] for _ in items], self.models[model].tokenizer_size
        for step in range(max(item.num_draft for item in items)):
            active = [row for row, item in enumerate(items) if step < item.num_draft]
            logits = step_logits[active][..., :vocab]  # on the model's device: q is computed where the logits are, and only q travels
            chosen = sampling.rows_of(active)
            if chosen.all_greedy:
                drawn = logits.argmax(dim=-1)
            else:
                q = draft_distribution(logits, chosen)
                drawn = sample_from_probs(q, chosen.generators)
            for position, (row, token) in enumerate(zip(active, drawn.tolist())):
                tokens[row].append(token)
                if not items[row].sampling.greedy:
                    qs[row].append(q[position])
            feed = [[tokens[row][-1]] if step + 1 < item.num_draft else [] for row, item in enumerate(items)]
            if not any(feed):
                break
            step_logits = self._step(model, items, feed, [len(f) for f in feed])[:, -1]
        return [(t, DraftQ.of(torch.stack(q), torch.tensor(t, device=q[0].device)) if q else DraftQ.one_hot(torch.tensor(t))) for t, q in zip(tokens, qs)]

    def _generator(self, item: DraftItem, session: Session) -> torch.Generator | None:
        if session.generator is None and item.sampling.seed is not None:
            session.generator = seeded_generator(item.sampling.seed)
        return session.generator

    def _wire(self, logits: torch.Tensor, model: str, dtype: torch.dtype | None) -> torch.Tensor:
        """Logits as they travel: the real vocabulary only, in the wire dtype (None: as the
        model returns them), on the CPU."""
        return logits[..., : self.models[model].tokenizer_size].to("cpu", dtype or logits.dtype)


def _check_num_logits(i: int, item: ExtendItem) -> None:
    require(0 <= item.num_logits <= len(item.token_ids), f"items[{i}].num_logits", f"must be in [0, {len(item.token_ids)}], got {item.num_logits}")


def _check_num_draft(i: int, item: DraftItem) -> None:
    require(isinstance(item.num_draft, int) and item.num_draft >= 1, f"items[{i}].num_draft", f"must be >= 1, got {item.num_draft}")


def start_idle_reaper(worker: ModelWorker, idle_seconds: float) -> threading.Event:
    """Free, in the background, sessions unused for ``idle_seconds``: a coordinator that
    restarted or died mid-request never releases them. A running request uses its sessions
    every iteration, so only abandoned ones go. Set the returned event to stop."""
    stop = threading.Event()

    def reap() -> None:
        while not stop.wait(idle_seconds / 4):
            if released := worker.release_idle(idle_seconds):
                log.warning("released %d sessions unused for %.0f s (their coordinator is gone): %s", len(released), idle_seconds, released[:8])

    threading.Thread(target=reap, name="idle-session-reaper", daemon=True).start()
    return stop
