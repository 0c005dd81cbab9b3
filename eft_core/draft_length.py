"""How many tokens to draft: the cost model of speculative decoding (Leviathan et al. 2023,
section 3), used by the benchmarks' ideal speedup, and the tuner adaptive speculation runs.

With each draft token accepted independently with probability ``a`` (the acceptance rate),
one speculative step of k drafts emits on average

    E[emitted] = 1 + a + a^2 + ... + a^k = (1 - a^(k+1)) / (1 - a)

tokens, and costs k draft steps plus one scoring call. Measured in scoring calls (a plain
decoding step costs 1 and emits 1 token), with ``c`` the cost of one draft step:

    speedup(a, k, c) = E[emitted] / (1 + k c)

Adaptive speculation does not trust this model to pick k: acceptance here comes in bursts
rather than independently per token, and in a busy batch scoring k + 1 positions per row
costs more than one. ``DraftLengthTuner`` measures instead.
"""

from dataclasses import dataclass, field

from eft_core.errors import require


def expected_emitted(acceptance: float, k: int) -> float:
    """Expected tokens one step with k drafts emits (accepted drafts + the recovered/bonus token)."""
    require(0.0 <= acceptance <= 1.0, "acceptance", f"must be in [0, 1], got {acceptance}")
    require(k >= 0, "k", f"must be >= 0, got {k}")
    return float(k + 1) if acceptance == 1.0 else (1.0 - acceptance ** (k + 1)) / (1.0 - acceptance)


def ideal_speedup(acceptance: float, k: int, draft_cost: float) -> float:
    """Tokens per unit time over plain decoding, ``draft_cost`` being one draft step's cost
    in scoring calls."""
    require(draft_cost >= 0.0, "draft_cost", f"must be >= 0, got {draft_cost}")
    return expected_emitted(acceptance, k) / (1.0 + k * draft_cost)


@dataclass
class _Rate:
    """Tokens per second of the iterations that ran one k, exponentially decayed."""

    tokens: float = 0.0
    seconds: float = 0.0
    last_tried: int = -1  # the iteration number it last ran at

    def add(self, tokens: int, seconds: float, decay: float, iteration: int) -> None:
        self.tokens, self.seconds, self.last_tried = decay * self.tokens + tokens, decay * self.seconds + seconds, iteration

    @property
    def value(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class DraftLengthTuner:
    """The k that adaptive requests draft in an iteration, chosen from measured throughput:
    tokens emitted per second of iteration, for each k in ``choices``, per context (the
    composition, greedy or sampled, and the number of running requests' power-of-two
    bucket: drafting pays less in a busy batch, where scoring k + 1 positions per row is
    no longer almost free). Measured rather than modelled: it sees the real costs of
    drafting, scoring and deciding at this load, and acceptance as it comes, bursts and all.

    The search climbs: a context starts at ``start``; a k next to the best so far that has
    not run yet runs next; once both neighbours have run, the best runs, and every
    ``explore_every``-th iteration the neighbour that ran least recently runs instead, so a
    change of load or of acceptance is followed. k = 0 is a choice: where drafting does not
    pay, speculation stops (vLLM disables it by batch size for the same reason)."""

    choices: tuple[int, ...] = (0, 1, 2, 3, 4, 6, 8)
    start: int = 4
    explore_every: int = 16
    decay: float = 0.98  # weight of the past at each new iteration of a k: about 50 iterations remembered, as one iteration's tokens vary from 1 to k + 1
    _rates: dict = field(default_factory=dict)  # context -> {k: _Rate}
    _iteration: int = 0

    def __post_init__(self):
        require(len(self.choices) > 0 and list(self.choices) == sorted(set(self.choices)) and self.choices[0] >= 0, "choices", f"must be distinct draft lengths >= 0 in increasing order, got {self.choices}")
        self.start = min(self.choices, key=lambda k: abs(k - self.start))  # the choice nearest the asked start

    @staticmethod
    def context(composition: str, greedy: bool, running: int) -> tuple:
        return composition, greedy, max(running, 1).bit_length()

    def choose(self, context: tuple) -> int:
        rates = self._rates.setdefault(context, {k: _Rate() for k in self.choices})
        self._iteration += 1
        tried = [k for k in self.choices if rates[k].seconds > 0]
        if not tried:
            return self.start
        best = max(tried, key=lambda k: rates[k].value)
        at = self.choices.index(best)
        neighbours = self.choices[max(at - 1, 0) : at] + self.choices[at + 1 : at + 2]
        untried = [k for k in neighbours if k not in tried]
        if untried:
            return untried[0]
        if not neighbours or self._iteration % self.explore_every:
            return best
        return min(neighbours, key=lambda k: rates[k].last_tried)

    def observe(self, context: tuple, k: int, tokens: int, seconds: float) -> None:
        """An iteration in ``context`` in which the requests ran ``k`` drafts emitted ``tokens``."""
        rates = self._rates.setdefault(context, {c: _Rate() for c in self.choices})
        if k in rates:
            rates[k].add(tokens, seconds, self.decay, self._iteration)
