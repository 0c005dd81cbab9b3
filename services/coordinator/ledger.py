"""A request's cache ledger: what each of its worker caches holds, lacks and must cut.

Keys: a scored model's name (its cache on the replica placed for that model), or ``DRAFT``
(the drafter's own cache, ``<request id>#draft`` on the worker). Each call sends a cache the
tokens it lacks, with a pending rollback riding on it (``truncate_to``); the length the
worker answers is checked against the one expected, so a cache the worker lost is noticed
before a token is decided from it.
"""

from collections.abc import Iterable, Mapping

DRAFT = "#draft"  # the drafter's cache: a session id suffix too


class CacheLedger:
    def __init__(self, prompts: Mapping[str, list[int]]):
        """``prompts``: per key, the tokens its cache starts with (all unsent)."""
        self.unsent = {key: list(tokens) for key, tokens in prompts.items()}  # key -> tokens its cache lacks
        self.cached: dict[str, int] = {}  # key -> tokens its cache holds (after pending rollbacks)
        self.rollback: dict[str, int] = {}  # key -> length to truncate to, sent with its next call

    def to_send(self, key: str, most: int | None = None) -> tuple[list[int], int | None]:
        """The tokens the cache lacks (the first ``most`` of them), and the length to cut it
        to first (None: no cut); the rollback leaves the ledger with this call."""
        tokens = self.unsent[key] if most is None else self.unsent[key][:most]
        return tokens, self.rollback.pop(key, None)

    def prefilled(self, keys: Iterable[str], sent: int) -> None:
        """After an iteration that sent these caches the first ``sent`` tokens they lacked
        (a part of the prompt): they lack the rest."""
        for key in keys:
            self.unsent[key] = self.unsent[key][sent:]

    def answered(self, key: str, added: int, length: int) -> int | None:
        """Record the length the worker says the cache holds after ``added`` tokens. Returns
        the length expected when it differs (the worker lost the cache: freed as idle, or a
        new replica at the same address, answering from a fresh one), else None."""
        expected = self.cached.get(key, 0) + added
        self.cached[key] = length
        return None if length == expected else expected

    def stepped(self, scored: Iterable[str], drafts: list[int], emitted: list[int], drafting: bool) -> None:
        """After an iteration that scored ``drafts`` and emitted ``emitted``: every cache keeps
        the accepted drafts and lacks the last emitted token; the rejected drafts are cut by
        a rollback on each cache's next call."""
        k, accepted, last = len(drafts), len(emitted) - 1, emitted[-1]
        for key in scored:  # they hold all k drafts
            self._keep(key, self.cached[key] - k + accepted)
            self.unsent[key] = [last]
        if drafting and k:  # the drafter holds k - 1 drafts: its last one was never fed
            fed = k - 1
            self._keep(DRAFT, self.cached[DRAFT] - fed + min(accepted, fed))
            self.unsent[DRAFT] = ([drafts[-1]] if accepted == k else []) + [last]
        elif drafting:
            self.unsent[DRAFT] = self.unsent[DRAFT] + [last]

    def released(self) -> None:
        """The sessions are freed: no cache holds anything."""
        self.cached.clear()

    def _keep(self, key: str, length: int) -> None:
        if length < self.cached[key]:
            self.cached[key] = length
            self.rollback[key] = min(length, self.rollback.get(key, length))
