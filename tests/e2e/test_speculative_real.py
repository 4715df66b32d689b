"""Speculative decoding on the real default model (float32, so that "identical" tests the engine and not bfloat16
rounding in matmuls of different shapes): greedy tokens equal plain decoding with prompt lookup and the layer-skip
self-draft, in a batch, and prompt lookup accepts most drafts on a code edit."""

import pytest

from leanlm import LLM, SamplingParams
from leanlm.config import EngineConfig
from leanlm.engine.engine import LLMEngine

pytestmark = pytest.mark.slow

CODE = '''def total(items):
    result = 0
    for item in items:
        if item.price > 0:
            result = result + item.price * item.quantity
    return result
'''
REQUESTS = [
    [{"role": "user", "content": "Rewrite this function with type hints, keeping its logic.\n\n" + CODE}],
    [{"role": "user", "content": "Name three rivers of Europe."}],
]


@pytest.fixture(scope="module")
def llm(default_gguf_path):
    return LLM(default_gguf_path, dtype="float32", threads=2)


def test_greedy_tokens_equal_plain_decoding_in_a_batch(llm):
    params = SamplingParams(max_tokens=48, temperature=0)
    plain = [out.token_ids for out in llm.chat(REQUESTS, params)]
    for method in ("ngram", "self"):
        llm.engine = LLMEngine(llm.model, llm.tokenizer, EngineConfig(speculative=method, speculative_adaptive=False))
        outs = llm.chat(REQUESTS, params)
        assert [out.token_ids for out in outs] == plain, method
        assert sum(out.metrics.num_draft_tokens for out in outs) > 0
        if method == "ngram":  # the rewrite copies much of the function: accepted drafts give a third of its tokens
            # (not a share of the drafts: after a long match the drafter drafts up to 10 tokens, tail rows and all)
            m = outs[0].metrics
            assert (
                m.num_accepted_tokens >= m.num_generated_tokens / 3
                and m.num_accepted_tokens >= 0.3 * m.num_draft_tokens
            )
