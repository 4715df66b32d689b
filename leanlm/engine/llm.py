"""The Python API: `LLM(model).generate(prompts, SamplingParams(...))`, `stream`, `chat`."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from leanlm.engine.generator import Generator
from leanlm.engine.outputs import RequestOutput, StreamChunk
from leanlm.errors import InvalidRequestError
from leanlm.formats.loader import load_checkpoint
from leanlm.models.registry import build_model
from leanlm.sampling_params import SamplingParams

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# bfloat16 is the default on CPU: torch's bf16 matmuls read half the bytes and run faster than float32 here
# (benchmarks/bench_core.py); float32 stays available and is what parity tests use.
DEFAULT_DTYPE = "bfloat16"

Prompt = str | list[int]
Messages = list[dict[str, str]]


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidRequestError("--device cuda was asked for but torch sees no CUDA GPU. Use --device cpu.")
    if device.split(":")[0] not in ("cpu", "cuda"):
        raise InvalidRequestError(f"Unknown device '{device}'. Use cpu, cuda or auto.")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    name = DEFAULT_DTYPE if dtype in (None, "auto") else dtype
    if name not in DTYPES:
        raise InvalidRequestError(f"Unknown dtype '{dtype}'. Use one of: {', '.join(DTYPES)}.")
    return DTYPES[name]


class LLM:
    """A loaded model with its tokenizer. `model=None` uses the default model (SmolLM2-135M-Instruct)."""

    def __init__(
        self,
        model: str | Path | None = None,
        dtype: str | torch.dtype | None = "auto",
        device: str | None = "auto",
        threads: int | None = None,
        attention: str = "sdpa",
        dequantize: bool = False,
        kv_cache: str = "auto",
    ):
        if threads is not None:
            if threads < 1:
                raise InvalidRequestError(f"threads must be >= 1, got {threads}.")
            torch.set_num_threads(threads)
        started = time.perf_counter()
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype)
        # GGUF Q8_0/Q4_0/Q4_1 matrices run at their own precision (as llama.cpp does) unless `dequantize` asks
        # for dense weights. float32 is the reference precision, so it always dequantizes.
        native_quant = not dequantize and self.dtype != torch.float32
        checkpoint = load_checkpoint(model, self.dtype, native_quant=native_quant)
        self.config = checkpoint.config
        self.tokenizer = checkpoint.tokenizer
        self.model_path = checkpoint.path
        self.weight_types = checkpoint.weight_types
        self.model = build_model(checkpoint.config, checkpoint.weights, self.dtype, self.device)
        self.model.set_attention_backend(attention)
        self.generator = Generator(self.model, self.tokenizer, kv_cache)
        self.load_time_s = time.perf_counter() - started

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
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)  # the template writes BOS itself if needed

    # ---- generation ---------------------------------------------------------------------------------------

    def generate(
        self, prompts: Prompt | Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams] | None = None
    ) -> list[RequestOutput]:
        """Complete each prompt (raw text, no chat template). Prompts run together as one batch."""
        prompts = _as_list(prompts)
        ids = [self.encode(p) for p in prompts]
        texts = [p if isinstance(p, str) else None for p in prompts]
        return self.generator.generate(ids, _params_for(params, len(ids)), texts)

    def chat(
        self,
        conversations: Messages | Sequence[Messages],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Answer each conversation (a list of {"role", "content"} messages) using the model's chat template."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        ids = [self.apply_chat_template(list(c)) for c in conversations]
        return self.generator.generate(ids, _params_for(params, len(ids)))

    def stream(self, prompt: Prompt, params: SamplingParams | None = None, chat: bool = False) -> Iterator[StreamChunk]:
        """Yield text chunks as they are generated. With chat=True the prompt is one user message."""
        ids = self.apply_chat_template([{"role": "user", "content": prompt}]) if chat else self.encode(prompt)
        yield from self.stream_ids(ids, params)

    def stream_chat(self, messages: Messages, params: SamplingParams | None = None) -> Iterator[StreamChunk]:
        yield from self.stream_ids(self.apply_chat_template(messages), params)

    def stream_ids(self, ids: list[int], params: SamplingParams | None = None) -> Iterator[StreamChunk]:
        for chunks in self.generator.stream([ids], [params or SamplingParams()]):
            yield from chunks

    @property
    def last_outputs(self) -> list[RequestOutput]:
        """Outputs (with metrics) of the most recent generate/stream call."""
        return self.generator.outputs


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
