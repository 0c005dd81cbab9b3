"""Step statistics: plain counters filled by the decoding loop, exported elsewhere.

Acceptance rate = accepted_tokens / draft_tokens; mean accepted length = accepted_tokens / drafts.
"""

from dataclasses import dataclass, field


@dataclass
class SpeculationStats:
    """Counts of drafts and accepted tokens, also per draft position (0-based)."""

    drafts: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)

    def observe_draft(self, n_draft: int, n_accepted: int) -> None:
        """Record one draft of ``n_draft`` tokens of which the first ``n_accepted`` were kept."""
        assert 0 <= n_accepted <= n_draft, (n_draft, n_accepted)
        if n_draft == 0:
            return
        self.drafts += 1
        self.draft_tokens += n_draft
        self.accepted_tokens += n_accepted
        self._grow(n_draft)
        for position in range(n_accepted):
            self.accepted_per_position[position] += 1

    def merge(self, other: "SpeculationStats") -> None:
        self.drafts += other.drafts
        self.draft_tokens += other.draft_tokens
        self.accepted_tokens += other.accepted_tokens
        self._grow(len(other.accepted_per_position))
        for position, count in enumerate(other.accepted_per_position):
            self.accepted_per_position[position] += count

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        return self.accepted_tokens / self.drafts if self.drafts else 0.0

    def _grow(self, positions: int) -> None:
        missing = positions - len(self.accepted_per_position)
        self.accepted_per_position.extend([0] * max(0, missing))
