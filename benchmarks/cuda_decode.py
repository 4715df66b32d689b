"""CUDA decode-step timing on a SmolLM2-135M-shaped model with random weights (no checkpoint travels to the GPU
machine): dense bfloat16 against int4/int8 weights, whose quantized layers run the dense fallback on CUDA.

Random weights give meaningless tokens but the same shapes, bytes and kernels as the real model. After one
discarded warm-up run (the first in a process is ~5x slower), times are CUDA-event medians of 50 steps after
10 warm-up steps, at a 128-token context; batch 1 and 32.

    python benchmarks/cuda_decode.py
"""

from __future__ import annotations

import statistics
import sys

import torch

from leanlm.cache.kv_cache import KVCache
from leanlm.compress.rtn import quantize_rtn
from leanlm.config import ModelConfig
from leanlm.models.registry import build_model

SMOLLM2_135M = dict(
    model_type="llama",
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_layers=30,
    num_heads=9,
    num_kv_heads=3,
    head_dim=64,
    context_length=2048,
    tie_word_embeddings=True,
)


def random_weights(config: ModelConfig, quantize: tuple[int, int, bool] | None) -> dict:
    generator = torch.Generator().manual_seed(0)
    weights = {
        "model.embed_tokens.weight": torch.randn(config.vocab_size, config.hidden_size, generator=generator) * 0.05,
        "model.norm.weight": torch.ones(config.hidden_size),
    }
    shapes = {
        "self_attn.q_proj": (config.q_size, config.hidden_size),
        "self_attn.k_proj": (config.kv_size, config.hidden_size),
        "self_attn.v_proj": (config.kv_size, config.hidden_size),
        "self_attn.o_proj": (config.hidden_size, config.q_size),
        "mlp.gate_proj": (config.intermediate_size, config.hidden_size),
        "mlp.up_proj": (config.intermediate_size, config.hidden_size),
        "mlp.down_proj": (config.hidden_size, config.intermediate_size),
    }
    for layer in range(config.num_layers):
        prefix = f"model.layers.{layer}."
        weights[prefix + "input_layernorm.weight"] = torch.ones(config.hidden_size)
        weights[prefix + "post_attention_layernorm.weight"] = torch.ones(config.hidden_size)
        for name, shape in shapes.items():
            tensor = torch.randn(*shape, generator=generator) * 0.05
            weights[f"{prefix}{name}.weight"] = quantize_rtn(tensor, *quantize) if quantize else tensor
    return weights


def time_decode(model, config: ModelConfig, batch: int, context: int = 128, steps: int = 50) -> float:
    device = torch.device("cuda")
    cache = KVCache(
        config.num_layers, batch, config.num_kv_heads, context + steps + 16, config.head_dim, torch.bfloat16, device
    )
    ids = torch.randint(0, config.vocab_size, (batch, context), device=device)
    positions = torch.arange(context, device=device).expand(batch, -1)
    times = []
    with torch.inference_mode():
        model(ids, positions, cache.attention(0, model.attention), True)
        token = ids[:, -1:]
        for step in range(10 + steps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            position = torch.full((batch, 1), context + step, device=device)
            start.record()
            model(token, position, cache.attention(context + step, model.attention))
            end.record()
            torch.cuda.synchronize()
            if step >= 10:
                times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA GPU", file=sys.stderr)
        return 1
    config = ModelConfig(**SMOLLM2_135M)
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | SmolLM2-135M shapes, random weights")
    # The first model timed in a process runs ~5x slower (clocks ramping, kernels loading): time one, discard it.
    time_decode(build_model(config, random_weights(config, None), torch.bfloat16, "cuda"), config, 1)
    print(f"{'weights':<22}{'kernel':<10}{'batch':>6}{'ms/step':>10}{'tok/s':>10}")
    for label, quantize in (
        ("bfloat16 dense", None),
        ("int4 g32 (RTN)", (4, 32, False)),
        ("int8 per-row", (8, -1, True)),
    ):
        model = build_model(config, random_weights(config, quantize), torch.bfloat16, "cuda")
        kernels = {m.kernel for m in model.modules() if hasattr(m, "kernel")} or {"torch"}
        for batch in (1, 32):
            ms = time_decode(model, config, batch)
            print(f"{label:<22}{','.join(sorted(kernels)):<10}{batch:>6}{ms:>10.2f}{batch * 1000 / ms:>10.0f}")
        del model
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
