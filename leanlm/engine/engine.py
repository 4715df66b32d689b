"""LLMEngine: requests come in with add_request; each step() runs one batch and returns what it produced.

A step is three calls: the scheduler picks (request, number of tokens) pairs under the token budget, the model
runner runs them as one forward pass and samples, and output processing appends each sampled token, turns it
into text (stop strings, EOS, length limits) and frees the requests that finished.
The engine is not thread-safe: one thread owns it (the server runs it in a thread of its own).
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field

import torch

from leanlm.cache.block_manager import BlockManager
from leanlm.cache.kv_cache import default_cache_dtype
from leanlm.cache.paged_kv import PAGED_KV_CACHE_TYPES
from leanlm.config import EngineConfig
from leanlm.engine.model_runner import LogitsProcessor, ModelRunner, RunnerOutput, SampledToken, ScoredPrompt
from leanlm.engine.outputs import RequestMetrics, RequestOutput, TokenLogprobs
from leanlm.engine.request import EncoderInput, Request
from leanlm.engine.scheduler import Scheduler, SchedulerOutput
from leanlm.engine.speculative.factory import build_speculator
from leanlm.engine.speculative.speculator import SpeculativeStats
from leanlm.engine.stop import StopStrings
from leanlm.errors import InvalidRequestError, PromptTooLongError
from leanlm.formats.tokenizer import IncrementalDetokenizer, Tokenizer
from leanlm.kernels.threads import scoped_threads
from leanlm.sampling.grammar import GrammarCompiler
from leanlm.sampling_params import SamplingParams

# Without --kv-cache-memory the cache takes this share of free memory, at most CPU_KV_CACHE_CAP on CPU
# (pages are committed as blocks are first written, so an idle cache costs little resident memory).
FREE_MEMORY_SHARE = {"cpu": 0.25, "cuda": 0.5}
CPU_KV_CACHE_CAP = 2 * 2**30


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_blocks_used: int  # referenced by a request; 0 when idle
    kv_blocks_cached: int  # unreferenced but holding prefix data (evicted on demand)
    kv_blocks_total: int
    kv_block_size: int
    prefix_cache_queries: int  # prompt tokens looked up
    prefix_cache_hits: int  # of which found in the cache
    num_preemptions: int
    total_generated_tokens: int
    speculative: SpeculativeStats | None = None  # drafted and accepted tokens, with --speculative


@dataclass
class _Progress:
    """The output side of one request: text so far, what was shown, its stop strings and metrics."""

    request: Request
    prompt: str | None
    detokenizer: IncrementalDetokenizer
    stops: StopStrings
    metrics: RequestMetrics
    decoded: str = ""  # all text decoded so far
    text: str = ""  # decoded text without any stop string
    shown: int = 0  # characters of text already sent in new_text
    logprobs: list[TokenLogprobs] | None = field(default=None)
    prompt_logprobs: list[TokenLogprobs | None] | None = field(default=None)  # first entry None: nothing before it

    def add_scores(self, scored: ScoredPrompt) -> None:
        """Keep the prompt tokens' log-probabilities in order; a preempted request recomputes ones already kept."""
        if self.prompt_logprobs is not None and scored.first_position == len(self.prompt_logprobs):
            self.prompt_logprobs += [TokenLogprobs(t.token_id, t.logprob, dict(t.top)) for t in scored.tokens]


