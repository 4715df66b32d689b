"""Batch generation with a KV cache: one prefill over left-padded prompts, then one decode step per token.

Row b of the batch is prompt b, right-aligned so that every row's newest token sits in the same cache
column. Positions count from each prompt's first real token, and padding columns are masked out,
so each prompt gets the same tokens it would get alone.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from leanlm.cache.kv_cache import KV_CACHE_TYPES, default_cache_dtype
from leanlm.engine.outputs import RequestOutput, StreamChunk
from leanlm.engine.stop import StopStrings
from leanlm.errors import InvalidRequestError, PromptTooLongError
from leanlm.formats.tokenizer import IncrementalDetokenizer, Tokenizer
from leanlm.sampling.sampler import Sampler
from leanlm.sampling_params import SamplingParams


@dataclass
class _Request:
    output: RequestOutput
    params: SamplingParams
    sampler: Sampler
    detokenizer: IncrementalDetokenizer
    stops: StopStrings
    seen: torch.Tensor  # prompt + generated ids, for the repetition penalty
    max_new_tokens: int
    shown: int = 0  # characters of text already streamed

    def finish(self, reason: str) -> None:
        self.output.finish_reason = reason


class Generator:
    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer, kv_cache: str = "auto"):
        self.model = model
        self.tokenizer = tokenizer
        self.config = model.config
        self.device = next(model.parameters()).device
        self.cache_dtype = default_cache_dtype(next(model.parameters()).dtype, self.device)
        if kv_cache not in KV_CACHE_TYPES:
            raise InvalidRequestError(f"Unknown KV cache type '{kv_cache}'. Choose among: {', '.join(KV_CACHE_TYPES)}.")
        self.cache_class = KV_CACHE_TYPES[kv_cache]

    def check_prompt(self, token_ids: list[int]) -> None:
        if not token_ids:
            raise InvalidRequestError("The prompt is empty. Pass at least one token of text.")
        if len(token_ids) >= self.config.context_length:
            raise PromptTooLongError(
                f"The prompt has {len(token_ids)} tokens but the model's context window is "
                f"{self.config.context_length}, which must also hold at least one generated token. "
                "Shorten the prompt or use a model with a longer context."
            )

    @torch.inference_mode()
    def stream(
        self, prompts: list[list[int]], params: list[SamplingParams], texts: list[str | None] | None = None
    ) -> Iterator[list[StreamChunk]]:
        """Yield, after every step, the chunks of the requests that produced text or finished.

        The final RequestOutputs are available from `self.outputs` once the iterator is exhausted.
        """
        for ids in prompts:
            self.check_prompt(ids)
        requests = [
            self._new_request(i, ids, p, (texts or [None] * len(prompts))[i])
            for i, (ids, p) in enumerate(zip(prompts, params, strict=True))
        ]
        self.outputs = [r.output for r in requests]
        batch = len(prompts)
        prompt_width = max(len(ids) for ids in prompts)
        cache_len = max(len(ids) + r.max_new_tokens for ids, r in zip(prompts, requests, strict=True))
        pads = torch.tensor([prompt_width - len(ids) for ids in prompts], device=self.device)
        cache = self.cache_class(
            self.config.num_layers,
            batch,
            self.config.num_kv_heads,
            cache_len,
            self.config.head_dim,
            self.cache_dtype,
            self.device,
        )
        # (B, cache_len): which cache columns hold real tokens; None when no row is padded.
        key_valid = None
        if int(pads.max()) > 0:
            key_valid = torch.arange(cache_len, device=self.device).unsqueeze(0) >= pads.unsqueeze(1)

        started = time.perf_counter()
        input_ids = torch.tensor([[0] * (prompt_width - len(ids)) + ids for ids in prompts], device=self.device)
        columns = torch.arange(prompt_width, device=self.device).unsqueeze(0)
        positions = (columns - pads.unsqueeze(1)).clamp(min=0)
        mask = None
        if key_valid is not None:
            causal = columns.T >= columns  # (T, T) query column >= key column
            diagonal = torch.eye(prompt_width, dtype=torch.bool, device=self.device)  # pad rows attend themselves
            mask = ((causal & key_valid[:, None, :prompt_width]) | diagonal).unsqueeze(1)
        logits = self.model(input_ids, positions, cache, 0, mask, last_only=True)[:, -1]

        column = prompt_width
        first_token_at = None
        while True:
            next_tokens = [r.sampler(logits[b], r.seen) if not r.output.finished else 0 for b, r in enumerate(requests)]
            now = time.perf_counter()
            if first_token_at is None:
                first_token_at = now
            chunks = [
                chunk
                for b, r in enumerate(requests)
                if not r.output.finished
                if (chunk := self._append(r, next_tokens[b], now - started, now - first_token_at))
            ]
            if chunks:
                yield chunks
            if all(r.output.finished for r in requests) or column >= cache_len:
                break
            input_ids = torch.tensor(next_tokens, device=self.device).unsqueeze(1)
            positions = (column - pads).unsqueeze(1)
            mask = None if key_valid is None else key_valid[:, None, None, : column + 1]
            logits = self.model(input_ids, positions, cache, column, mask)[:, -1]
            column += 1
        for r in requests:
            if not r.output.finished:
                r.finish("length")

    def _new_request(self, index: int, ids: list[int], params: SamplingParams, text: str | None) -> _Request:
        output = RequestOutput(index=index, prompt=text, prompt_token_ids=list(ids))
        output.metrics.num_prompt_tokens = len(ids)
        room = self.config.context_length - len(ids)  # the context window caps generation
        return _Request(
            output,
            params,
            Sampler(params, self.device),
            IncrementalDetokenizer(self.tokenizer),
            StopStrings(params.stop),
            torch.tensor(ids, device=self.device),
            min(params.max_tokens, room),
        )

    def _append(self, r: _Request, token: int, since_start: float, since_first: float) -> StreamChunk | None:
        out, params = r.output, r.params
        out.token_ids.append(token)
        out.metrics.num_generated_tokens = len(out.token_ids)
        if len(out.token_ids) == 1:
            out.metrics.time_to_first_token_s = since_start
        out.metrics.decode_time_s = since_first
        if params.repetition_penalty != 1.0:
            r.seen = torch.cat([r.seen, r.seen.new_tensor([token])])
        ends = token in params.stop_token_ids or (not params.ignore_eos and token in self.tokenizer.eos_token_ids)
        if ends:
            r.finish("stop")
        else:
            before = len(r.detokenizer.text)
            r.detokenizer.push(token)
            text = r.detokenizer.text
            if (at := r.stops.find(text, before)) is not None:
                text = text[:at]
                r.finish("stop")
            elif len(out.token_ids) >= r.max_new_tokens:
                text += r.detokenizer.flush()
                r.finish("length")
            out.text = text
        show_up_to = len(out.text) if out.finished else r.stops.safe_length(out.text)
        new_text = out.text[r.shown : show_up_to]
        r.shown = max(r.shown, show_up_to)
        if new_text or out.finished:
            return StreamChunk(out.index, new_text, [token], out.finish_reason)
        return None

    def generate(
        self, prompts: list[list[int]], params: list[SamplingParams], texts: list[str | None] | None = None
    ) -> list[RequestOutput]:
        for _ in self.stream(prompts, params, texts):
            pass
        return self.outputs
