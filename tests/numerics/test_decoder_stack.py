"""The one-call decoder stack (kernels/csrc/decoder_stack.cpp) against the module path, on the default model at its
native 4-bit precision: it claims to be lossless, so logits, cache contents and greedy tokens must be identical
bit for bit: for one sequence (a prefill, decode steps, a chunk continuing a cache) with int8 and with float
activations; for steps that mix sequences in scattered blocks; and through the engine, alone or batched.
"""

from __future__ import annotations

import pytest
import torch

from leanlm.cache.paged_kv import PagedKVCache
from leanlm.config import EngineConfig
from leanlm.engine.engine import LLMEngine
from leanlm.engine.paged_attention import SequenceSlice, build_paged_attention
from leanlm.kernels.build import load_kernels
from leanlm.models.checkpoint import load_checkpoint
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
            assert hasattr(attend, "layout")
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


@torch.inference_mode()
def test_mixed_steps_over_scattered_blocks_equal_the_module_path(checkpoint):
    model = build_model(checkpoint.config, checkpoint.weights, torch.float32, "cpu", "auto")
    ids = checkpoint.tokenizer.encode("In 1905 Albert Einstein published four papers that changed physics: " * 2)
    a, b, c = [5, 1, 3], [2, 7, 4], [6, 0]  # block ids, deliberately out of order
    steps = [  # (block ids, start, number of tokens) per sequence; every step's rows in the model runner's order
        [(a, 0, 20), (b, 0, 33)],
        [(a, 20, 1), (b, 33, 1), (c, 0, 9)],
        [(a, 21, 1), (b, 34, 1), (c, 9, 12)],
    ]
    caches = {True: new_cache(model), False: new_cache(model)}
    saved = model.decoder_stack
    try:
        for step in steps:
            sequences = [SequenceSlice(start, n, blocks, contiguous=False) for blocks, start, n in step]
            tokens = torch.tensor([[ids[p % len(ids)] for _, start, n in step for p in range(start, start + n)]])
            positions = torch.tensor([[p for _, start, n in step for p in range(start, start + n)]])
            logits = {}
            for use_stack, cache in caches.items():
                model.decoder_stack = saved if use_stack else None
                attend = build_paged_attention(cache, model.attention, sequences)
                logits[use_stack] = model(tokens, positions, attend=attend)
            assert torch.equal(logits[True], logits[False])
        written = torch.tensor(
            [blocks[p // 16] * 16 + p % 16 for blocks, length in ((a, 22), (b, 35), (c, 21)) for p in range(length)]
        )
        for kind in ("keys", "values"):
            stored = [getattr(cache, kind)[:, :, written] for cache in caches.values()]
            assert torch.equal(*stored)
    finally:
        model.decoder_stack = saved


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
    saved, model.decoder_stack = model.decoder_stack, None
    try:
        assert run(prompts) == alone  # the module path
    finally:
        model.decoder_stack = saved


def test_models_the_stack_cannot_run_keep_the_module_path(checkpoint, default_gguf_path):
    assert build_model(checkpoint.config, checkpoint.weights, torch.float32, "cpu", "torch").decoder_stack is None
    dense = load_checkpoint(default_gguf_path, torch.float32)  # dequantized: no leanlm kernels to run
    assert build_model(dense.config, dense.weights, torch.float32, "cpu", "auto").decoder_stack is None


def test_bad_inputs_are_refused_with_a_message(checkpoint):
    model = build_model(checkpoint.config, checkpoint.weights, torch.float32, "cpu", "auto")
    c = model.config
    keys = torch.zeros(c.num_layers, c.num_kv_heads, 64, c.head_dim)
    x, cos = torch.zeros(1, c.hidden_size), torch.ones(1, c.head_dim)
    row, two_blocks = torch.zeros(1, dtype=torch.long), torch.tensor([[0, 1]])

    def forward(x=x, cos=cos, table=two_blocks, position=row):
        return model.decoder_stack.forward(x, cos, cos, keys, keys.clone(), table, 16, row, position)

    assert forward().shape == (1, c.hidden_size)
    with pytest.raises(RuntimeError, match="cos and sin"):
        forward(cos=torch.ones(2, c.head_dim))
    with pytest.raises(RuntimeError, match="features"):
        forward(x=torch.zeros(1, c.hidden_size + 1))
    with pytest.raises(RuntimeError, match="outside its block table"):
        forward(position=torch.tensor([32]))
    with pytest.raises(RuntimeError, match="outside the cache"):
        forward(table=torch.tensor([[0, 9]]), position=torch.tensor([20]))
