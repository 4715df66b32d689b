"""The engines a benchmark can run, behind one small interface: load once, then generate exactly N tokens.

Each engine runs in its own process (see worker.py) so that load time and peak memory are its own. Every engine
is timed the same way (`time_generation`): the clock starts before the engine's generation call and stops when
it returns, and the first token counts when every prompt has one, as the caller sees it.
"""

from __future__ import annotations

import importlib.util
import itertools
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from leanlm.errors import InvalidRequestError, LeanLMError

OnTokens = Callable[[Iterable[int]], None]  # told the prompt rows (indices) that just got one new token each


def bench_engine_config():
    """The engine settings leanlm is measured with: the defaults, but no prefix cache, so every prompt token of
    every run is computed (the benchmark's prompts measure prefill, not cache hits)."""
    from leanlm.config import EngineConfig

    return EngineConfig(enable_prefix_caching=False)


def time_generation(run: Callable[[OnTokens], None], batch: int, new_tokens: int) -> tuple[float, float]:
    """Time `run(on_tokens)`, one engine's whole generation call, and check it made exactly `new_tokens` tokens
    per prompt. Returns (seconds until every prompt had its first token, seconds until the call returned)."""
    counts = [0] * batch
    first: list[float] = []

    def on_tokens(rows: Iterable[int]) -> None:
        for row in rows:
            counts[row] += 1
        if not first and min(counts) >= 1:
            first.append(time.perf_counter())

    started = time.perf_counter()
    run(on_tokens)
    ended = time.perf_counter()
    if counts != [new_tokens] * batch:
        raise LeanLMError(f"The engine generated {counts} tokens per prompt; the benchmark asked for {new_tokens}.")
    return first[0] - started, ended - started


class Engine:
    name = "engine"
    precision = "?"
    bits_per_weight = 16.0
    kv_bytes_per_value = 4
    notes: tuple[str, ...] = ()  # how this engine's run departs from its defaults, shown with the results

    def load(self, model: Path, dtype: str, device: str, threads: int, **options) -> None:
        raise NotImplementedError

    def run(self, prompts: list[list[int]], new_tokens: int, on_tokens: OnTokens) -> None:
        """Greedy, EOS ignored, exactly `new_tokens` tokens for every prompt; `on_tokens` as tokens appear."""
        raise NotImplementedError

    def generate(self, prompts: list[list[int]], new_tokens: int) -> tuple[float, float]:
        """(seconds to the first token of every prompt, seconds in all), timed around this one call."""
        return time_generation(lambda on_tokens: self.run(prompts, new_tokens, on_tokens), len(prompts), new_tokens)


class LeanLMEngine(Engine):
    name = "leanlm"

    def load(self, model, dtype, device, threads, **options):
        from leanlm.engine.llm import LLM

        config = bench_engine_config()
        self.llm = LLM(model, dtype=dtype, device=device, threads=threads, engine_config=config, **options)
        self.precision = self.llm.precision
        self.bits_per_weight = self.llm.dtype.itemsize * 8
        self.kv_bytes_per_value = 1 if options.get("kv_cache") == "int8" else self.llm.engine.cache_dtype.itemsize
        self.decode_weight_bytes = runtime_weight_bytes(self.llm.model)
        self._ids = itertools.count()

    def run(self, prompts, new_tokens, on_tokens):
        from leanlm.sampling_params import SamplingParams

        # The engine's own step loop (what LLM.generate and the server drive), so each step's tokens are seen.
        engine = self.llm.engine
        params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
        rows = {}
        for row, prompt in enumerate(prompts):
            request_id = f"bench-{next(self._ids)}"
            engine.add_request(request_id, prompt, params)
            rows[request_id] = row
        while engine.has_unfinished_requests():
            on_tokens([rows[out.request_id] for out in engine.step() for _ in out.new_token_ids])


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
    def run(self, prompts, new_tokens, on_tokens):
        ids = torch.tensor(prompts, device=self.device)  # equal lengths: no padding needed
        self.model.generate(
            ids,
            streamer=_TokenStreamer(len(prompts), on_tokens),
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )


class LlamaCppEngine(Engine):
    """llama.cpp through llama-cpp-python (the `bench` extra; it compiles from source in ~11 min on 2 cores).

    Option `extra_bufts=False` turns off llama.cpp's extra buffer types (weight repacking, AMX): a native build
    segfaults with them on some CPUs (Intel Xeon with AMX under KVM), and the runner then retries without them."""

    name = "llama.cpp"
    kv_bytes_per_value = 2

    def load(self, model, dtype, device, threads, extra_bufts: bool = True, **options):
        if importlib.util.find_spec("llama_cpp") is None:
            raise InvalidRequestError(
                "The llama.cpp peer needs llama-cpp-python: `pip install 'leanlm[bench]'` (builds from source, "
                "about 11 minutes on 2 cores)."
            )
        if model.suffix != ".gguf":
            raise InvalidRequestError("llama.cpp runs GGUF files only; pass --model file.gguf.")
        if options:
            raise InvalidRequestError(f"The llama.cpp peer takes no option {', '.join(options)}.")
        from leanlm.formats.gguf import GGUFFile

        gguf_file = GGUFFile(model)
        self.precision = _dominant_type(gguf_file)
        self.bits_per_weight = _bits_per_weight(gguf_file)
        self.llm = llama_cpp_model(
            model,
            extra_bufts,
            n_threads=threads,
            n_threads_batch=threads,
            n_ctx=2048,
            n_gpu_layers=-1 if device == "cuda" else 0,
            verbose=False,
        )
        if not extra_bufts:
            self.notes = ("extra buffer types (repack/AMX) off",)

    def run(self, prompts, new_tokens, on_tokens):
        if len(prompts) != 1:
            raise InvalidRequestError("The llama.cpp peer measures batch 1 only.")
        self.llm.reset()
        self.llm.eval(prompts[0])  # the prompt: its last logits give the first token
        for index in range(new_tokens):
            token = int(self.llm.scores[self.llm.n_tokens - 1].argmax())  # greedy, EOS ignored
            on_tokens([0])
            if index < new_tokens - 1:  # one decode step per token after the first: new_tokens - 1 in all
                self.llm.eval([token])


def llama_cpp_model(path: str | Path, extra_bufts: bool = True, **kwargs):
    """`llama_cpp.Llama(path, **kwargs)`, optionally with llama.cpp's extra buffer types (weight repacking, AMX)
    off. Llama does not expose `use_extra_bufts`; it takes its model parameters from
    `llama_model_default_params()`, so it is handed defaults with them off while it loads."""
    import llama_cpp

    module = llama_cpp.llama_cpp
    default_params = module.llama_model_default_params

    def params_without_extra_bufts():
        params = default_params()
        params.use_extra_bufts = False
        return params

    if not extra_bufts:
        module.llama_model_default_params = params_without_extra_bufts
    try:
        model = llama_cpp.Llama(str(path), **kwargs)
    finally:
        module.llama_model_default_params = default_params
    if model.model_params.use_extra_bufts != extra_bufts:
        raise LeanLMError(f"llama-cpp-python ignored use_extra_bufts={extra_bufts}; cannot set it from here.")
    return model


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


class _TokenStreamer:
    """A transformers streamer: its first `put` is the prompt, each later one a new token for every row."""

    def __init__(self, batch: int, on_tokens: OnTokens):
        self.rows, self.on_tokens, self.prompt_seen = range(batch), on_tokens, False

    def put(self, value) -> None:
        if self.prompt_seen:
            self.on_tokens(self.rows)
        self.prompt_seen = True

    def end(self) -> None:
        pass


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
