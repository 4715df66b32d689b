"""CUDA: quantized layers and a quantized model run on the GPU and match their references (skipped without one).

Tolerances: float32 1e-4 relative (TF32 off), bfloat16 3e-2 relative (bf16 rounding of activations and output).
"""

from __future__ import annotations

import pytest
import torch

from leanlm.cache.kv_cache import KVCache
from leanlm.compress.rtn import quantize_rtn
from leanlm.config import ModelConfig
from leanlm.layers.attention import reference_attention, sdpa_attention
from leanlm.layers.quantized_linear import QuantizedLinear
from leanlm.models.registry import build_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")
TOLERANCES = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


@pytest.fixture(autouse=True)
def no_tf32():
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


def relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    out, reference = out.double().cpu(), reference.double().cpu()
    return float((out - reference).norm() / reference.norm())


@pytest.mark.parametrize("bits,group,symmetric", [(4, 32, False), (4, 128, False), (3, 64, False), (8, -1, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_linear_on_cuda_matches_reference(bits, group, symmetric, dtype):
    torch.manual_seed(0)
    weight = quantize_rtn(torch.randn(256, 576) * 0.05, bits, group, symmetric)
    layer = QuantizedLinear(weight, torch.randn(256) * 0.1)
    x = torch.randn(7, 576)
    reference = layer.reference_forward(x)  # on the CPU, float32
    layer = layer.to(CUDA)
    kernel = layer.prepare_runtime(dtype, CUDA)
    out = layer(x.to(CUDA, dtype))
    assert out.device.type == "cuda" and out.dtype == dtype, kernel
    assert relative_error(out, reference) < TOLERANCES[dtype], kernel


def test_sdpa_on_cuda_matches_reference_attention():
    torch.manual_seed(1)
    q, k, v = torch.randn(2, 6, 5, 64), torch.randn(2, 2, 17, 64), torch.randn(2, 2, 17, 64)
    reference = reference_attention(q, k, v)
    out = sdpa_attention(q.to(CUDA), k.to(CUDA), v.to(CUDA))
    assert relative_error(out, reference) < 1e-4


def tiny_config() -> ModelConfig:
    return ModelConfig(
        model_type="llama",
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        context_length=256,
    )


def tiny_weights(config: ModelConfig, quantized: bool) -> dict:
    torch.manual_seed(2)
    shapes = {
        "model.embed_tokens.weight": (config.vocab_size, config.hidden_size),
        "model.norm.weight": (config.hidden_size,),
        "lm_head.weight": (config.vocab_size, config.hidden_size),
    }
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (config.hidden_size,),
            p + "post_attention_layernorm.weight": (config.hidden_size,),
            p + "self_attn.q_proj.weight": (config.q_size, config.hidden_size),
            p + "self_attn.k_proj.weight": (config.kv_size, config.hidden_size),
            p + "self_attn.v_proj.weight": (config.kv_size, config.hidden_size),
            p + "self_attn.o_proj.weight": (config.hidden_size, config.q_size),
            p + "mlp.gate_proj.weight": (config.intermediate_size, config.hidden_size),
            p + "mlp.up_proj.weight": (config.intermediate_size, config.hidden_size),
            p + "mlp.down_proj.weight": (config.hidden_size, config.intermediate_size),
        }
    weights = {}
    for name, shape in shapes.items():
        tensor = 1 + 0.1 * torch.randn(shape) if len(shape) == 1 else torch.randn(shape) * 0.08
        if quantized and "proj" in name:
            tensor = quantize_rtn(tensor, 4, 32, False)
        weights[name] = tensor
    return weights


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_model_decodes_on_cuda_like_on_cpu(dtype):
    """Logits of a prefill and three cached decode steps on the GPU against the CPU float32 model."""
    config = tiny_config()
    cpu = build_model(config, tiny_weights(config, True), torch.float32, "cpu", "torch")
    gpu = build_model(config, tiny_weights(config, True), dtype, CUDA)
    assert {m.kernel for m in gpu.modules() if isinstance(m, QuantizedLinear)}  # quantized layers are there
    ids = torch.randint(0, config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(3))
    caches = {
        "cpu": KVCache(config.num_layers, 1, config.num_kv_heads, 32, config.head_dim, torch.float32),
        "gpu": KVCache(config.num_layers, 1, config.num_kv_heads, 32, config.head_dim, dtype, CUDA),
    }
    with torch.inference_mode():
        positions = torch.arange(12).unsqueeze(0)
        expected = cpu(ids, positions, caches["cpu"].attention(0, cpu.attention))
        got = gpu(ids.to(CUDA), positions.to(CUDA), caches["gpu"].attention(0, gpu.attention))
        assert relative_error(got, expected) < TOLERANCES[dtype]
        for step in range(3):
            token, position = ids[:, step : step + 1], torch.tensor([[12 + step]])
            expected = cpu(token, position, caches["cpu"], 12 + step)
            got = gpu(token.to(CUDA), position.to(CUDA), caches["gpu"], 12 + step)
            assert relative_error(got, expected) < TOLERANCES[dtype]
