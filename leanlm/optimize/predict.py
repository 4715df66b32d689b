"""`leanlm plan`'s predictions: for a format, the memory the engine will allocate and the speed it will reach,
from the model's shape and probes of this machine (memory bandwidth, each kernel timed on the model's own
matrix shapes), without building the model.

Memory: the module tree is built on the meta device (shapes only); every linear layer's bytes come from one real
layer of its shape and format built and prepared as the engine prepares it (scaled by rows, which is exact for
these layouts), the other tensors are counted at the dtype the runtime plan gives them. Speed: a decode step
is the probed time of every linear layer at one row per sequence (no faster than streaming its weights at the
probed bandwidth) plus the KV cache read; a prefill is every linear layer at all prompt rows (the LM head at the
last one) plus the attention kernel timed on the model's head shapes.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import time
from dataclasses import dataclass, field

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


@dataclass(frozen=True)
class StoredLayer:
    """A linear layer as its checkpoint stores it (GGUF tensors in leanlm's native block types; several for a fused
    q/k/v or gate/up, stacked as the loader stacks them): probes build it from the file's own bytes, so its runtime
    layout is exactly the engine's."""

    path: str
    # Layers of one shape and block types are alike to the probes: any of them stands for all (compare=False)
    tensors: tuple[str, ...] = field(compare=False)
    types: tuple[str, ...]

    @property
    def fused(self) -> bool:
        return len(self.tensors) > 1

    def quantized(self, rows: int):
        """The first `rows` rows (all of them for a fused layer: its parts are stacked whole)."""
        from leanlm.formats.gguf_blocks import blocks_to_quantized
        from leanlm.layers.quantized_tensor import QuantizedTensor

        gguf_file = _gguf_file(self.path)
        parts = []
        for name, type_name in zip(self.tensors, self.types, strict=True):
            shape = gguf_file.tensors[name].shape
            take = shape[0] if self.fused else rows
            parts.append(blocks_to_quantized(gguf_file.raw_tensor(name)[:take], type_name, (take, shape[1])))
        return QuantizedTensor.cat(parts) if self.fused else parts[0]


LayerFormat = FormatSpec | StoredLayer


@functools.lru_cache(maxsize=2)
def _gguf_file(path: str):
    from leanlm.formats.gguf import GGUFFile

    return GGUFFile(path)


# the module tree's fused linears and the checkpoint projections stacked into them (models/base.py)
FUSED_PARTS = {"self_attn.qkv_proj": ("q_proj", "k_proj", "v_proj"), "mlp.gate_up_proj": ("gate_proj", "up_proj")}


def source_layers(path) -> dict[str, StoredLayer] | None:
    """A GGUF source that runs natively (every decoder projection in a block type leanlm's kernels take): its
    linear layers by module name, each as stored (a Q4_K_M file mixes Q4_K, Q6_K and others per tensor); a tied
    LM head runs on the token embedding's blocks. None for any other checkpoint."""
    from leanlm.formats.gguf import GGUFFile
    from leanlm.formats.gguf_blocks import NATIVE_TYPES
    from leanlm.formats.loader import locate_checkpoint
    from leanlm.models.checkpoint import holds_quantized_weights
    from leanlm.models.registry import family_for_gguf

    kind, file = locate_checkpoint(path)
    if kind != "gguf" or not holds_quantized_weights(file):
        return None
    gguf_file = GGUFFile(file)
    family = family_for_gguf(gguf_file.metadata.get("general.architecture"))
    by_module = {}  # HF module name (without "model.") -> GGUF tensor name
    for name, info in gguf_file.tensors.items():
        module = (family.hf_name_from_gguf(name) or "").removesuffix(".weight").removeprefix("model.")
        if len(info.shape) == 2 and gguf_file.tensor_type_name(name) in NATIVE_TYPES:
            by_module[module] = name
    if "lm_head" not in by_module and "embed_tokens" in by_module and "output.weight" not in gguf_file.tensors:
        by_module["lm_head"] = by_module["embed_tokens"]  # tied: the head runs on the embedding's blocks
    layers = {}
    for module, name in by_module.items():
        block, _, proj = module.rpartition(".")
        fused = next((f for f, parts in FUSED_PARTS.items() if block.endswith(f.split(".")[0]) and proj in parts), None)
        if fused is not None:
            prefix = block + "." + fused.split(".")[1]
            parts = [by_module.get(f"{block}.{p}") for p in FUSED_PARTS[fused]]
            if None not in parts:
                types = tuple(gguf_file.tensor_type_name(p) for p in parts)
                layers[prefix] = StoredLayer(str(file), tuple(parts), types)
        elif module == "lm_head" or proj.endswith("proj"):
            layers[module] = StoredLayer(str(file), (name,), (gguf_file.tensor_type_name(name),))
    return layers


