"""What sampling keeps for one request between steps: its params, its seeded generator, the tokens it has seen."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from leanlm.sampling.grammar import Constraint
from leanlm.sampling_params import SamplingParams


class SeenTokens:
    """The distinct token ids of a request's prompt and output, as a tensor that grows in place.

    The repetition penalty depends only on which tokens were seen, so it reads and writes just these entries of a
    row of logits; a new token costs O(1) here (the buffer doubles when full), never a copy of the whole list."""

    def __init__(self, token_ids: Iterable[int], device: torch.device):
        unique = list(dict.fromkeys(token_ids))
        self._members = set(unique)
        self._buffer = torch.empty(max(64, 2 * len(unique)), dtype=torch.long, device=device)
        self._buffer[: len(unique)] = torch.tensor(unique, dtype=torch.long, device=device)
        self._count = len(unique)

    def add(self, token_id: int) -> None:
        if token_id in self._members:
            return
        self._members.add(token_id)
        if self._count == self._buffer.numel():
            grown = self._buffer.new_empty(2 * self._count)
            grown[: self._count] = self._buffer
            self._buffer = grown
        self._buffer[self._count] = token_id
        self._count += 1

    @property
    def ids(self) -> torch.Tensor:
        return self._buffer[: self._count]


class SamplingState:
    def __init__(
        self,
        params: SamplingParams,
        prompt_token_ids: Iterable[int],
        device: torch.device | str = "cpu",
        constraint: Constraint | None = None,
    ):
        self.params = params
        self.constraint = constraint  # the grammar of a structured-output request (sampling/grammar.py)
        device = torch.device(device)
        self.generator = None
        if params.seed is not None and not params.greedy:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(params.seed)
        self.penalized = params.repetition_penalty != 1.0
        self.seen = SeenTokens(prompt_token_ids, device) if self.penalized else None
        self.plain_greedy = params.greedy and not self.penalized and params.logprobs is None and constraint is None

    def append(self, token_id: int) -> None:
        if self.seen is not None:
            self.seen.add(token_id)
        if self.constraint is not None:
            self.constraint.consume(token_id)
