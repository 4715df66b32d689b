"""Self-tuning: how many tokens to draft for a request, from what speculation gained and cost so far.

A draft of k tokens with per-token acceptance a yields (1 - a^(k+1)) / (1 - a) tokens per step (the accepted
drafts and the target's own token). It costs the extra verify rows (StepCosts measures the forward pass by its
number of rows) and k drafted tokens (measured per drafter). The tuner takes the k with the most tokens per second
and drafts nothing unless that beats plain decoding by a margin; switched off, it probes now and then (backing off)
so that a request whose text turns repetitive gets speculation back.
"""

from __future__ import annotations

import math
from collections.abc import Callable

DECAY = 0.7  # weight of the past in the acceptance estimate, per verify step
PRIOR_ACCEPTANCE, PRIOR_WEIGHT = 0.6, 2.0  # a fresh request starts optimistic, worth two verify steps
MARGIN = 0.1  # speculation must promise this much more speed than plain decoding
PRIOR_ROW_COST = 0.1  # until measured: each extra row costs this share of a one-row step
FIRST_PROBE, LAST_PROBE = 8, 256  # steps between probes while switched off: doubling from the first to the last
PROBE_BUDGET = 0.02  # while off, probes cost at most this share of decoding: a costly drafter probes less often


def expected_tokens(acceptance: float, k: int) -> float:
    return sum(acceptance**i for i in range(k + 1))


class StepCosts:
    """Time of the forward pass by its number of token rows: an average per row count, interpolated between."""

    def __init__(self, decay: float = 0.8):
        self.decay = decay
        self._seconds: dict[int, float] = {}

    def observe(self, rows: int, seconds: float) -> None:
        old = self._seconds.get(rows)
        self._seconds[rows] = seconds if old is None else self.decay * old + (1 - self.decay) * seconds

    def estimate(self, rows: int) -> float | None:
        if rows <= 0:
            return 0.0
        if rows in self._seconds:
            return self._seconds[rows]
        below = max((n for n in self._seconds if n < rows), default=None)
        above = min((n for n in self._seconds if n > rows), default=None)
        if below is not None and above is not None:
            share = (rows - below) / (above - below)
            return self._seconds[below] + share * (self._seconds[above] - self._seconds[below])
        if below is not None:
            return self._seconds[below] * (1 + PRIOR_ROW_COST * (rows - below))
        if above is not None:
            return self._seconds[above] / (1 + PRIOR_ROW_COST * (above - rows))
        return None


class DraftTuner:
    """One request's acceptance estimate and its on/off state."""

    def __init__(self, max_tokens: int):
        self.max_tokens = max_tokens
        self.accepted, self.trials = PRIOR_ACCEPTANCE * PRIOR_WEIGHT, PRIOR_WEIGHT
        self.idle_steps, self.probe_every = 0, FIRST_PROBE
        self.enabled = True

    @property
    def acceptance(self) -> float:
        return self.accepted / self.trials

    def record(self, drafted: int, accepted: int) -> None:
        """A verify step kept `accepted` of `drafted` tokens: that many successes, one failure if it stopped early."""
        self.accepted = DECAY * self.accepted + accepted
        self.trials = DECAY * self.trials + accepted + (accepted < drafted)

    def choose(self, step_cost: Callable[[int], float | None], draft_cost: float | None) -> int:
        """Draft length for the next step. step_cost(k): extra seconds of a step that verifies k drafts of this
        request (None until measured); draft_cost: seconds per drafted token, None until the drafter has run (then
        one token is drafted, to measure it: a model drafter can cost half a step per token)."""
        best = 0
        plain = step_cost(0)
        if plain is not None and plain > 0:
            best_value = (1 + MARGIN) / plain  # what plain decoding gives, plus the margin speculation must beat
            for k in range(1, self.max_tokens + 1 if draft_cost is not None else 2):
                measured = step_cost(k)
                # More rows never cost less: on a noisy machine a lucky sample must not switch speculation on.
                cost = None if measured is None else max(measured, plain)
                value = expected_tokens(self.acceptance, k) / (cost + k * (draft_cost or 0.0)) if cost else 0.0
                if value > best_value:
                    best, best_value = k, value
        else:  # nothing measured yet: draft as much as allowed while acceptance looks good
            best = self.max_tokens if self.acceptance >= PRIOR_ACCEPTANCE / 2 else 0
            best = min(best, 1) if draft_cost is None else best
        self.enabled = best > 0
        if best:
            self.idle_steps, self.probe_every = 0, FIRST_PROBE
            return best
        self.idle_steps += 1
        if plain:  # a probe costs a verify row and a drafted token: space probes so that they stay within budget
            one = step_cost(1)
            probe = (max(one or plain, plain) - plain + (draft_cost or 0.0)) / plain
            self.probe_every = max(self.probe_every, min(LAST_PROBE, math.ceil(probe / PROBE_BUDGET)))
        if self.idle_steps >= self.probe_every:  # off: look again now and then
            self.idle_steps, self.probe_every = 0, min(2 * self.probe_every, LAST_PROBE)
            return 1
        return 0
