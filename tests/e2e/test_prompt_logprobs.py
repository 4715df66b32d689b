"""Prompt log-probabilities (SamplingParams.prompt_logprobs, what loglikelihood scoring needs): each prompt token's
log-probability given the ones before it, equal to a plain forward pass over the whole prompt, whether the prompt
runs in one step or in chunks, alone or batched, and whether or not its prefix sits in the prefix cache."""

import pytest
import torch

from leanlm import LLM, SamplingParams
from leanlm.config import EngineConfig
from leanlm.errors import InvalidRequestError

pytestmark = pytest.mark.slow

TEXTS = [
    "The quick brown fox jumps over the lazy dog. " * 6 + "Then it sleeps.",
    "Paris is the capital of France, and Berlin is the capital of",
]
TOLERANCE = 2e-3  # nats: chunked prefill and batching change the reduction order of the fp32 kernels


@pytest.fixture(scope="module")
def llm(default_gguf_path):
    # a 32-token step budget cuts the first prompt into chunks
    return LLM(default_gguf_path, engine_config=EngineConfig(max_num_batched_tokens=32, max_num_seqs=4))


def reference(llm, ids: list[int]) -> torch.Tensor:
    """log p(token i | tokens < i) for i >= 1, from one forward pass of the whole prompt with its own attention."""
    with torch.inference_mode():
        logits = llm.model(torch.tensor([ids]), torch.arange(len(ids))[None], last_only=False)[0].float()
    logprobs = logits.log_softmax(-1)
    return logprobs[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]


def test_prompt_logprobs_equal_a_plain_forward_pass_chunked_and_batched(llm):
    params = SamplingParams(max_tokens=0, prompt_logprobs=2, temperature=0)
    llm.generate(TEXTS[0], SamplingParams(max_tokens=1, temperature=0))  # fills the prefix cache with its blocks
    outputs = llm.generate(TEXTS, params)
    for text, out in zip(TEXTS, outputs, strict=True):
        ids = llm.encode(text)
        assert out.token_ids == [] and out.finish_reason == "length"
        scores = out.prompt_logprobs
        assert len(scores) == len(ids) and scores[0] is None
        assert [s.token_id for s in scores[1:]] == ids[1:]
        got = torch.tensor([s.logprob for s in scores[1:]])
        assert torch.allclose(got, reference(llm, ids), atol=TOLERANCE, rtol=0)
        for s in scores[1:]:  # the top alternatives are the most likely tokens, best first
            values = list(s.top.values())
            assert len(values) == 2 and values[0] >= values[1] and values[0] >= s.logprob - 1e-6


def test_prompt_logprobs_with_generation_keep_the_greedy_tokens(llm):
    plain = llm.generate(TEXTS[1], SamplingParams(max_tokens=6, temperature=0))[0]
    scored = llm.generate(TEXTS[1], SamplingParams(max_tokens=6, temperature=0, prompt_logprobs=0))[0]
    assert scored.token_ids == plain.token_ids
    assert len(scored.prompt_logprobs) == len(scored.prompt_token_ids)
    assert all(s.top == {} for s in scored.prompt_logprobs[1:])


def test_max_tokens_zero_needs_prompt_logprobs():
    with pytest.raises(InvalidRequestError, match="max_tokens must be an integer >= 1.*prompt_logprobs"):
        SamplingParams(max_tokens=0)
    with pytest.raises(InvalidRequestError, match="prompt_logprobs must be an integer in 0..20"):
        SamplingParams(prompt_logprobs=21)