def runtime_plan(spec: FormatSpec, source_quantized: bool = False, kernels: str = "auto") -> RuntimePlan:
    """The plan the engine resolves for this format (leanlm's kernels when they build)."""
    dtype = "float32" if spec.dtype == "float32" else "bfloat16"
    plan = resolve_plan("cpu", dtype, kernels=kernels, dequantize=spec.method == "dense")
    quantized = spec.quantized or (spec.method == "source" and source_quantized)
    return plan.for_weights(quantized)


def tied_head_format(spec: FormatSpec) -> FormatSpec:
    """A quantized format's tied LM head runs on the embedding's own codes (compress/quantize.py: rows in groups of
    32, symmetric above 4 bits)."""
    method = "int8" if spec.embedding_bits == 8 else "int4"
    return FormatSpec(f"embedding-{spec.embedding_bits}", method, spec.embedding_bits, 32)


def meta_model(config) -> nn.Module:
    from leanlm.models.registry import family_for_model_type

    with torch.device("meta"):
        return family_for_model_type(config.model_type).model_class(config)


def layer_for(spec: LayerFormat, rows: int, cols: int, bias: bool, plan: RuntimePlan) -> nn.Module:
    """One linear layer of this shape and format, prepared as the engine prepares it (random weights, or the
    checkpoint's own rows for a StoredLayer)."""
    generator = torch.Generator().manual_seed(rows * 7919 + cols)
    weight = torch.randn(rows, cols, generator=generator) * cols**-0.5
    bias_tensor = torch.randn(rows, generator=generator) * 0.1 if bias else None
    if isinstance(spec, StoredLayer):
        layer = QuantizedLinear(spec.quantized(rows), bias_tensor)
        layer.prepare_runtime(plan.compute_dtype, plan.device, plan.kernels)
        return layer
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
    symmetric = config.symmetric or (spec.name.startswith("embedding-") and spec.bits > 4)
    layer = QuantizedLinear(quantize_rtn(weight, config.bits, config.group_size, symmetric), bias_tensor)
    layer.prepare_runtime(plan.compute_dtype, plan.device, plan.kernels)
    return layer


def bytes_probe_rows(spec: LayerFormat, rows: int) -> int:
    """Rows of the layer built to count its bytes (a fused stored layer is built whole: its parts differ)."""
    if isinstance(spec, StoredLayer) and spec.fused:
        return rows
    return BYTES_PROBE_ROWS if rows % BYTES_PROBE_ROWS == 0 and rows > BYTES_PROBE_ROWS else rows


def layer_bytes(spec: LayerFormat, rows: int, cols: int, bias: bool, plan: RuntimePlan) -> int:
    probe = bytes_probe_rows(spec, rows)
    layer = layer_for(spec, probe, cols, bias, plan)
    return sum(t.numel() * t.element_size() for t in module_tensors(layer)) * rows // probe


def layout_key(spec: LayerFormat, plan: RuntimePlan) -> tuple:
    """Formats with one runtime layout (RTN, GPTQ and AWQ at the same bits and groups) share their probes."""
    if isinstance(spec, StoredLayer):
        return (spec.types, plan.compute_dtype, plan.kernels)
    if not spec.quantized:
        return ("dense", plan.compute_dtype, plan.kernels)
    config = spec.quant_config()
    return (config.bits, config.group_size, config.symmetric, plan.compute_dtype, plan.kernels)


_TIMES: dict[tuple, float] = {}


@torch.inference_mode()
def layer_seconds(spec: LayerFormat, rows: int, cols: int, bias: bool, plan: RuntimePlan, tokens: int) -> float:
    """Seconds of one call on `tokens` rows of activations, scaled to `rows` outputs. Copies of the layer are
    cycled through so that their weights come from memory, not the caches, as in a model's decode step. The
    median over copies of each copy's fastest call: on a shared machine other jobs only ever add time (a 2-thread
    team waits ~10 ms whenever one of its threads is descheduled). Cached per layout, shape and thread count."""
    key = (layout_key(spec, plan), rows, cols, bias, tokens, torch.get_num_threads())
    if key in _TIMES:
        return _TIMES[key]
    probe = rows if isinstance(spec, StoredLayer) and spec.fused else min(rows, TIME_PROBE_ROWS)
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


def layer_read_bytes(spec: LayerFormat, rows: int, cols: int, bias: bool, plan: RuntimePlan) -> int:
    """Bytes the layer's kernel reads per call (its runtime layout), scaled by rows like layer_bytes."""
    probe = bytes_probe_rows(spec, rows)
    layer = layer_for(spec, probe, cols, bias, plan)
    read = (
        layer.runtime_bytes()
        if isinstance(layer, QuantizedLinear)
        else layer.weight.numel() * layer.weight.element_size()
    )
    return read * rows // probe


