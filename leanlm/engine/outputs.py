"""What generation returns: a finished RequestOutput per prompt, StreamChunks while it runs."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestMetrics:
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    time_to_first_token_s: float = 0.0  # prefill of the whole batch + first sample
    decode_time_s: float = 0.0  # from the first token to the last

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.num_prompt_tokens / self.time_to_first_token_s if self.time_to_first_token_s else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        steps = self.num_generated_tokens - 1  # the first token comes from the prefill
        return steps / self.decode_time_s if steps > 0 and self.decode_time_s else 0.0


@dataclass
class RequestOutput:
    index: int  # position of the prompt in the batch
    prompt: str | None
    prompt_token_ids: list[int]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (EOS, stop string or stop token) or "length"
    metrics: RequestMetrics = field(default_factory=RequestMetrics)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class StreamChunk:
    index: int
    text: str  # new text since the previous chunk of this request
    token_ids: list[int]
    finish_reason: str | None = None

    def __str__(self) -> str:
        return self.text
