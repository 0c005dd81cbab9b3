"""Sessions per (session, model) under a budget: a number of caches and of token slots,
and when each session was last used (sessions nobody uses any more are found by that)."""

import time
from dataclasses import dataclass, field

import torch

from eft_core import NotFoundError, OverloadedError


@dataclass
class Session:
    tokens: list[int] = field(default_factory=list)  # what the cache holds (its keys and values: services/worker/slots.py)
    generator: torch.Generator | None = None  # drafting RNG of a seeded session


class SessionStore:
    def __init__(self, max_sessions: int, max_cached_tokens: int):
        self.max_sessions, self.max_cached_tokens = max_sessions, max_cached_tokens
        self._sessions: dict[tuple[str, str], Session] = {}
        self._last_used: dict[str, float] = {}  # session id -> time.monotonic() of its last get/put

    def __len__(self) -> int:
        return len(self._sessions)

    @property
    def cached_tokens(self) -> int:
        return sum(len(s.tokens) for s in self._sessions.values())

    def get(self, session_id: str, model: str, field_name: str) -> Session:
        session = self._sessions.get((session_id, model))
        if session is None:
            raise NotFoundError(f"no session {session_id!r} for model {model!r}", field=field_name)
        self._last_used[session_id] = time.monotonic()
        return session

    def peek(self, session_id: str, model: str) -> Session | None:
        return self._sessions.get((session_id, model))

    def put(self, session_id: str, model: str, session: Session) -> None:
        self._sessions[session_id, model] = session
        self._last_used[session_id] = time.monotonic()

    def idle_since(self, cutoff: float) -> list[str]:
        """Sessions last used before ``cutoff`` (a time.monotonic() value)."""
        return [session_id for session_id, used in self._last_used.items() if used < cutoff]

    def release(self, session_ids: list[str]) -> int:
        ids = set(session_ids)
        doomed = [key for key in self._sessions if key[0] in ids]
        for key in doomed:
            del self._sessions[key]
        for session_id in ids:
            self._last_used.pop(session_id, None)
        return len(doomed)


class Reservation:
    """One call's admitted items, checked against the budget in order. A model's cache is a
    rectangle (services/worker/slots.py): its token slots are its sessions x its longest
    session, and those slots over all models are what ``max_cached_tokens`` bounds."""

    def __init__(self, store: SessionStore, shapes: dict[str, tuple[int, int]]):
        self.store, self.sessions, self.shapes = store, len(store), dict(shapes)  # model -> (sessions, longest)

    def reserve(self, model: str, new_session: bool, length: int, field: str) -> None:
        """Count a session of ``model`` that will hold ``length`` tokens; refuse, before any
        work, what would go over the budget (``field``: whose ask it is)."""
        sessions, budget = self.sessions + new_session, self.store.max_sessions
        if sessions > budget:
            raise OverloadedError(f"{self.sessions} sessions held, 1 more asked, budget {budget}", field=field)
        rows, longest = self.shapes[model]
        shape = (rows + new_session, max(longest, length))
        slots = sum(r * n for name, (r, n) in self.shapes.items() if name != model) + shape[0] * shape[1]
        if slots > self.store.max_cached_tokens:
            raise OverloadedError(
                f"model {model!r}'s cache would hold {shape[0]} sessions x {shape[1]} tokens (its longest session): "
                f"{slots} token slots over all models, budget {self.store.max_cached_tokens}",
                field=field,
            )
        self.sessions, self.shapes[model] = sessions, shape