def linear_layers(
    model: nn.Module, spec: FormatSpec, tied: bool, stored: dict[str, StoredLayer] | None = None
) -> dict[tuple[int, int, bool, LayerFormat, bool], int]:
    """(out, in, bias, layer format, holds its own weights) -> how many such linear layers a decode step runs.
    A dense tied LM head is the embedding's storage (its bytes are the embedding's); a quantized format's tied head
    runs on the embedding's codes; `stored` gives the checkpoint's own layers by module name (a GGUF source)."""
    counts: dict[tuple, int] = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        layer_format: LayerFormat = spec
        owns = True
        if stored is not None and name in stored:
            layer_format = stored[name]
        elif name == "lm_head" and tied:
            if spec.quantized and spec.embedding_bits:
                layer_format = tied_head_format(spec)
            elif not spec.quantized:
                owns = False
        key = (module.out_features, module.in_features, module.bias is not None, layer_format, owns)
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


_ATTENTION: dict[tuple, float] = {}


@torch.inference_mode()
def attention_seconds(config, tokens: int, dtype: torch.dtype) -> float:
    """One prompt's causal self-attention over all layers, timed on the model's own head shapes with the kernel the
    engine runs (leanlm's per-query kernel in float32: far below a matmul's rate at prompt lengths), best of
    several calls, cached."""
    from leanlm.layers.attention import fused_attention

    key = (config.num_heads, config.head_dim, tokens, dtype, torch.get_num_threads())
    if key not in _ATTENTION:
        generator = torch.Generator().manual_seed(tokens)
        q, k, v = (torch.randn(1, config.num_heads, tokens, config.head_dim, generator=generator) for _ in range(3))
        q, k, v = (t.to(dtype) for t in (q, k, v))
        fused_attention(q, k, v)
        times = []
        for _ in range(5):
            started = time.perf_counter()
            fused_attention(q, k, v)
            times.append(time.perf_counter() - started)
        _ATTENTION[key] = min(times)
    return config.num_layers * _ATTENTION[key]


def predict(
    config,
    spec: FormatSpec,
    workload: Workload,
    bandwidth_gbs: float | None = None,
    speed: bool = True,
    kernels: str = "auto",
    stored: dict[str, StoredLayer] | None = None,
) -> Prediction:
    """Memory and speed of `spec` for a model of `config` under `workload` on this machine (speed=False: memory
    only, no timing probes; the speeds are then nan). `stored`: the source checkpoint's own layers by module name
    (source_layers), for a checkpoint that runs as stored."""
    plan = runtime_plan(spec, source_quantized=bool(stored), kernels=kernels)
    model = meta_model(config)
    tied = bool(config.tie_word_embeddings)
    layers = linear_layers(model, spec, tied, stored)
    with scoped_threads(workload.threads):
        linear_bytes = sum(n * layer_bytes(f, o, i, b, plan) for (o, i, b, f, owns), n in layers.items() if owns)
        read_bytes = sum(n * layer_read_bytes(f, o, i, b, plan) for (o, i, b, f, _), n in layers.items())
        decode_s, prefill_s, bandwidth = float("nan"), float("nan"), float("nan")
        if speed:
            bandwidth = bandwidth_gbs or memory_bandwidth_gbs(workload.threads, size_mib=256, repeats=5)
            # A decode step streams every layer's weights from memory: no faster than the probed bandwidth allows,
            # even where a probe's copies partly stayed in the caches (the probes undershot bf16 decode by 1.8 ms)
            decode_s = sum(
                n
                * max(
                    layer_seconds(f, o, i, b, plan, workload.batch),
                    layer_read_bytes(f, o, i, b, plan) / 1e9 / bandwidth,
                )
                for (o, i, b, f, _), n in layers.items()
            )
            # a prompt's logits are the last token's only (CausalLM.forward's last_only): the head runs on 1 row each
            prefill_s = sum(
                n
                * layer_seconds(f, o, i, b, plan, workload.batch if o == config.vocab_size else workload.prompt_tokens)
                for (o, i, b, f, _), n in layers.items()
            )
            prefill_s += workload.batch * attention_seconds(config, workload.prompt_tokens, plan.compute_dtype)
    # Mixed precision: per-layer bits are known only after the sensitivity probe; its size margin bounds them.
    linear_bytes, read_bytes, decode_s, prefill_s = (
        v * (1 + spec.mixed) for v in (linear_bytes, read_bytes, decode_s, prefill_s)
    )
    weights = int(linear_bytes) + other_bytes(model, plan.compute_dtype, plan.dtype if plan.half_weights else None)
    kv = kv_cache_plan(config, workload.context, workload.batch, workload.kv_cache)
    # decode reads, per step, the KV cache of every sequence at its current length (half the context on average)
    decode_s += workload.batch * kv["bytes_per_token"] * workload.context / 2 / (bandwidth * 1e9)
    weights_in_linears = sum(n * o * i for (o, i, _, _, _), n in layers.items())
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
