"""The one-call decoder stack (kernels/csrc/decoder_stack.cpp) against the module path, on the default model at its
native 4-bit precision: it claims to be lossless, so logits, cache contents and greedy tokens must be identical
bit for bit, for a prefill, decode steps and a chunk continuing a cache, with int8 and with float activations;
and a request alone (the stack) must give the same tokens as in a batch (the module path).
"""

from __future__ import annotations

import pytest
import torch

from leanlm.cache.paged_kv import PagedKVCache
from leanlm.config import EngineConfig
from leanlm.engine.engine import LLMEngine
from leanlm.engine.paged_attention import SequenceSlice, build_paged_attention
from leanlm.formats.loader import load_checkpoint
from leanlm.kernels.build import load_kernels
from leanlm.models.registry import build_model
from leanlm.sampling_params import SamplingParams

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not load_kernels(), reason="leanlm kernels unavailable (no compiler or AVX2)"),
]


@pytest.fixture(scope="module")
def checkpoint(default_gguf_path):
    return load_checkpoint(default_gguf_path, torch.float32, native_quant=True)


def new_cache(model, num_blocks=8, block_size=16):
    c = model.config
    return PagedKVCache(c.num_layers, num_blocks, block_size, c.num_kv_heads, c.head_dim, torch.float32)


@torch.inference_mode()
def run_chunks(model, cache, ids, chunks, stack):
    """Feed ids in chunks of the given sizes through one sequence in blocks 2..; logits of every chunk."""
    saved, model.decoder_stack = model.decoder_stack, (model.decoder_stack if stack else None)
    try:
        logits, start = [], 0
        for size in chunks:
            sequence = SequenceSlice(start, size, list(range(2, 8)), contiguous=True)
            attend = build_paged_attention(cache, model.attention, [sequence])
            assert hasattr(attend, "slab")  # a single contiguous sequence: the case the stack takes
            chunk = torch.tensor([ids[start : start + size]])
            logits.append(model(chunk, torch.arange(start, start + size)[None], attend=attend))
            start += size
        return logits
    finally:
        model.decoder_stack = saved


@pytest.mark.parametrize("mode", ["auto", "exact"])
def test_stack_equals_the_module_path_bit_for_bit(checkpoint, mode):
    model = build_model(checkpoint.config, checkpoint.weights, torch.float32, "cpu", mode)
    assert model.decoder_stack is not None
    ids = checkpoint.tokenizer.encode("The history of the Roman Empire spans many centuries, from the founding")
    chunks = [len(ids) - 9, 1, 1, 1, 6]  # a prefill, three decode steps, a chunk over the cache
    with_stack, without = new_cache(model), new_cache(model)
    fast = run_chunks(model, with_stack, ids, chunks, stack=True)
    plain = run_chunks(model, without, ids, chunks, stack=False)
    for a, b in zip(fast, plain, strict=True):
        assert torch.equal(a, b)
    used = slice(2 * 16, 2 * 16 + len(ids))
    assert torch.equal(with_stack.keys[:, :, used], without.keys[:, :, used])
    assert torch.equal(with_stack.values[:, :, used], without.values[:, :, used])


def test_requests_alone_match_the_same_requests_batched(checkpoint):
    model = build_model(checkpoint.config, checkpoint.weights, torch.float32, "cpu", "auto")
    ids = checkpoint.tokenizer.encode("def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1)")
    prompts = [ids[i : i + 3 + 4 * i] for i in range(8)]
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)

    def run(batch):
        engine = LLMEngine(model, checkpoint.tokenizer, EngineConfig(enable_prefix_caching=False, num_kv_blocks=64))
        for i, prompt in enumerate(batch):
            engine.add_request(str(i), prompt, greedy)
        done = {}
        while engine.has_unfinished_requests():
            done.update({out.request_id: out.token_ids for out in engine.step() if out.finished})
        return [done[str(i)] for i in range(len(batch))]

    alone = [run([prompt])[0] for prompt in prompts]
    assert run(prompts) == alone


def test_models_the_stack_cannot_run_keep_the_module_path(checkpoint, default_gguf_path):
    assert build_model(checkpoint.config, checkpoint.weights, torch.float32, "cpu", "torch").decoder_stack is None
    dense = load_checkpoint(default_gguf_path, torch.float32)  # dequantized: no leanlm kernels to run
    assert build_model(dense.config, dense.weights, torch.float32, "cpu", "auto").decoder_stack is None
