"""Models whose projections are GGUF K-quant and Q5 blocks, mixed per tensor as a Q4_K_M file mixes them, run at
their own precision on leanlm's kernels.

- A tiny Qwen2 (biases, grouped-query attention) with a different block type for nearly every projection: the C++
  stack takes the mix and equals the module path bit for bit (it claims to be lossless), with int8 and with float
  activations; with float activations ("exact") the logits equal those of the same weights dequantized to dense
  float32 within 1e-4 relative (float32 rounding of sums in another order).
- Gemma 3 270M Q4_K_M (Q4_K, Q5_0, Q6_K and Q8_0 tensors): loaded natively, every projection on leanlm's kernels;
  exact mode gives the dequantized module path's greedy tokens and logits within 1e-3 relative.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.constants import GGML_QUANT_SIZES

from leanlm.cache.paged_kv import PagedKVCache
from leanlm.engine.paged_attention import SequenceSlice, build_paged_attention
from leanlm.formats.gguf_blocks import blocks_to_quantized
from leanlm.kernels.build import load_kernels
from leanlm.layers.quantized_tensor import QuantizedTensor
from leanlm.models.registry import build_model, config_from_hf

pytestmark = pytest.mark.skipif(not load_kernels(), reason="leanlm kernels unavailable (no compiler or AVX2)")

# per layer: the block type of q, k, v, o, gate, up, down (as Q4_K_M picks them: Q6_K for some v and down)
LAYER_TYPES = [
    ("Q4_K", "Q4_K", "Q6_K", "Q5_0", "Q4_K", "Q5_K", "Q6_K"),
    ("Q5_0", "Q5_0", "Q8_0", "Q4_K", "Q5_1", "Q4_1", "Q4_K"),
]
# byte offsets of each type's float16 scales (the rest of a block: codes and packed sub-scales, any byte valid)
FLOAT16_FIELDS = {
    "Q4_K": (0, 2),
    "Q5_K": (0, 2),
    "Q6_K": (208,),
    "Q5_0": (0,),
    "Q5_1": (0, 2),
    "Q8_0": (0,),
    "Q4_1": (0, 2),
}


def random_blocks(type_name: str, rows: int, columns: int, rng: np.random.Generator) -> QuantizedTensor:
    """Random codes and sub-block scales, with float16 scales small enough that activations stay in range."""
    block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
    blocks = rng.integers(0, 256, (rows, columns // block_size, type_size), dtype=np.uint8)
    magnitude = 2e-4 if type_name.endswith("_K") else 4e-3 / (127 if type_name == "Q8_0" else 16)
    for offset in FLOAT16_FIELDS[type_name]:
        scales = (rng.uniform(0.5, 1.0, (rows, columns // block_size)) * magnitude).astype(np.float16)
        blocks[..., offset : offset + 2] = scales.view(np.uint8).reshape(rows, -1, 2)
    return blocks_to_quantized(blocks.reshape(rows, -1), type_name, (rows, columns))


@pytest.fixture(scope="module")
def tiny():
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.Qwen2Config(
        vocab_size=300,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    weights = dict(transformers.Qwen2ForCausalLM(hf_config).state_dict())
    rng = np.random.default_rng(0)
    names = [
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ]
    for layer, types in enumerate(LAYER_TYPES):
        for name, type_name in zip(names, types, strict=True):
            key = f"model.layers.{layer}.{name}.weight"
            weights[key] = random_blocks(type_name, *weights[key].shape, rng)
    return config_from_hf(hf_config.to_dict()), weights


def dequantized(weights: dict) -> dict:
    return {n: t.dequantize() if isinstance(t, QuantizedTensor) else t for n, t in weights.items()}


@torch.inference_mode()
def run_chunks(model, ids: list[int], chunks: list[int], stack: bool) -> list[torch.Tensor]:
    """ids in chunks (a prefill, then decode steps) through one sequence of a fresh paged cache."""
    c = model.config
    cache = PagedKVCache(c.num_layers, 8, 16, c.num_kv_heads, c.head_dim, torch.float32)
    saved, model.decoder_stack = model.decoder_stack, (model.decoder_stack if stack else None)
    try:
        logits, start = [], 0
        for size in chunks:
            attend = build_paged_attention(cache, model.attention, [SequenceSlice(start, size, [3, 1, 5], True)])
            chunk = torch.tensor([ids[start : start + size]])
            logits.append(model(chunk, torch.arange(start, start + size)[None], attend=attend))
            start += size
        return logits
    finally:
        model.decoder_stack = saved


IDS = [(7 * i + 3) % 300 for i in range(24)]
CHUNKS = [17, 1, 1, 5]


@pytest.mark.parametrize("mode", ["auto", "exact"])
def test_the_stack_runs_a_mix_of_block_types_bit_for_bit(tiny, mode):
    config, weights = tiny
    model = build_model(config, weights, torch.float32, "cpu", mode)
    kernels = {m.kernel for m in model.modules() if hasattr(m, "kernel")}
    assert kernels == {"leanlm-q4", "leanlm-q8"}
    assert model.decoder_stack is not None, model.decoder_stack_refusal
    fast, plain = run_chunks(model, IDS, CHUNKS, stack=True), run_chunks(model, IDS, CHUNKS, stack=False)
    for a, b in zip(fast, plain, strict=True):
        assert torch.equal(a, b)


def test_exact_kernels_equal_the_dequantized_model(tiny):
    config, weights = tiny
    native = build_model(config, weights, torch.float32, "cpu", "exact")
    dense = build_model(config, dequantized(weights), torch.float32, "cpu", "torch")
    ours, reference = (
        torch.cat(run_chunks(native, IDS, CHUNKS, True), 1),
        torch.cat(run_chunks(dense, IDS, CHUNKS, False), 1),
    )
    assert reference.std() > 0.1  # the random weights give logits that are not all alike
    assert float((ours - reference).norm() / reference.norm()) < 1e-4


@pytest.mark.slow
@torch.inference_mode()
def test_gemma3_q4_k_m_runs_natively_with_the_dequantized_models_tokens():
    from leanlm.formats.assets import fetch_known_model
    from leanlm.models.checkpoint import holds_quantized_weights, load_checkpoint

    path = fetch_known_model("gemma3-270m", quiet=True)
    assert holds_quantized_weights(path)
    native = load_checkpoint(path, torch.float32, native_quant=True)
    types = set(native.weight_types.values())
    assert {"Q4_K", "Q6_K", "Q5_0", "Q8_0"} <= types
    fast = build_model(native.config, native.weights, torch.float32, "cpu", "exact")
    assert {m.kernel for m in fast.modules() if hasattr(m, "kernel")} == {"leanlm-q4", "leanlm-q8"}
    dense = build_model(native.config, dequantized(native.weights), torch.float32, "cpu", "torch")
    ids = native.tokenizer.encode("The capital of France is")
    for _ in range(12):
        window = torch.tensor([ids])
        positions = torch.arange(len(ids))[None]
        ours, reference = fast(window, positions), dense(window, positions)
        assert float((ours - reference).norm() / reference.norm()) < 1e-3
        assert int(ours[0, -1].argmax()) == int(reference[0, -1].argmax())
        ids.append(int(reference[0, -1].argmax()))


@pytest.mark.slow
@torch.inference_mode()
def test_gemma3_packed_layouts_give_the_8_bit_layouts_logits(monkeypatch):
    """Gemma 3's Q5_0 and Q6_K codes packed at 5 and 6 bits, its Q5_0 q/k beside a Q8_0 v as their own 5-bit row
    segment: the storage changes, not the arithmetic, so the logits (int8 activations, the default) are those of
    the 8-bit layouts bit for bit, from fewer bytes."""
    from leanlm.formats.assets import fetch_known_model
    from leanlm.kernels import layout
    from leanlm.layers import quantized_linear
    from leanlm.models.checkpoint import load_checkpoint

    native = load_checkpoint(fetch_known_model("gemma3-270m", quiet=True), torch.float32, native_quant=True)
    packed = build_model(native.config, native.weights, torch.float32, "cpu", "auto")
    linears = [m for m in packed.modules() if isinstance(m, quantized_linear.QuantizedLinear)]
    assert {p.code_bits for m in linears for p in m._packed.segments()} == {4, 5, 6, 8}
    monkeypatch.setattr(layout, "packed_bits", lambda _: None)
    monkeypatch.setattr(quantized_linear, "pack_segments", layout.pack)
    wide = build_model(native.config, native.weights, torch.float32, "cpu", "auto")
    assert sum(m.runtime_bytes() for m in linears) < 0.93 * sum(
        m.runtime_bytes() for m in wide.modules() if isinstance(m, quantized_linear.QuantizedLinear)
    )
    ids = torch.tensor([native.tokenizer.encode("The capital of France is Paris. The capital of Italy is")])
    positions = torch.arange(ids.shape[1])[None]
    assert torch.equal(packed(ids, positions), wide(ids, positions))
