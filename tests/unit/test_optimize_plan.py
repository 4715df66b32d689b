"""`leanlm plan`'s memory figures equal what the engine allocates: the weights of a model built in each format
(counted storage by storage) and the KV cache of an engine given the planned --kv-cache-memory."""

import pytest
import torch

from leanlm.compress.rtn import quantize_rtn
from leanlm.config import EngineConfig, ModelConfig
from leanlm.engine.engine import LLMEngine
from leanlm.models.registry import build_model
from leanlm.optimize.formats import FORMATS
from leanlm.optimize.memory import allocated_weight_bytes, engine_kv_bytes, kv_cache_plan
from leanlm.optimize.predict import Workload, predict, runtime_plan


def tiny_config(tied: bool) -> ModelConfig:
    return ModelConfig(
        model_type="llama",
        vocab_size=320,  # 5 x 64 rows: the LM head's bytes are scaled up from a 64-row probe
        hidden_size=128,
        intermediate_size=256,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        context_length=256,
        tie_word_embeddings=tied,
    )


def checkpoint(config: ModelConfig, spec) -> dict:
    """HF-named random weights, quantized as `spec` says (the LM head too, as `leanlm quantize` does: a tied head
    on the embedding's codes, in groups of 32)."""
    g = torch.Generator().manual_seed(0)
    shapes = {"model.embed_tokens.weight": (config.vocab_size, config.hidden_size), "model.norm.weight": (128,)}
    if not config.tie_word_embeddings or spec.quantized:
        shapes["lm_head.weight"] = (config.vocab_size, config.hidden_size)
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (128,), p + "post_attention_layernorm.weight": (128,)}
        for name, shape in {
            "self_attn.q_proj": (config.q_size, 128),
            "self_attn.k_proj": (config.kv_size, 128),
            "self_attn.v_proj": (config.kv_size, 128),
            "self_attn.o_proj": (128, config.q_size),
            "mlp.gate_proj": (256, 128),
            "mlp.up_proj": (256, 128),
            "mlp.down_proj": (128, 256),
        }.items():
            shapes[p + name + ".weight"] = shape
    weights = {name: torch.randn(shape, generator=g) * 0.05 for name, shape in shapes.items()}
    if spec.quantized:
        c = spec.quant_config()
        for name in [n for n in weights if n.endswith("proj.weight") or n == "lm_head.weight"]:
            weights[name] = quantize_rtn(weights[name], c.bits, c.group_size, c.symmetric)
        if config.tie_word_embeddings:
            bits = spec.embedding_bits
            codes = quantize_rtn(weights["model.embed_tokens.weight"], bits, 32, symmetric=bits > 4)
            weights["lm_head.weight"], weights["model.embed_tokens.weight"] = codes, codes.dequantize(torch.float32)
    return weights


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("name", ["bf16", "int8", "rtn4-g32", "rtn4-g128", "gptq3-g32", "rtn4-g32-emb4"])
def test_planned_weight_memory_equals_the_built_model(name, tied):
    config, spec = tiny_config(tied), FORMATS[name]
    predicted = predict(config, spec, Workload(context=64, prompt_tokens=16), speed=False)
    model = build_model(config, checkpoint(config, spec), runtime_plan(spec))
    assert predicted.weights_bytes == allocated_weight_bytes(model)


@pytest.mark.parametrize("kv_cache", ["auto", "int8"])
@pytest.mark.parametrize("context,batch", [(100, 1), (64, 3)])
def test_planned_kv_cache_is_what_the_engine_allocates_and_holds_the_workload(kv_cache, context, batch):
    config, spec = tiny_config(True), FORMATS["bf16"]
    model = build_model(config, checkpoint(config, spec), runtime_plan(spec))
    kv = kv_cache_plan(config, context, batch, kv_cache)
    engine = LLMEngine(
        model, tokenizer=None, config=EngineConfig(kv_cache_memory=kv["kv_cache_memory"]), kv_cache=kv_cache
    )
    assert engine_kv_bytes(engine) == kv["allocated_bytes"]
    assert engine.max_cached_tokens >= context * batch
    assert engine.max_cached_tokens < (context + 16) * batch  # no more than a block of slack per sequence


def test_longest_context_is_the_most_whole_blocks_that_fit_beside_weights_and_activations():
    config, spec = tiny_config(True), FORMATS["int8"]
    p = predict(config, spec, Workload(context=64, batch=2, prompt_tokens=16), speed=False)
    block = 16 * p.kv_bytes_per_token
    memory = p.weights_bytes + p.activation_bytes + (2 * 10 + 1) * block  # 10 blocks per sequence + the null block
    assert p.longest_context(memory, batch=2) == 160
    assert p.longest_context(memory - 1, batch=2) == 144
    assert p.longest_context(p.weights_bytes, batch=2) == 0


def test_planned_memory_of_a_gguf_source_is_what_the_engine_allocates(default_gguf_path):
    """The shipped Q4_1 file as stored (fused q/k/v and gate/up from the file's own blocks, the tied head on its
    Q8_0 embedding): plan's weights equal the loaded model's storage byte for byte."""
    from leanlm.engine.llm import LLM
    from leanlm.models.checkpoint import load_checkpoint
    from leanlm.optimize.predict import source_layers

    stored = source_layers(default_gguf_path)
    assert stored["lm_head"].types == ("Q8_0",) and stored["layers.0.self_attn.qkv_proj"].types == ("Q4_1",) * 3
    config = load_checkpoint(default_gguf_path, weights=False).config
    predicted = predict(config, FORMATS["source"], Workload(context=64, prompt_tokens=16), speed=False, stored=stored)
    llm = LLM(default_gguf_path, device="cpu")
    assert predicted.weights_bytes == allocated_weight_bytes(llm.model)
