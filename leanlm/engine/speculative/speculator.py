"""The engine's side of speculative decoding: before each step, ask the drafter for the running requests' drafts
(as many as each one's tuner says); after it, record what was accepted and what the step cost."""

from __future__ import annotations

from collections.abc import Callable, Sequence
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
        # A drafter that sizes its drafts itself (prompt lookup: by the match length) gets the whole cap whenever
        # its tuner says drafting pays; the tuner's geometric acceptance model would cut its long, sure copies short.
        self.drafter_sizes_drafts = getattr(drafter, "sizes_its_drafts", False)
        self.costs = StepCosts()
        # The drafter's measure (None until a model drafter has run); prompt lookup costs next to nothing.
        measures = hasattr(drafter, "seconds_per_token")
        self.draft_seconds_per_token: float | None = drafter.seconds_per_token if measures else 0.0
        self.stats = SpeculativeStats()
        self._tuners: dict[str, DraftTuner] = {}
        # (lists, width) -> rank 0's lists, set under tensor parallelism (distributed/tensor_parallel.py): draft
        # lengths come from each rank's own timings, and every rank must run the same rows.
        self.synchronize: Callable[[list[list[int]], int], list[list[int]]] | None = None

    @property
    def name(self) -> str:
        return self.drafter.name

    def propose(self, running: Sequence[Request]) -> None:
        """Set draft_token_ids on the running requests that decode this step and whose tuner wants drafts."""
        decoding = [r for r in running if r.num_computed_tokens == r.num_tokens - 1 and speculable(r.params)]
        if not decoding:
            return
        others = len(running) - 1  # rows of the rest of the batch, roughly: one each
        lengths = []
        for request in decoding:
            room = request.max_tokens - len(request.output_token_ids) - 1  # the target adds a token of its own
            lengths.append(max(0, min(self._length(request, others), room)))
        if self.synchronize is not None:  # tensor parallelism: every rank drafts as rank 0 chose
            lengths = [k for (k,) in self.synchronize([[k] for k in lengths], 1)]
        chosen = [(request, k) for request, k in zip(decoding, lengths, strict=True) if k > 0]
        if not chosen:
            return
        drafts = self.drafter.propose([r for r, _ in chosen], [k for _, k in chosen])
        measured = getattr(self.drafter, "seconds_per_token", None)
        if measured is not None:
            self.draft_seconds_per_token = measured
        proposals = [drafts.get(request.request_id, [])[:k] for request, k in chosen]
        if self.synchronize is not None:  # and verifies rank 0's drafts
            proposals = self.synchronize(proposals, max(k for _, k in chosen))
        for (request, _), draft in zip(chosen, proposals, strict=True):
            request.draft_token_ids = list(draft)

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

        k = tuner.choose(step_cost, self.draft_seconds_per_token)
        return self.max_draft_tokens if k and tuner.enabled and self.drafter_sizes_drafts else k

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
