"""The engine's side of speculative decoding: before each step, ask the drafter for the running requests' drafts
(as many as each one's tuner says); after it, record what was accepted and what the step cost."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from leanlm.engine.request import Request
from leanlm.engine.speculative.tuner import DraftTuner, StepCosts
from leanlm.sampling.speculative import speculable


@dataclass
class SpeculativeStats:
    num_verify_steps: int = 0  # request-steps that verified drafts
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0


class Speculator:
    def __init__(self, drafter, max_draft_tokens: int, adaptive: bool = True):
        """adaptive=False drafts max_draft_tokens every step (tests, measurements); True lets each request's tuner
        choose, down to nothing."""
        self.drafter, self.max_draft_tokens, self.adaptive = drafter, max_draft_tokens, adaptive
        self.costs = StepCosts()
        self.draft_seconds_per_token = 0.0  # the drafter's measure; prompt lookup costs next to nothing
        self.stats = SpeculativeStats()
        self._tuners: dict[str, DraftTuner] = {}

    @property
    def name(self) -> str:
        return self.drafter.name

    def propose(self, running: Sequence[Request]) -> None:
        """Set draft_token_ids on the running requests that decode this step and whose tuner wants drafts."""
        decoding = [r for r in running if r.num_computed_tokens == r.num_tokens - 1 and speculable(r.params)]
        others = len(running) - 1  # rows of the rest of the batch, roughly: one each
        chosen, lengths = [], []
        for request in decoding:
            room = request.max_tokens - len(request.output_token_ids) - 1  # the target adds a token of its own
            k = min(self._length(request, others), room)
            if k > 0:
                chosen.append(request)
                lengths.append(k)
        if not chosen:
            return
        drafts = self.drafter.propose(chosen, lengths)
        measured = getattr(self.drafter, "seconds_per_token", None)
        if measured is not None:
            self.draft_seconds_per_token = measured
        for request in chosen:
            request.draft_token_ids = drafts.get(request.request_id, [])

    def _length(self, request: Request, others: int) -> int:
        if not self.adaptive:
            return self.max_draft_tokens
        tuner = self._tuners.get(request.request_id)
        if tuner is None:
            tuner = self._tuners[request.request_id] = DraftTuner(self.max_draft_tokens)
        base = self.costs.estimate(others) if others > 0 else 0.0

        def step_cost(k: int) -> float | None:
            total = self.costs.estimate(others + 1 + k)
            return None if total is None or base is None else total - base

        return tuner.choose(step_cost, self.draft_seconds_per_token)

    def observe_step(self, rows: int, seconds: float) -> None:
        self.costs.observe(rows, seconds)

    def record(self, request_id: str, drafted: int, accepted: int) -> None:
        self.stats.num_verify_steps += 1
        self.stats.num_draft_tokens += drafted
        self.stats.num_accepted_tokens += accepted
        if (tuner := self._tuners.get(request_id)) is not None:
            tuner.record(drafted, accepted)

    def tuner(self, request_id: str) -> DraftTuner | None:
        return self._tuners.get(request_id)

    def remove(self, request_id: str) -> None:
        self._tuners.pop(request_id, None)
        self.drafter.remove(request_id)
