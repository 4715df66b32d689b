"""`leanlm plan`'s predictions: for a format, the memory the engine will allocate and the speed it will reach,
from the model's shape and probes of this machine (memory bandwidth, each kernel timed on the model's own
matrix shapes), without building the model.

Memory: the module tree is built on the meta device (shapes only); every linear layer's bytes come from one real
layer of its shape and format built and prepared as the engine prepares it (scaled by rows, which is exact for
these layouts), the other tensors are counted at the dtype the runtime plan gives them. Speed: a decode step
is the probed time of every linear layer at one row per sequence plus the KV cache read at the probed bandwidth;
a prefill is every linear layer at all prompt rows plus the attention matmuls at the probed matmul rate.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass

import torch
from torch import nn

from leanlm.bench.machine import memory_bandwidth_gbs
from leanlm.compress.rtn import quantize_rtn
from leanlm.kernels.threads import scoped_threads
from leanlm.layers.half_linear import use_half_kernels
from leanlm.layers.quantized_linear import QuantizedLinear
from leanlm.optimize.formats import FormatSpec
from leanlm.optimize.memory import activation_bytes, kv_cache_plan, module_tensors
from leanlm.plan import RuntimePlan, resolve_plan

BYTES_PROBE_ROWS = 64  # bytes of a layer are linear in rows (multiples of the kernels' 8/16-row tiles)
TIME_PROBE_ROWS = 4096  # the LM head of a 150k vocabulary is timed on a slice and scaled
COLD_BYTES, COLD_MAX_COPIES = 64 * 2**20, 64  # a working set well beyond the last-level cache (32 MiB here)


@dataclass(frozen=True)
class Workload:
    context: int = 1024  # tokens per sequence held in the KV cache
    batch: int = 1
    prompt_tokens: int = 128  # prefill length the speed is predicted for
    kv_cache: str = "auto"
    threads: int = 2


@dataclass(frozen=True)
class Prediction:
    format: str
    weights_bytes: int
    kv_cache_bytes: int
    kv_cache_memory: int  # the --kv-cache-memory that makes the engine allocate kv_cache_bytes
    activation_bytes: int
    decode_tok_s: float
    prefill_tok_s: float
    bits_per_weight: float  # of the linear layers, as their kernels read them per token
    kv_bytes_per_token: int = 0

    @property
    def peak_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes + self.activation_bytes

    def longest_context(self, memory_bytes: int, batch: int, block_size: int = 16) -> int:
        """The most tokens per sequence whose KV cache (whole blocks, plus the null block) fits, for `batch`
        sequences, in `memory_bytes` beside the weights and activations."""
        spare = memory_bytes - self.weights_bytes - self.activation_bytes
        blocks = spare // (block_size * self.kv_bytes_per_token) - 1
        return max(0, int(blocks // batch) * block_size)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "peak_bytes": self.peak_bytes}


def runtime_plan(spec: FormatSpec, source_quantized: bool = False) -> RuntimePlan:
    """The plan the engine resolves for this format (leanlm's kernels when they build)."""
    dtype = "float32" if spec.dtype == "float32" else "bfloat16"
    plan = resolve_plan("cpu", dtype, dequantize=spec.method == "dense")
    quantized = spec.quantized or (spec.method == "source" and source_quantized)
    return plan.for_weights(quantized)


def meta_model(config) -> nn.Module:
    from leanlm.models.registry import family_for_model_type

    with torch.device("meta"):
        return family_for_model_type(config.model_type).model_class(config)


def layer_for(spec: FormatSpec, rows: int, cols: int, bias: bool, plan: RuntimePlan) -> nn.Module:
    """One linear layer of this shape and format, prepared as the engine prepares it (random weights)."""
    generator = torch.Generator().manual_seed(rows * 7919 + cols)
    weight = torch.randn(rows, cols, generator=generator) * cols**-0.5
    bias_tensor = torch.randn(rows, generator=generator) * 0.1 if bias else None
    if not spec.quantized:
        layer = nn.Linear(cols, rows, bias=bias)
        with torch.no_grad():
            layer.weight.copy_(weight)
            if bias:
                layer.bias.copy_(bias_tensor)
        if not plan.half_weights:
            return layer.to(plan.compute_dtype)
        layer.to(plan.dtype)  # 16-bit weights on leanlm's kernels (layers/half_linear.py), a float32 bias
        if bias:
            layer.bias.data = layer.bias.data.float()
        use_half_kernels(layer, True, plan.kernels == "auto")
        return layer
    config = spec.quant_config()
    layer = QuantizedLinear(quantize_rtn(weight, config.bits, config.group_size, config.symmetric), bias_tensor)
    layer.prepare_runtime(plan.compute_dtype, plan.device, plan.kernels)
    return layer


def layer_bytes(spec: FormatSpec, rows: int, cols: int, bias: bool, plan: RuntimePlan) -> int:
    probe = BYTES_PROBE_ROWS if rows % BYTES_PROBE_ROWS == 0 and rows > BYTES_PROBE_ROWS else rows
    layer = layer_for(spec, probe, cols, bias, plan)
    return sum(t.numel() * t.element_size() for t in module_tensors(layer)) * rows // probe


def layout_key(spec: FormatSpec, plan: RuntimePlan) -> tuple:
    """Formats with one runtime layout (RTN, GPTQ and AWQ at the same bits and groups) share their probes."""
    if not spec.quantized:
        return ("dense", plan.compute_dtype)
    config = spec.quant_config()
    return (config.bits, config.group_size, config.symmetric, plan.compute_dtype, plan.kernels)


_TIMES: dict[tuple, float] = {}


@torch.inference_mode()
def layer_seconds(spec: FormatSpec, rows: int, cols: int, bias: bool, plan: RuntimePlan, tokens: int) -> float:
    """Seconds of one call on `tokens` rows of activations, scaled to `rows` outputs. Copies of the layer are
    cycled through so that their weights come from memory, not the caches, as in a model's decode step. The
    median over copies of each copy's fastest call: on a shared machine other jobs only ever add time (a 2-thread
    team waits ~10 ms whenever one of its threads is descheduled). Cached per layout, shape and thread count."""
    key = (layout_key(spec, plan), rows, cols, bias, tokens, torch.get_num_threads())
    if key in _TIMES:
        return _TIMES[key]
    probe = min(rows, TIME_PROBE_ROWS)
    layer = layer_for(spec, probe, cols, bias, plan)
    read = layer.runtime_bytes() if isinstance(layer, QuantizedLinear) else layer.weight.numel() * 2
    copies = min(COLD_MAX_COPIES, -(-COLD_BYTES // read)) if tokens <= 8 else 2  # a prefill is compute-bound
    layers = [layer] + [copy.deepcopy(layer) for _ in range(copies - 1)]
    x = torch.randn(tokens, cols).to(plan.compute_dtype)
    for each in layers:  # warm-up: first-call allocations, pages touched
        each(x)
    best = [float("inf")] * len(layers)  # per copy, its fastest call
    for _ in range(max(3, 40 // len(layers))):
        for index, each in enumerate(layers):
            started = time.perf_counter()
            each(x)
            best[index] = min(best[index], time.perf_counter() - started)
    _TIMES[key] = sorted(best)[len(best) // 2] * rows / probe
    return _TIMES[key]


def layer_read_bytes(spec: FormatSpec, rows: int, cols: int, bias: bool, plan: RuntimePlan) -> int:
    """Bytes the layer's kernel reads per call (its runtime layout), scaled by rows like layer_bytes."""
    probe = BYTES_PROBE_ROWS if rows % BYTES_PROBE_ROWS == 0 and rows > BYTES_PROBE_ROWS else rows
    layer = layer_for(spec, probe, cols, bias, plan)
    read = (
        layer.runtime_bytes()
        if isinstance(layer, QuantizedLinear)
        else layer.weight.numel() * layer.weight.element_size()
    )
    return read * rows // probe


def linear_shapes(model: nn.Module, spec: FormatSpec, tied: bool) -> dict[tuple[int, int, bool], int]:
    """(out, in, bias) -> how many such linear layers the engine holds for this format."""
    counts: dict[tuple[int, int, bool], int] = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if name == "lm_head" and tied and not spec.quantized:
            continue  # the LM head is the embedding's storage
        key = (module.out_features, module.in_features, module.bias is not None)
        counts[key] = counts.get(key, 0) + 1
    return counts


def other_bytes(model: nn.Module, dtype: torch.dtype, embedding_dtype: torch.dtype | None = None) -> int:
    """Embedding, norms and buffers: everything outside the linear layers. Parameters load at the runtime dtype
    (the embedding at `embedding_dtype` when given: 16-bit weights keep it 16-bit); buffers (RoPE's inverse
    frequencies) keep the dtype they are built in."""
    total = 0
    for module in model.modules():
        if isinstance(module, nn.Linear):
            continue
        size = (embedding_dtype or dtype).itemsize if isinstance(module, nn.Embedding) else dtype.itemsize
        total += sum(t.numel() * size for t in module.parameters(recurse=False))
        total += sum(t.numel() * t.element_size() for t in module.buffers(recurse=False))
    return total


def attention_flops(config, tokens: int) -> float:
    return config.num_layers * 4 * config.num_heads * config.head_dim * tokens * (tokens + 1) / 2


_FLOPS: dict[tuple, float] = {}


@torch.inference_mode()
def matmul_flops_per_s(dtype: torch.dtype, size: int = 256) -> float:
    """The fastest of several square matmuls (attention's QK^T and PV run at about this rate), cached."""
    key = (dtype, size, torch.get_num_threads())
    if key not in _FLOPS:
        a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
        a @ b
        times = []
        for _ in range(10):
            started = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - started)
        _FLOPS[key] = 2 * size**3 / min(times)
    return _FLOPS[key]


def predict(
    config, spec: FormatSpec, workload: Workload, bandwidth_gbs: float | None = None, speed: bool = True
) -> Prediction:
    """Memory and speed of `spec` for a model of `config` under `workload` on this machine (speed=False: memory
    only, no timing probes; the speeds are then nan)."""
    plan = runtime_plan(spec)
    model = meta_model(config)
    tied = bool(config.tie_word_embeddings)
    shapes = linear_shapes(model, spec, tied)
    with scoped_threads(workload.threads):
        linear_bytes = sum(n * layer_bytes(spec, o, i, b, plan) for (o, i, b), n in shapes.items())
        read_bytes = sum(n * layer_read_bytes(spec, o, i, b, plan) for (o, i, b), n in shapes.items())
        decode_s, prefill_s, bandwidth = float("nan"), float("nan"), float("nan")
        if speed:
            decode_s = sum(n * layer_seconds(spec, o, i, b, plan, workload.batch) for (o, i, b), n in shapes.items())
            prefill_s = sum(
                n * layer_seconds(spec, o, i, b, plan, workload.prompt_tokens) for (o, i, b), n in shapes.items()
            )
            prefill_s += attention_flops(config, workload.prompt_tokens) / matmul_flops_per_s(plan.compute_dtype)
            bandwidth = bandwidth_gbs or memory_bandwidth_gbs(workload.threads, size_mib=256, repeats=5)
    # Mixed precision: per-layer bits are known only after the sensitivity probe; its size margin bounds them.
    linear_bytes, read_bytes, decode_s, prefill_s = (
        v * (1 + spec.mixed) for v in (linear_bytes, read_bytes, decode_s, prefill_s)
    )
    weights = int(linear_bytes) + other_bytes(model, plan.compute_dtype, plan.dtype if plan.half_weights else None)
    kv = kv_cache_plan(config, workload.context, workload.batch, workload.kv_cache)
    # decode reads, per step, the KV cache of every sequence at its current length (half the context on average)
    decode_s += workload.batch * kv["bytes_per_token"] * workload.context / 2 / (bandwidth * 1e9)
    weights_in_linears = sum(n * o * i for (o, i, _), n in shapes.items())
    return Prediction(
        format=spec.name,
        weights_bytes=weights,
        kv_cache_bytes=kv["allocated_bytes"],
        kv_cache_memory=kv["kv_cache_memory"],
        activation_bytes=activation_bytes(config, min(workload.prompt_tokens * workload.batch, 512), workload.batch),
        decode_tok_s=workload.batch / decode_s,
        prefill_tok_s=workload.prompt_tokens / prefill_s,
        bits_per_weight=8 * read_bytes / weights_in_linears,
        kv_bytes_per_token=kv["bytes_per_token"],
    )
