"""A request's state as the scheduler sees it: its tokens, how many have KV in the cache, and where it is. No torch."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from leanlm.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # not admitted yet, or preempted (its blocks freed, to be recomputed)
    RUNNING = "running"  # holds blocks; runs a prefill chunk or a decode token each step it is scheduled
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int  # params.max_tokens, capped by the room left in the context window and the KV cache
    output_token_ids: list[int] = field(default_factory=list)
    all_token_ids: list[int] = field(default_factory=list)  # prompt + output, kept as one list for slicing
    # Tokens whose keys and values are in the cache. A running request has num_tokens - num_computed_tokens tokens
    # to run: the rest of its prompt (prefill, possibly in chunks), or its newest sampled token (decode).
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache when first admitted
    num_preemptions: int = 0
    # Speculative decoding: tokens a drafter proposes after the newest token, verified by the next step
    # (engine/speculative/). They are not part of all_token_ids until accepted.
    draft_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None

    def __post_init__(self) -> None:
        if not self.all_token_ids:
            self.all_token_ids = list(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
