"""Memory a model holds once the engine has built it: every distinct tensor storage reachable from its modules
(parameters, buffers and the kernels' packed layouts), and the KV cache the engine allocates for a workload.

`allocated_weight_bytes` is the reference `leanlm plan`'s predictions are tested against.
"""

from __future__ import annotations

import torch
from torch import nn

from leanlm.cache.kv_cache import default_cache_dtype
from leanlm.cache.paged_kv import PAGED_KV_CACHE_TYPES
from leanlm.layers.quantized_linear import QuantizedLinear

# QuantizedLinear's runtime layouts, built by prepare_runtime next to its codes/scale/offset buffers.
RUNTIME_ATTRIBUTES = ("_int4pack", "_int4scales", "_int8scale", "_dense")


def module_tensors(module: nn.Module) -> list[torch.Tensor]:
    """The tensors this module itself holds (not its children's)."""
    tensors = [t for t in module.parameters(recurse=False)] + [t for t in module.buffers(recurse=False)]
    if isinstance(module, QuantizedLinear):
        tensors += [getattr(module, name) for name in RUNTIME_ATTRIBUTES if getattr(module, name, None) is not None]
        packed = getattr(module, "_packed", None)
        for segment in [] if packed is None else packed.segments():  # one layout, or a fused q/k/v's row segments
            tensors += [t for t in (segment.codes, segment.scales, segment.offsets) if t is not None]
    return [t for t in tensors if t is not None]


def allocated_weight_bytes(model: nn.Module) -> int:
    """Bytes of every distinct storage the model's modules hold (a tied LM head counts once)."""
    seen, total = set(), 0
    for module in model.modules():
        for tensor in module_tensors(module):
            storage = tensor.untyped_storage()
            if storage.data_ptr() in seen or tensor.device.type == "meta":
                continue
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def kv_cache_plan(config, context: int, batch: int, kv_cache: str, block_size: int = 16) -> dict:
    """What the engine allocates so that `batch` sequences of `context` tokens fit at once: the
    --kv-cache-memory to pass, and the bytes it then allocates (those blocks plus the engine's null block)."""
    cache_class = PAGED_KV_CACHE_TYPES[kv_cache]
    dtype = default_cache_dtype(torch.float32, torch.device("cpu"))  # float32 on CPU whatever the weights
    per_token = cache_class.bytes_per_token(config.num_layers, config.num_kv_heads, config.head_dim, dtype)
    blocks = batch * -(-context // block_size)
    return {
        "bytes_per_token": per_token,
        "blocks": blocks,
        "kv_cache_memory": blocks * block_size * per_token,
        "allocated_bytes": (blocks + 1) * block_size * per_token,
    }


def engine_kv_bytes(engine) -> int:
    """Bytes of the engine's KV cache tensors (keys, values, and the int8 cache's scales)."""
    cache = engine.cache
    tensors = [cache.keys, cache.values] + [
        getattr(cache, n) for n in ("key_scales", "value_scales") if hasattr(cache, n)
    ]
    return sum(t.numel() * t.element_size() for t in tensors)


def activation_bytes(config, tokens: int, batch: int) -> int:
    """An estimate of one engine step's largest live activations, in float32: the residual stream, the fused qkv
    and gate/up outputs, attention scores of the widest chunk and the logits of each sequence."""
    widest = max(config.q_size + 2 * config.kv_size, 2 * config.intermediate_size)
    per_token = 4 * (2 * config.hidden_size + widest + config.intermediate_size)
    scores = 4 * config.num_heads * tokens * tokens
    return per_token * tokens + scores + 4 * batch * config.vocab_size


def available_memory() -> int:
    """MemAvailable from /proc/meminfo (what the engine sizes its default KV cache from), else free pages."""
    import os

    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