class LLMEngine:
    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Tokenizer,
        config: EngineConfig | None = None,
        kv_cache: str = "auto",
        threads: int | None = None,
        draft_model: torch.nn.Module | None = None,
    ):
        """threads: torch threads for this engine's steps only (kernels/threads.py); None keeps the caller's.
        draft_model: a built model for config.speculative = "draft:..." (else loaded from the name)."""
        if kv_cache not in PAGED_KV_CACHE_TYPES:
            raise InvalidRequestError(
                f"Unknown KV cache type '{kv_cache}'. Choose among: {', '.join(PAGED_KV_CACHE_TYPES)}."
            )
        self.model, self.tokenizer = model, tokenizer
        self.kv_cache_type = kv_cache  # kept so that an engine rebuilt for a new model (compress/) keeps its cache
        self.threads = threads
        self.config = config or EngineConfig()
        self.model_config = model.config
        first_param = next(model.parameters())
        self.device = first_param.device
        self.cache_dtype = default_cache_dtype(first_param.dtype, self.device)
        cache_class = PAGED_KV_CACHE_TYPES[kv_cache]
        mc = self.model_config
        self.kv_bytes_per_token = cache_class.bytes_per_token(
            mc.num_layers, mc.num_kv_heads, mc.head_dim, self.cache_dtype
        )
        num_blocks = self._num_blocks()
        self.cache = cache_class(
            mc.num_layers,
            num_blocks,
            self.config.block_size,
            mc.num_kv_heads,
            mc.head_dim,
            self.cache_dtype,
            self.device,
        )
        self.block_manager = BlockManager(num_blocks, self.config.block_size, self.config.enable_prefix_caching)
        self.scheduler = Scheduler(self.config, self.block_manager)
        self.runner = ModelRunner(model, self.cache, self.device)
        self.speculator = None
        if self.config.speculative and self.runner.is_encoder_decoder:
            raise InvalidRequestError(
                "Speculative decoding does not run encoder-decoder models (Whisper) yet. Drop --speculative."
            )
        if self.config.speculative:
            self.speculator = build_speculator(
                self.config, model, tokenizer, self.cache, self.block_manager, draft_model
            )
        self._progress: dict[str, _Progress] = {}
        self._aborted: list[RequestOutput] = []  # returned by the next step
        self.total_generated_tokens = 0
        self._grammar_compiler: GrammarCompiler | None = None  # structured output, built on first use

    # ---- requests -----------------------------------------------------------------------------------------

    @property
    def max_cached_tokens(self) -> int:
        return self.block_manager.num_blocks * self.config.block_size

    def check_prompt(self, token_ids: list[int]) -> None:
        """Raise if the prompt can never run: empty, unknown tokens, longer than the context or the KV cache."""
        if not token_ids:
            raise InvalidRequestError("The prompt is empty. Pass at least one token of text.")
        vocab = self.model_config.vocab_size
        bad = next((t for t in token_ids if not (isinstance(t, int) and 0 <= t < vocab)), None)
        if bad is not None:
            raise InvalidRequestError(f"Token id {bad!r} is outside the vocabulary (0..{vocab - 1}).")
        if len(token_ids) >= self.model_config.context_length:
            raise PromptTooLongError(
                f"The prompt has {len(token_ids)} tokens but the model's context window is "
                f"{self.model_config.context_length}, which must also hold at least one generated token. "
                "Shorten the prompt or use a model with a longer context."
            )
        if len(token_ids) >= self.max_cached_tokens:
            raise PromptTooLongError(
                f"The prompt has {len(token_ids)} tokens but the KV cache holds {self.max_cached_tokens} tokens "
                f"({self.block_manager.num_blocks} blocks of {self.config.block_size}), which must also hold at least "
                "one generated token. Give the cache more memory (--kv-cache-memory) or shorten the prompt."
            )

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        prompt: str | None = None,
        encoder_input: EncoderInput | None = None,
        logits_processors: list[LogitsProcessor] | tuple = (),
    ) -> None:
        """encoder_input: an encoder-decoder model's input (Whisper: a window of log-mel frames), encoded when the
        request is first scheduled unless a running request over the same input holds its output; prompt_token_ids
        are then the decoder's prompt. logits_processors: applied to each of the request's logits rows before
        sampling (vLLM's fn(output_token_ids, logits) -> logits)."""
        if request_id in self._progress:
            raise InvalidRequestError(f"A request with id {request_id!r} is already running. Use a unique request id.")
        if self.runner.is_encoder_decoder and encoder_input is None:
            raise InvalidRequestError(
                "This is an encoder-decoder model: each request needs its encoder input (for Whisper, the audio)."
            )
        if not self.runner.is_encoder_decoder and encoder_input is not None:
            raise InvalidRequestError("This decoder-only model takes no encoder input: send the prompt tokens only.")
        if logits_processors and self.speculator is not None:
            raise InvalidRequestError("Logits processors do not run with speculative decoding. Drop --speculative.")
        self.check_prompt(prompt_token_ids)
        constraint = self._grammars().constraint(params) if params.constrained else None  # raises if invalid
        # The context window and the KV cache cap generation (finish_reason "length").
        room = min(self.model_config.context_length, self.max_cached_tokens) - len(prompt_token_ids)
        request = Request(request_id, list(prompt_token_ids), params, min(params.max_tokens, room))
        request.encoder_input = encoder_input
        metrics = RequestMetrics(num_prompt_tokens=len(prompt_token_ids), arrival_time=time.perf_counter())
        self._progress[request_id] = _Progress(
            request,
            prompt,
            IncrementalDetokenizer(self.tokenizer),
            StopStrings(params.stop),
            metrics,
            logprobs=[] if params.logprobs is not None else None,
            prompt_logprobs=[None] if params.prompt_logprobs is not None else None,
        )
        self.runner.add_request(request_id, params, request.prompt_token_ids, constraint, logits_processors)
        self.scheduler.add(request)

    def _grammars(self) -> GrammarCompiler:
        if self._grammar_compiler is None:
            self._grammar_compiler = GrammarCompiler(self.tokenizer, self.model_config.vocab_size)
        return self._grammar_compiler

    def abort_request(self, request_id: str) -> None:
        """Stop a request and free its blocks now; its final output (finish_reason "abort") comes with the next
        step. An unknown or finished id is ignored."""
        progress = self._progress.get(request_id)
        if progress is None:
            return
        self._finish(progress, "abort")
        self._aborted.append(self._snapshot(progress, progress.text[progress.shown :], []))
        progress.shown = len(progress.text)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._aborted)

    # ---- the step -----------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One output per request that produced a token or finished in this step."""
        with scoped_threads(self.threads):
            if self.speculator is not None:
                self.speculator.propose(self.scheduler.running)  # drafts: extra rows of the step for verification
            schedule = self.scheduler.schedule()
            started = time.perf_counter()
            ran = self.runner.run(schedule)
            if self.speculator is not None and schedule.scheduled:
                self.speculator.observe_step(schedule.num_batched_tokens, time.perf_counter() - started)
        return self._process_outputs(schedule, ran)

    def _process_outputs(self, schedule: SchedulerOutput, ran: RunnerOutput) -> list[RequestOutput]:
        self.scheduler.update(schedule)
        outputs, self._aborted = self._aborted, []
        now = time.perf_counter()
        for entry in schedule.scheduled:
            request = entry.request
            if request.request_id in ran.scored:
                self._progress[request.request_id].add_scores(ran.scored[request.request_id])
            if request.request_id not in ran.sampled:
                continue
            samples = ran.sampled[request.request_id]
            progress = self._progress[request.request_id]
            if request.max_tokens == 0:  # it only scores its prompt: done once the prompt has run
                self._finish(progress, "length")
                outputs.append(self._snapshot(progress, "", []))
                continue
            if entry.num_draft_tokens:
                accepted = len(samples) - 1
                progress.metrics.num_draft_tokens += entry.num_draft_tokens
                progress.metrics.num_accepted_tokens += accepted
                self.speculator.record(request.request_id, entry.num_draft_tokens, accepted)
            outputs.append(self._append_tokens(progress, samples, now))
            if entry.num_draft_tokens:
                self.scheduler.accept_drafts(request, len(samples) - 1)  # rejected drafts roll back in the KV cache
        return outputs

    def _append_tokens(self, progress: _Progress, samples: list[SampledToken], now: float) -> RequestOutput:
        """Append a step's tokens (one, or accepted drafts and one more) until one of them finishes the request."""
        appended: list[int] = []
        new_text = ""
        for sample in samples:
            appended.append(sample.token_id)
            new_text += self._append_token(progress, sample, now)
            if progress.request.finished:
                break
        return self._snapshot(progress, new_text, appended)

    def _append_token(self, progress: _Progress, sample: SampledToken, now: float) -> str:
        """Append one token; return the text it lets us show."""
        request, token = progress.request, sample.token_id
        params = request.params
        request.append_token(token)
        self.total_generated_tokens += 1
        count = len(request.output_token_ids)
        metrics = progress.metrics
        metrics.num_generated_tokens = count
        if count == 1:
            metrics.first_token_time = now
            metrics.time_to_first_token_s = now - metrics.arrival_time
            metrics.num_cached_prompt_tokens = request.num_cached_tokens
        metrics.last_token_time = now
        metrics.decode_time_s = now - metrics.first_token_time
        if progress.logprobs is not None:
            progress.logprobs.append(TokenLogprobs(token, sample.logprob, dict(sample.top)))

        reason = None
        if token in params.stop_token_ids or (not params.ignore_eos and token in self.tokenizer.eos_token_ids):
            reason = "stop"  # the end token itself is not text
        else:
            before = len(progress.decoded)
            progress.decoded += progress.detokenizer.push(token)
            text = progress.decoded
            if (at := progress.stops.find(text, before)) is not None:
                text, reason = text[:at], "stop"
            elif count >= request.max_tokens:
                progress.decoded += progress.detokenizer.flush()
                text, reason = progress.decoded, "length"
            progress.text = text
        if reason is not None:
            self._finish(progress, reason)
        # While running, hold back a tail that may still become a stop string.
        show_up_to = len(progress.text) if reason else progress.stops.safe_length(progress.text)
        new_text = progress.text[progress.shown : show_up_to]
        progress.shown = max(progress.shown, show_up_to)
        return new_text

    def _finish(self, progress: _Progress, reason: str) -> None:
        request_id = progress.request.request_id
        self.scheduler.finish(progress.request, reason)
        self.runner.remove_request(request_id)
        if progress.request.encoder_input is not None:
            self.runner.free_encoder_outputs(self.scheduler.take_freed_encoder_inputs())
        if self.speculator is not None:
            self.speculator.remove(request_id)
        del self._progress[request_id]

    def _snapshot(self, progress: _Progress, new_text: str, new_token_ids: list[int]) -> RequestOutput:
        request = progress.request
        return RequestOutput(
            index=0,
            prompt=progress.prompt,
            prompt_token_ids=request.prompt_token_ids,
            text=progress.text,
            token_ids=list(request.output_token_ids),
            finish_reason=request.finish_reason,
            metrics=progress.metrics.copy(),
            request_id=request.request_id,
            new_text=new_text,
            new_token_ids=new_token_ids,
            logprobs=None if progress.logprobs is None else list(progress.logprobs),
            prompt_logprobs=None if progress.prompt_logprobs is None else list(progress.prompt_logprobs),
        )

    # ---- state --------------------------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        manager, scheduler = self.block_manager, self.scheduler
        return EngineStats(
            num_running=len(scheduler.running),
            num_waiting=len(scheduler.waiting),
            kv_blocks_used=manager.num_used_blocks,
            kv_blocks_cached=manager.num_cached_blocks,
            kv_blocks_total=manager.num_blocks,
            kv_block_size=manager.block_size,
            prefix_cache_queries=scheduler.prefix_cache_queries,
            prefix_cache_hits=scheduler.prefix_cache_hits,
            num_preemptions=scheduler.num_preemptions,
            total_generated_tokens=self.total_generated_tokens,
            speculative=None if self.speculator is None else dataclasses.replace(self.speculator.stats),
        )

    def _num_blocks(self) -> int:
        config, size = self.config, self.config.block_size
        if config.num_kv_blocks is not None:
            return config.num_kv_blocks
        block_bytes = self.kv_bytes_per_token * size
        memory = config.kv_cache_memory or default_kv_cache_memory(self.device)
        most_usable = -(-config.max_num_seqs * self.model_config.context_length // size)  # all sequences full
        blocks = min(memory // block_bytes, most_usable)
        if blocks < 1:
            raise InvalidRequestError(
                f"A KV cache of {memory} bytes holds no block: one block of {size} tokens takes {block_bytes} bytes "
                "for this model. Raise --kv-cache-memory (e.g. 512MiB)."
            )
        return blocks


def default_kv_cache_memory(device: torch.device) -> int:
    """A share of the free memory of the device, capped on CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * FREE_MEMORY_SHARE["cuda"])
    return int(min(_available_cpu_memory() * FREE_MEMORY_SHARE["cpu"], CPU_KV_CACHE_CAP))


def _available_cpu_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
