"""The Python API: `LLM(model).generate(prompts, SamplingParams(...))`, `stream`, `chat`."""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
import warnings
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from leanlm.config import EngineConfig
from leanlm.engine.engine import LLMEngine
from leanlm.engine.outputs import RequestOutput, StreamChunk
from leanlm.errors import InvalidRequestError
from leanlm.layers.quantized_tensor import QuantizedTensor
from leanlm.models.checkpoint import holds_quantized_weights, load_checkpoint
from leanlm.models.registry import build_model
from leanlm.plan import resolve_device, resolve_dtype, resolve_plan  # noqa: F401  (resolve_*: public here too)
from leanlm.sampling_params import SamplingParams

Prompt = str | list[int]
Messages = list[dict[str, str]]


class LLM:
    """A loaded model with its tokenizer and the engine that runs it. `model=None` uses the default model
    (SmolLM2-135M-Instruct). Every call goes through `self.engine` (LLMEngine): prompts of one call run together,
    scheduled step by step under `engine_config`'s limits."""

    def __init__(
        self,
        model: str | Path | None = None,
        dtype: str | torch.dtype | None = "auto",
        device: str | None = "auto",
        threads: int | None = None,
        attention: str = "sdpa",
        dequantize: bool = False,
        kv_cache: str = "auto",
        kernels: str = "auto",
        engine_config: EngineConfig | None = None,
        speculative: str | None = None,
        num_speculative_tokens: int | None = None,
        tensor_parallel_size: int = 1,
    ):
        """speculative: "ngram" (prompt lookup), "self" / "self:N" (the model's first N layers draft) or "draft:M"
        (model M, same tokenizer, drafts); lossless, self-tuning per request. Overrides engine_config's setting."""
        if threads is not None and threads < 1:
            raise InvalidRequestError(f"threads must be >= 1, got {threads}.")
        # `threads` holds for this object's engine steps, not for the process: torch's setting is put back after
        # each step (kernels/threads.py), so a server or another LLM in the process keeps its own.
        self.threads = threads
        started = time.perf_counter()
        plan = resolve_plan(device, dtype, kernels, attention, kv_cache, dequantize)
        # Quantized layers on leanlm's kernels compute in float32, so their dense tensors load in float32 too; a
        # dense checkpoint loads straight in its dtype (a 1.5B model would otherwise pass through 6 GB of float32).
        quantized = plan.native_quant and holds_quantized_weights(model)
        load_dtype = torch.float32 if quantized and plan.leanlm_kernels else plan.dtype
        checkpoint = load_checkpoint(model, load_dtype, native_quant=plan.native_quant)
        if dequantize:  # a leanlm quantized folder holds QuantizedTensors whatever native_quant says
            checkpoint.weights = _dequantized(checkpoint.weights, load_dtype)
        self.plan = plan.for_weights(any(isinstance(t, QuantizedTensor) for t in checkpoint.weights.values()))
        self.config = checkpoint.config
        self.tokenizer = checkpoint.tokenizer
        self.model_path = checkpoint.path
        self.weight_types = checkpoint.weight_types
        engine_config = engine_config or EngineConfig()
        if speculative is not None or num_speculative_tokens is not None:
            engine_config = dataclasses.replace(
                engine_config,
                speculative=speculative if speculative is not None else engine_config.speculative,
                num_speculative_tokens=num_speculative_tokens or engine_config.num_speculative_tokens,
            )
        if tensor_parallel_size == 1:
            self.model = build_model(checkpoint.config, checkpoint.weights, self.plan)
            self.engine = LLMEngine(self.model, self.tokenizer, engine_config, self.plan.kv_cache, threads)
        else:  # this process is one rank of a torchrun launch: it builds and runs its shard (distributed/)
            from leanlm.distributed.tensor_parallel import build_rank

            self.model, self.engine = build_rank(checkpoint, self.plan, tensor_parallel_size, engine_config, threads)
        self.tensor_parallel_size = tensor_parallel_size
        self.tensor_parallel_rank = 0 if tensor_parallel_size == 1 else torch.distributed.get_rank()
        self.load_time_s = time.perf_counter() - started
        self._loaded_on = threading.current_thread()
        self._warned_thread = False
        self._ids = itertools.count()
        self._mine: set[str] = set()  # requests added by this object and not finished
        self._held: dict[str, list[RequestOutput]] = defaultdict(list)  # outputs for another call of this object
        self._last_outputs: list[RequestOutput] = []

    # ---- prompts -> token ids -----------------------------------------------------------------------------

    def encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            bad = [t for t in prompt if not 0 <= t < self.config.vocab_size]
            if bad:
                raise InvalidRequestError(
                    f"Token id {bad[0]} is outside the vocabulary (0..{self.config.vocab_size - 1})."
                )
            return list(prompt)
        raise InvalidRequestError(f"A prompt must be a string or a list of token ids, got {type(prompt).__name__}.")

    def apply_chat_template(self, messages: Messages) -> list[int]:
        # control-token text typed in a message stays text: a user cannot forge another turn
        return self.tokenizer.encode_chat(messages)

    # ---- generation ---------------------------------------------------------------------------------------

    def generate(
        self, prompts: Prompt | Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams] | None = None
    ) -> list[RequestOutput]:
        """Complete each prompt (raw text, no chat template). Prompts run together, batched by the engine."""
        prompts = _as_list(prompts)
        ids = [self.encode(p) for p in prompts]
        texts = [p if isinstance(p, str) else None for p in prompts]
        return self._generate(ids, _params_for(params, len(ids)), texts)

    def chat(
        self,
        conversations: Messages | Sequence[Messages],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Answer each conversation (a list of {"role", "content"} messages) using the model's chat template."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        ids = [self.apply_chat_template(list(c)) for c in conversations]
        return self._generate(ids, _params_for(params, len(ids)), [None] * len(ids))

    def stream(self, prompt: Prompt, params: SamplingParams | None = None, chat: bool = False) -> Iterator[StreamChunk]:
        """Yield text chunks as they are generated. With chat=True the prompt is one user message."""
        ids = self.apply_chat_template([{"role": "user", "content": prompt}]) if chat else self.encode(prompt)
        yield from self.stream_ids(ids, params)

    def stream_chat(self, messages: Messages, params: SamplingParams | None = None) -> Iterator[StreamChunk]:
        yield from self.stream_ids(self.apply_chat_template(messages), params)

    def stream_ids(self, ids: list[int], params: SamplingParams | None = None) -> Iterator[StreamChunk]:
        """Chunks carry the new text and every token sampled since the previous chunk (a token may add no text
        yet: a character's bytes still incomplete, or a possible stop string held back)."""
        self.engine.check_prompt(ids)
        (request_id,) = self._add([ids], [params or SamplingParams()], [None])
        pending: list[int] = []
        try:
            for out in self._outputs_of({request_id}):
                pending += out.new_token_ids
                if out.new_text or out.finished:
                    yield StreamChunk(0, out.new_text, pending, out.finish_reason)
                    pending = []
                if out.finished:
                    self._last_outputs = [out]
        finally:  # an abandoned stream frees its blocks
            self._abort(request_id)

    @property
    def device(self) -> torch.device:
        return self.plan.device

    @property
    def dtype(self) -> torch.dtype:
        return self.plan.dtype

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.plan.compute_dtype

    @property
    def precision(self) -> str:
        """'bfloat16' for dense weights; for quantized ones their storage type and the activations' dtype,
        e.g. 'Q4_1 (float32 act.)'."""
        from collections import Counter

        from leanlm.layers.quantized_linear import QuantizedLinear

        compute = str(self.compute_dtype).removeprefix("torch.")
        projections = Counter(t for name, t in self.weight_types.items() if name.endswith("proj.weight"))
        if not any(isinstance(m, QuantizedLinear) for m in self.model.modules()):
            stored = sorted(t for t in projections if t.upper() not in ("F32", "F16", "BF16") and "float" not in t)
            if self.plan.half_weights:  # 16-bit weights on leanlm's kernels, float32 activations
                compute = f"{str(self.plan.dtype).removeprefix('torch.')} ({compute} act.)"
            return f"{compute} (dequantized from {'/'.join(stored)})" if stored else compute
        return f"{projections.most_common(1)[0][0]} ({compute} act.)" if projections else compute

    @property
    def last_outputs(self) -> list[RequestOutput]:
        """Outputs (with metrics) of the most recent generate/chat/stream call."""
        return self._last_outputs

    # ---- driving the engine -------------------------------------------------------------------------------

    def _generate(
        self, ids: list[list[int]], params: list[SamplingParams], texts: list[str | None]
    ) -> list[RequestOutput]:
        for prompt in ids:  # all or nothing: check every prompt before adding any
            self.engine.check_prompt(prompt)
        request_ids = self._add(ids, params, texts)
        index = {request_id: i for i, request_id in enumerate(request_ids)}
        results: list[RequestOutput | None] = [None] * len(ids)
        try:
            for out in self._outputs_of(set(request_ids)):
                if out.finished:
                    out.index = index[out.request_id]
                    results[out.index] = out
        finally:
            for request_id in request_ids:
                self._abort(request_id)
        self._last_outputs = results
        return results

    def _add(self, ids: list[list[int]], params: list[SamplingParams], texts: list[str | None]) -> list[str]:
        request_ids = [f"llm-{next(self._ids)}" for _ in ids]
        for request_id, prompt, p, text in zip(request_ids, ids, params, texts, strict=True):
            self.engine.add_request(request_id, prompt, p, text)
            self._mine.add(request_id)
        return request_ids

    def _check_thread(self) -> None:
        """Warn once when generating on another thread while the loading thread still runs: OpenMP keeps a
        thread team for each thread that ran parallel work, and two teams on few cores run at a fraction of the
        speed (half or less on 2 cores)."""
        current = threading.current_thread()
        if self._warned_thread or current is self._loaded_on or not self._loaded_on.is_alive():
            return
        self._warned_thread = True
        warnings.warn(
            f"leanlm: generating on thread '{current.name}' while thread '{self._loaded_on.name}', which loaded the "
            "model, still runs; their two OpenMP thread teams compete for the cores and decoding slows down (half "
            "speed or worse on 2 cores). Load the model on the thread that generates, or on a thread that has "
            "ended (as `leanlm serve` does).",
            stacklevel=4,
        )

    def _outputs_of(self, request_ids: set[str]) -> Iterator[RequestOutput]:
        """Step the engine until these requests finish, yielding their outputs; outputs of this object's other
        requests (say, a stream paused by its consumer) are held for them."""
        self._check_thread()
        remaining = set(request_ids)
        while remaining:
            outputs = [o for rid in list(remaining) for o in self._held.pop(rid, [])]
            if not outputs:
                outputs = self.engine.step()
            for out in outputs:
                if out.request_id in remaining:
                    if out.finished:
                        remaining.discard(out.request_id)
                        self._mine.discard(out.request_id)
                    yield out
                elif out.request_id in self._mine:
                    self._held[out.request_id].append(out)

    def _abort(self, request_id: str) -> None:
        if request_id in self._mine:
            self._mine.discard(request_id)
            self._held.pop(request_id, None)
            self.engine.abort_request(request_id)


def _dequantized(weights: dict, dtype: torch.dtype) -> dict:
    return {name: t.dequantize(dtype) if isinstance(t, QuantizedTensor) else t for name, t in weights.items()}


def _as_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, list) and prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]  # one prompt given as token ids
    return list(prompts)


def _params_for(params: SamplingParams | Sequence[SamplingParams] | None, count: int) -> list[SamplingParams]:
    if params is None or isinstance(params, SamplingParams):
        return [params or SamplingParams()] * count
    params = list(params)
    if len(params) != count:
        raise InvalidRequestError(f"Got {len(params)} SamplingParams for {count} prompts; pass one, or one per prompt.")
    return params
