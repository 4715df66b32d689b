"""A tiny random Llama on disk (config.json, model.safetensors, a word-level tokenizer.json of "w0".."w255") for
tests that run whole processes (torchrun ranks, Ray replicas) and need a model that loads in a second."""

from __future__ import annotations

import json
from pathlib import Path

import torch

CONFIG = {  # 4 heads over 2 KV heads: tensor parallelism over 2 ranks gives each 2 heads over 1 KV head
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
}


def write_tiny_model(folder: Path, context: int = 256) -> Path:
    """A random Llama with a word-level tokenizer ("w0".."w255"); weights large enough for clear greedy choices."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder.mkdir(parents=True, exist_ok=True)
    c, gen = CONFIG, torch.Generator().manual_seed(0)
    h, q, kv, m = c["hidden_size"], 4 * 16, 2 * 16, c["intermediate_size"]

    def rand(*shape: int, std: float = 0.15) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std

    weights = {"model.embed_tokens.weight": rand(256, h, std=1.0), "model.norm.weight": 1 + rand(h, std=0.1)}
    weights["lm_head.weight"] = rand(256, h)
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes = {"q": (q, h), "k": (kv, h), "v": (kv, h), "o": (h, q), "gate": (m, h), "up": (m, h), "down": (h, m)}
        for name, shape in shapes.items():
            block = "self_attn" if name in "qkvo" else "mlp"
            weights[f"{p}{block}.{name}_proj.weight"] = rand(*shape)
        weights[f"{p}input_layernorm.weight"] = 1 + rand(h, std=0.1)
        weights[f"{p}post_attention_layernorm.weight"] = 1 + rand(h, std=0.1)
    save_file(weights, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({**c, "max_position_embeddings": context}))
    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(256)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder
