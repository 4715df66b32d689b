"""A request's state as the scheduler sees it: its tokens, how many have KV in the cache, and where it is. No torch."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from leanlm.sampling_params import SamplingParams


@dataclass(frozen=True, eq=False)
class EncoderInput:
    """What an encoder-decoder request's encoder reads (Whisper: one 30 s window of log-mel frames), opaque here:
    the model runner encodes it when the scheduler first admits a request over it, and holds the result (the
    cross-attention keys and values) read-only until the last request reading it ends."""

    data: object  # the model's input (a tensor); the scheduler never looks inside
    content_hash: str  # names the input: the encoder cache's key, and the salt of the request's prefix-cache hashes


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
    encoder_input: EncoderInput | None = None  # set for an encoder-decoder model's requests

    @property
    def cache_salt(self) -> str | None:
        """Parent of the first prefix-cache block hash: decoder tokens over different encoder inputs never match."""
        return None if self.encoder_input is None else self.encoder_input.content_hash

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
