"""A tiny stand-in for LLM + LLMEngine, for server unit tests that need no model.

The fake "model" answers a prompt of token ids with the ids counting up from the prompt's last id; token i
decodes to the text f"<{i}>". It follows the engine contract: deltas, finish reasons, stats, abort.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

from leanlm.engine.outputs import RequestOutput, TokenLogprobs
from leanlm.errors import PromptTooLongError


@dataclass
class FakeStats:
    num_running: int = 0
    num_waiting: int = 0
    kv_blocks_used: int = 0
    kv_blocks_cached: int = 0
    kv_blocks_total: int = 100
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_preemptions: int = 0
    total_generated_tokens: int = 0


@dataclass
class _Request:
    request_id: str
    prompt: list[int]
    params: object
    tokens: list[int] = field(default_factory=list)


class FakeTokenizer:
    eos_token_ids = frozenset({0})
    special_tokens = {"eos_token": "<0>"}
    chat_template = None

    def decode(self, ids, skip_special_tokens=True):
        return "".join(f"<{i}>" for i in ids)

    def encode(self, text, add_special_tokens=True):
        return [ord(c) for c in text]

    def encode_chat(self, messages, tools=None, special_tokens_in_content=False, add_generation_prompt=True):
        """Each character is one token id; the chat template joins the contents."""
        return [ord(c) for c in "|".join(m.get("content") or "" for m in messages) + ">"]


class FakeEngine:
    def __init__(
        self, max_num_seqs: int = 4, context_length: int = 64, step_delay_s: float = 0.0, max_cached_tokens: int = 64
    ):
        self.config = SimpleNamespace(max_num_seqs=max_num_seqs)
        self.context_length = context_length
        self.max_cached_tokens = max_cached_tokens  # the KV cache may hold less than the context
        self.step_delay_s = step_delay_s
        self.requests: dict[str, _Request] = {}
        self.generated = 0
        self.aborted: list[str] = []

    def add_request(self, request_id, prompt_token_ids, params, prompt=None):
        if len(prompt_token_ids) >= min(self.context_length, self.max_cached_tokens):
            raise PromptTooLongError(f"prompt of {len(prompt_token_ids)} tokens does not fit")
        self.requests[request_id] = _Request(request_id, list(prompt_token_ids), params)

    def abort_request(self, request_id):
        if self.requests.pop(request_id, None) is not None:
            self.aborted.append(request_id)

    def has_unfinished_requests(self):
        return bool(self.requests)

    def step(self):
        import time

        time.sleep(self.step_delay_s)
        outputs = []
        for request in list(self.requests.values())[: self.config.max_num_seqs]:
            token = request.prompt[-1] + len(request.tokens) + 1
            request.tokens.append(token)
            self.generated += 1
            finish = "length" if len(request.tokens) >= request.params.max_tokens else None
            text = FakeTokenizer().decode(request.tokens)
            logprobs = None
            if request.params.logprobs is not None:
                logprobs = [TokenLogprobs(t, -0.5, {t: -0.5, t + 1: -1.5}) for t in request.tokens]
            outputs.append(
                RequestOutput(
                    index=0,
                    prompt=None,
                    prompt_token_ids=request.prompt,
                    text=text,
                    token_ids=list(request.tokens),
                    finish_reason=finish,
                    request_id=request.request_id,
                    new_text=f"<{token}>",
                    new_token_ids=[token],
                    logprobs=logprobs,
                )
            )
            if finish:
                del self.requests[request.request_id]
        return outputs

    def stats(self):
        running = min(len(self.requests), self.config.max_num_seqs)
        return FakeStats(
            num_running=running,
            num_waiting=len(self.requests) - running,
            kv_blocks_used=sum(1 + (len(r.prompt) + len(r.tokens)) // 16 for r in self.requests.values()),
            total_generated_tokens=self.generated,
        )


class FakeLLM:
    """encode: each character is one token id (its code point); see FakeTokenizer.encode_chat for chat."""

    def __init__(self, engine: FakeEngine):
        self.engine = engine
        self.tokenizer = FakeTokenizer()
        self.config = SimpleNamespace(context_length=engine.context_length, vocab_size=1 << 20)

    def encode(self, prompt):
        return [ord(c) for c in prompt] if isinstance(prompt, str) else list(prompt)
