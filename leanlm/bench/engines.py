"""The engines a benchmark can run, behind one small interface: load once, then generate exactly N tokens.

Each engine runs in its own process (see worker.py) so that load time and peak memory are its own.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from leanlm.errors import InvalidRequestError


class Engine:
    name = "engine"
    precision = "?"
    bits_per_weight = 16.0
    kv_bytes_per_value = 4

    def load(self, model: Path, dtype: str, device: str, threads: int, **options) -> None:
        raise NotImplementedError

    def generate(self, prompts: list[list[int]], new_tokens: int) -> tuple[float, float]:
        """Greedy, EOS ignored, exactly `new_tokens` tokens for every prompt.
        Returns (seconds to the first token, seconds in all), both timed within this one call."""
        raise NotImplementedError


class LeanLMEngine(Engine):
    name = "leanlm"

    def load(self, model, dtype, device, threads, **options):
        from leanlm.engine.llm import LLM

        self.llm = LLM(model, dtype=dtype, device=device, threads=threads, **options)
        self.precision = self.llm.precision
        self.bits_per_weight = self.llm.dtype.itemsize * 8
        self.kv_bytes_per_value = 1 if options.get("kv_cache") == "int8" else self.llm.engine.cache_dtype.itemsize
        self.decode_weight_bytes = runtime_weight_bytes(self.llm.model)

    def generate(self, prompts, new_tokens):
        from leanlm.sampling_params import SamplingParams

        out = self.llm.generate(prompts, SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True))[0]
        return out.metrics.time_to_first_token_s, out.metrics.time_to_first_token_s + out.metrics.decode_time_s


class TransformersEngine(Engine):
    name = "transformers"

    def load(self, model, dtype, device, threads, **options):
        try:
            import transformers
        except ImportError as exc:
            raise InvalidRequestError("The transformers peer needs `pip install 'leanlm[test]'`.") from exc
        torch.set_num_threads(threads)
        torch_dtype = torch.float32 if dtype in ("auto", "float32") else getattr(torch, dtype)
        kwargs = {"gguf_file": model.name} if model.suffix == ".gguf" else {}
        folder = model.parent if model.suffix == ".gguf" else model
        self.model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, **kwargs)
        self.device = "cuda" if device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"
        self.model = self.model.to(self.device).eval()
        self.precision = str(torch_dtype).removeprefix("torch.")
        self.bits_per_weight = torch_dtype.itemsize * 8
        self.kv_bytes_per_value = torch_dtype.itemsize

    @torch.inference_mode()
    def generate(self, prompts, new_tokens):
        ids = torch.tensor(prompts, device=self.device)  # equal lengths: no padding needed
        clock = _FirstTokenClock()
        self.model.generate(
            ids,
            streamer=clock,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
        return clock.first - clock.start, time.perf_counter() - clock.start


class LlamaCppEngine(Engine):
    """llama.cpp through llama-cpp-python (optional; it compiles from source in ~11 min on 2 cores)."""

    name = "llama.cpp"
    kv_bytes_per_value = 2

    def load(self, model, dtype, device, threads, **options):
        try:
            import llama_cpp
        except ImportError as exc:
            raise InvalidRequestError(
                "The llama.cpp peer needs llama-cpp-python: `pip install llama-cpp-python` (builds from source, "
                "about 11 minutes on 2 cores)."
            ) from exc
        if model.suffix != ".gguf":
            raise InvalidRequestError("llama.cpp runs GGUF files only; pass --model file.gguf.")
        from leanlm.formats.gguf import GGUFFile

        gguf_file = GGUFFile(model)
        self.precision = _dominant_type(gguf_file)
        self.bits_per_weight = _bits_per_weight(gguf_file)
        self.llm = llama_cpp.Llama(
            str(model),
            n_threads=threads,
            n_threads_batch=threads,
            n_ctx=2048,
            n_gpu_layers=-1 if device == "cuda" else 0,
            verbose=False,
        )

    def generate(self, prompts, new_tokens):
        if len(prompts) != 1:
            raise InvalidRequestError("The llama.cpp peer measures batch 1 only.")
        started = time.perf_counter()
        self.llm.reset()
        self.llm.eval(prompts[0])
        first = None
        for _ in range(new_tokens):
            token = int(self.llm.scores[self.llm.n_tokens - 1].argmax())  # greedy, EOS ignored
            first = first or time.perf_counter()
            self.llm.eval([token])
        return first - started, time.perf_counter() - started


def runtime_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes a decode step reads: every linear layer's runtime weights (quantized layouts included),
    not the input embedding (one row per token)."""
    from leanlm.layers.quantized_linear import QuantizedLinear

    total = 0
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            total += module.runtime_bytes()
        elif isinstance(module, torch.nn.Linear):
            total += module.weight.numel() * module.weight.element_size()
    return total


ENGINES = {"leanlm": LeanLMEngine, "transformers": TransformersEngine, "llama.cpp": LlamaCppEngine}


class _FirstTokenClock:
    """A transformers streamer that only notes when the first generated token arrives."""

    def __init__(self):
        self.start = time.perf_counter()
        self.first = None
        self.calls = 0

    def put(self, value) -> None:
        self.calls += 1  # call 1 is the prompt, call 2 the first new token
        if self.calls == 2:
            self.first = time.perf_counter()

    def end(self) -> None:
        self.first = self.first or time.perf_counter()


def _dominant_type(gguf_file) -> str:
    counts: dict[str, int] = {}
    for name, info in gguf_file.tensors.items():
        if len(info.shape) > 1:
            counts[gguf_file.tensor_type_name(name)] = counts.get(gguf_file.tensor_type_name(name), 0) + 1
    return max(counts, key=counts.get)


def _bits_per_weight(gguf_file) -> float:
    import numpy as np

    elements = sum(int(np.prod(info.shape)) for info in gguf_file.tensors.values())
    stored = sum(info.n_bytes for info in gguf_file.tensors.values())
    return 8 * stored / elements
