"""Per-request generation parameters, validated on construction (names follow vLLM / OpenAI)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from leanlm.errors import InvalidRequestError


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 128
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or output
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)  # strings that end generation; never part of the output
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False  # keep going past end-of-sequence tokens (benchmarks)
    logprobs: int | None = None  # top log-probabilities to return per generated token (0..20); None = none
    # Log-probabilities of the prompt's own tokens (each given the ones before it) plus this many top alternatives
    # (0..20), as vLLM's prompt_logprobs: what scoring (lm-evaluation-harness loglikelihood) needs. Such a request
    # computes its whole prompt (no prefix-cache reuse), and may set max_tokens=0 to only score.
    prompt_logprobs: int | None = None
    # Structured output (at most one; needs llguidance): the output matches a JSON schema (a dict or its JSON text),
    # a regular expression, or a Lark grammar (sampling/grammar.py). Checked when the engine adds the request.
    json_schema: str | None = None
    regex: str | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.json_schema, dict):  # kept as text: params stay immutable and hashable
            object.__setattr__(self, "json_schema", json.dumps(self.json_schema))
        constraints = [n for n in ("json_schema", "regex", "grammar") if getattr(self, n) is not None]
        _check(len(constraints) <= 1, f"give at most one of json_schema, regex and grammar, got {constraints}")
        _check(
            all(isinstance(getattr(self, n), str) and getattr(self, n) for n in constraints),
            f"{', '.join(constraints)} must be a non-empty string (json_schema: or a dict)",
        )
        if isinstance(self.stop, str):  # accept stop="###" as OpenAI does
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        least = 0 if self.prompt_logprobs is not None else 1  # scoring a prompt needs no generated token
        _check(
            isinstance(self.max_tokens, int) and not isinstance(self.max_tokens, bool) and self.max_tokens >= least,
            f"max_tokens must be an integer >= {least}, got {self.max_tokens!r}"
            + ("" if least == 0 else " (0 only with prompt_logprobs)"),
        )
        _check(self.temperature >= 0, f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        _check(
            isinstance(self.top_k, int) and self.top_k >= 0,
            f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}",
        )
        _check(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        _check(0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}")
        _check(self.repetition_penalty > 0, f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings")
        _check(self.seed is None or isinstance(self.seed, int), f"seed must be an integer, got {self.seed!r}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            _check(
                value is None or (isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 20),
                f"{name} must be an integer in 0..20 (or None), got {value!r}",
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def constrained(self) -> bool:
        return self.json_schema is not None or self.regex is not None or self.grammar is not None


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise InvalidRequestError(f"Invalid sampling parameter: {message}.")
