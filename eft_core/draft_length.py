"""How many tokens to draft: the cost model of speculative decoding (Leviathan et al. 2023,
section 3), used by adaptive speculation and by the benchmarks' ideal speedup.

With each draft token accepted independently with probability ``a`` (the acceptance rate),
one speculative step of k drafts emits on average

    E[emitted] = 1 + a + a^2 + ... + a^k = (1 - a^(k+1)) / (1 - a)

tokens, and costs k draft steps plus one scoring call. Measured in scoring calls (a plain
decoding step costs 1 and emits 1 token), with ``c`` the cost of one draft step:

    speedup(a, k, c) = E[emitted] / (1 + k c)

Adaptive speculation picks, per request, the k that maximises it for its running
acceptance estimate and the measured c.
"""

from dataclasses import dataclass

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


def best_draft_k(acceptance: float, draft_cost: float, max_k: int) -> int:
    """The k in [1, max_k] with the highest ideal speedup (ties: the smaller k). Never 0, so
    that a request keeps measuring its acceptance."""
    require(max_k >= 1, "max_k", f"must be >= 1, got {max_k}")
    return max(range(1, max_k + 1), key=lambda k: (ideal_speedup(acceptance, k, draft_cost), -k))


@dataclass
class AcceptanceEstimate:
    """A request's running acceptance rate: exponentially decayed counts of accepted draft
    tokens and of trials (each accepted token is a trial, and so is the first rejection;
    tokens after it were never judged), starting from ``prior`` worth ``prior_weight`` trials."""

    prior: float = 0.7
    prior_weight: float = 2.0
    decay: float = 0.8  # weight of the past at each new draft
    accepted: float = 0.0
    trials: float = 0.0

    def observe(self, num_draft: int, num_accepted: int) -> None:
        rejected = 1 if num_accepted < num_draft else 0
        self.accepted = self.decay * self.accepted + num_accepted
        self.trials = self.decay * self.trials + num_accepted + rejected

    @property
    def rate(self) -> float:
        return (self.accepted + self.prior * self.prior_weight) / (self.trials + self.prior_weight)
