"""Dense 16-bit checkpoints on leanlm's kernels (layers/half_linear.py, kernels/csrc/half_linear.cpp), on a tiny
random Llama: bfloat16 and float16 weights stay 16-bit and held once, activations are float32, every projection
and the head run the 16-bit kernel, the C++ stack takes them.

Tolerance against the float32 module path on the same (16-bit rounded) weights: the weights are converted exactly,
so only float32 summation order differs: logits within 1e-4 relative (measured about 1e-6), same greedy tokens.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from leanlm.kernels.build import load_kernels
from leanlm.layers.half_linear import HalfEmbedding, HalfLinear
from leanlm.layers.quantized_linear import QuantizedLinear

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_model import write_tiny_model  # noqa: E402

pytestmark = pytest.mark.skipif(not load_kernels(), reason="leanlm kernels unavailable (no compiler or AVX2)")

GREEDY = dict(max_tokens=12, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    """The tiny Llama with tied embeddings, stored in bfloat16 as Hugging Face folders are."""
    from safetensors.torch import load_file, save_file

    folder = write_tiny_model(tmp_path_factory.mktemp("tiny") / "model")
    weights = load_file(folder / "model.safetensors")
    weights.pop("lm_head.weight")
    save_file({k: v.bfloat16() for k, v in weights.items()}, folder / "model.safetensors")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    return folder


def llm(folder: Path, dtype: str):
    from leanlm import LLM

    return LLM(str(folder), dtype=dtype, threads=2)


@torch.inference_mode()
def full_logits(model, ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([ids]), torch.arange(len(ids))[None]).float()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_16_bit_model_runs_the_kernels_with_its_weights_held_once(tiny_folder, dtype):
    engine = llm(tiny_folder, dtype)
    assert engine.precision == f"{dtype} (float32 act.)"
    model = engine.model
    assert model.plan.half_weights and model.plan.compute_dtype == torch.float32
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(isinstance(m, HalfLinear) and m.weight.dtype == getattr(torch, dtype) for m in linears)
    assert isinstance(model.embed_tokens, HalfEmbedding) and model.lm_head.weight is model.embed_tokens.weight
    assert model.decoder_stack is not None, model.decoder_stack_refusal
    # no float32 copy anywhere: the only float32 tensors are the norms (vectors)
    assert all(t.dim() == 1 for t in model.state_dict().values() if t.dtype == torch.float32)


@pytest.mark.parametrize("dtype,kernels", [("bfloat16", "exact"), ("float16", "exact"), ("bfloat16", "auto")])
def test_16_bit_logits_match_the_float32_module_path(tiny_folder, dtype, kernels):
    """exact: float32 activations, within 1e-4 and the same greedy tokens. auto: bfloat16 activations into the
    bfloat16 projections (as llama.cpp runs BF16 files): within 2e-2 (each activation rounded by up to 2^-9)."""
    from leanlm import LLM
    from leanlm.sampling_params import SamplingParams

    half = LLM(str(tiny_folder), dtype=dtype, threads=2, kernels=kernels)
    assert all(m.round_activations == (kernels == "auto") for m in half.model.modules() if isinstance(m, HalfLinear))
    reference = llm(tiny_folder, "float32")  # the same bfloat16 values, read exactly into float32
    if dtype == "float16":  # bfloat16 -> float16 rounds: the reference runs the float16 values
        for module in reference.model.modules():
            if isinstance(module, torch.nn.Linear | torch.nn.Embedding):
                module.weight.data = module.weight.data.half().float()
    assert not reference.plan.half_weights
    ids = list(range(3, 40))
    got, want = full_logits(half.model, ids), full_logits(reference.model, ids)
    assert float((got - want).norm() / want.norm()) < (1e-4 if kernels == "exact" else 2e-2)
    if kernels == "exact":
        prompt, params = "w5 w9 w33 w2", SamplingParams(**GREEDY)
        assert half.generate(prompt, params)[0].token_ids == reference.generate(prompt, params)[0].token_ids


@pytest.mark.parametrize("kernels", ["auto", "exact"])
def test_the_stack_equals_the_16_bit_module_path_bit_for_bit(tiny_folder, kernels):
    from leanlm import LLM
    from leanlm.cache.paged_kv import PagedKVCache
    from leanlm.engine.paged_attention import SequenceSlice, build_paged_attention

    model = LLM(str(tiny_folder), dtype="bfloat16", threads=2, kernels=kernels).model
    assert model.decoder_stack is not None
    c = model.config
    outputs = {}
    saved = model.decoder_stack
    for use_stack in (True, False):
        model.decoder_stack = saved if use_stack else None
        cache = PagedKVCache(c.num_layers, 8, 16, c.num_kv_heads, c.head_dim, torch.float32)
        logits, start = [], 0
        with torch.inference_mode():
            for size in (21, 1, 1, 5):  # a prefill, two decode steps, a chunk over the cache
                sequence = SequenceSlice(start, size, [2, 3, 4], contiguous=True)
                attend = build_paged_attention(cache, model.attention, [sequence])
                chunk = torch.arange(start, start + size)[None]
                logits.append(model(chunk + 7, chunk, attend=attend))
                start += size
        outputs[use_stack] = logits
    model.decoder_stack = saved
    for a, b in zip(outputs[True], outputs[False], strict=True):
        assert torch.equal(a, b)


def test_requests_alone_match_the_same_requests_batched(tiny_folder):
    from leanlm.sampling_params import SamplingParams

    engine = llm(tiny_folder, "bfloat16")
    prompts = [" ".join(f"w{(7 * i + j) % 256}" for j in range(3 + 5 * i)) for i in range(6)]
    params = SamplingParams(**GREEDY)
    alone = [engine.generate(p, params)[0].token_ids for p in prompts]
    assert [out.token_ids for out in engine.generate(prompts, params)] == alone


def test_quantizing_a_16_bit_model_leaves_the_16_bit_path(tiny_folder):
    """compress/ sees plain nn.Linear layers; once quantized, the model is back on float32 dense tensors."""
    from leanlm.compress.config import QuantConfig
    from leanlm.compress.quantize import quantize

    engine = llm(tiny_folder, "bfloat16")
    quantize(engine, QuantConfig("int8"))
    assert not engine.plan.half_weights
    assert not any(isinstance(m, HalfLinear | HalfEmbedding) for m in engine.model.modules())
    assert any(isinstance(m, QuantizedLinear) for m in engine.model.modules())
    assert engine.model.embed_tokens.weight.dtype == torch.float32
    assert len(engine.generate("w1 w2", None)[0].token_ids) > 0
