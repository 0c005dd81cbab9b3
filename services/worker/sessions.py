"""KV caches per (session, model) under a budget: a number of caches and of cached tokens,
and when each session was last used (sessions nobody uses any more are found by that)."""

import time
from dataclasses import dataclass, field

import torch

from eft_core import NotFoundError, OverloadedError
from services.worker.batch import SessionKV


@dataclass
class Session:
    tokens: list[int] = field(default_factory=list)  # what the cache holds
    kv: SessionKV | None = None
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

    def usage(self) -> tuple[int, int]:
        """Sessions and cached tokens held now."""
        return len(self), self.cached_tokens

    def reserve(self, usage: tuple[int, int], new_sessions: int, new_tokens: int, field: str) -> None:
        """Refuse, before any work, what would go over the budget from ``usage`` (taken once
        per call: counting the tokens walks every session); ``field``: whose ask it is."""
        sessions, tokens = usage
        if sessions + new_sessions > self.max_sessions:
            raise OverloadedError(f"{sessions} sessions held, {new_sessions} more asked, budget {self.max_sessions}", field=field)
        if tokens + new_tokens > self.max_cached_tokens:
            raise OverloadedError(f"{tokens} tokens cached, {new_tokens} more asked, budget {self.max_cached_tokens}", field=field)

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
