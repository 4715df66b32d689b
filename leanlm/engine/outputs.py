"""What generation returns: RequestOutputs from the engine (one per request and step), StreamChunks from LLM.stream."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestMetrics:
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    num_cached_prompt_tokens: int = 0  # prompt tokens served by the prefix cache (not recomputed)
    time_to_first_token_s: float = 0.0  # from add_request to the first sampled token
    decode_time_s: float = 0.0  # from the first token to the last
    arrival_time: float = 0.0  # time.perf_counter() at add_request
    first_token_time: float | None = None  # time.perf_counter() when the first token was sampled
    last_token_time: float | None = None
    num_draft_tokens: int = 0  # speculative decoding: tokens drafted for this request and verified
    num_accepted_tokens: int = 0  # of which the target accepted

    def copy(self) -> RequestMetrics:
        """A snapshot for one output (every token of every request takes one: 7x cheaper than dataclasses.replace)."""
        snapshot = object.__new__(RequestMetrics)
        snapshot.__dict__.update(self.__dict__)
        return snapshot

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.num_prompt_tokens / self.time_to_first_token_s if self.time_to_first_token_s else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        steps = self.num_generated_tokens - 1  # the first token comes from the prefill
        return steps / self.decode_time_s if steps > 0 and self.decode_time_s else 0.0


@dataclass(frozen=True)
class TokenLogprobs:
    """The log-probability of a generated token, and of the `top` most likely tokens at that step.

    Computed from the logits after the repetition penalty and before temperature and filters."""

    token_id: int
    logprob: float
    top: dict[int, float]  # token id -> log-probability, most likely first


@dataclass
class RequestOutput:
    """A snapshot of one request: cumulative `text`/`token_ids`/`logprobs`, plus the delta since its previous output.

    The engine returns a fresh object every step, so a consumer may keep it while the engine runs on."""

    index: int  # position of the prompt in an LLM.generate batch (0 for requests added to the engine directly)
    prompt: str | None
    prompt_token_ids: list[int]
    text: str = ""  # stop strings are never part of it
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (EOS, stop string or stop token), "length" or "abort"
    metrics: RequestMetrics = field(default_factory=RequestMetrics)
    request_id: str = ""
    new_text: str = ""  # text shown for the first time in this output (held back while it may start a stop string)
    new_token_ids: list[int] = field(default_factory=list)  # tokens sampled since the previous output
    logprobs: list[TokenLogprobs] | None = None  # one per token of token_ids when SamplingParams.logprobs is set
    # With SamplingParams.prompt_logprobs: one per prompt token, None for the first (nothing comes before it); set
    # once the whole prompt has run.
    prompt_logprobs: list[TokenLogprobs | None] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def new_logprobs(self) -> list[TokenLogprobs] | None:
        """The logprobs of new_token_ids."""
        if self.logprobs is None:
            return None
        return self.logprobs[len(self.logprobs) - len(self.new_token_ids) :]


@dataclass(frozen=True)
class StreamChunk:
    index: int
    text: str  # new text since the previous chunk of this request
    token_ids: list[int]  # tokens sampled since the previous chunk
    finish_reason: str | None = None

    def __str__(self) -> str:
        return self.text
