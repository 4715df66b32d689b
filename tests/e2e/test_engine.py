"""LLMEngine on the real default model: batching, chunked prefill, prefix caching and preemption are lossless
(greedy tokens identical to each request run alone), aborts free their blocks, logprobs, validation.

float32, so that "identical" tests the engine and not bfloat16 rounding in matmuls of different shapes.
"""

import json
import re

import pytest

from leanlm import LLM, SamplingParams
from leanlm.config import EngineConfig
from leanlm.engine.engine import LLMEngine
from leanlm.errors import InvalidRequestError, PromptTooLongError

pytestmark = pytest.mark.slow

TEXT = (
    "The history of the Roman Empire spans many centuries, from the founding of the city to the fall of "
    "Constantinople. Its roads, laws and languages shaped Europe. Meanwhile, in the kitchen, a good soup "
    "starts with onions, carrots and celery cooked slowly in butter. 1, 2, 3, 4, 5, 6, 7, 8, 9, 10. "
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n"
)
GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(default_gguf_path):
    return LLM(default_gguf_path, dtype="float32")


@pytest.fixture(scope="module")
def prompts(llm):
    """32 prompts of 2 to 71 tokens, cut from different places of one text."""
    ids = llm.tokenizer.encode(TEXT)
    return [ids[(7 * i) % 40 : (7 * i) % 40 + 2 + (13 * i) % 70] for i in range(32)]


def params_for(i):
    # Two seeded sampling requests: their own generators make them reproducible in any batch.
    return SamplingParams(max_tokens=8, temperature=0.8, seed=i, ignore_eos=True) if i in (5, 17) else GREEDY


def new_engine(llm, **config):
    return LLMEngine(llm.model, llm.tokenizer, EngineConfig(**config))


def run(engine, prompts, params=None):
    """Add every prompt (params: one per prompt), step until all finish; token ids per prompt, in order."""
    for i, ids in enumerate(prompts):
        engine.add_request(f"r{i}", ids, params[i] if params else params_for(i))
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.token_ids
    return [done[f"r{i}"] for i in range(len(prompts))]


@pytest.fixture(scope="module")
def solo(llm, prompts):
    engine = new_engine(llm, enable_prefix_caching=False)
    return [run(engine, [ids], [params_for(i)])[0] for i, ids in enumerate(prompts)]


def test_batch_of_32_mixed_requests_matches_each_alone(llm, prompts, solo):
    engine = new_engine(llm)
    assert run(engine, prompts) == solo
    stats = engine.stats()
    assert stats.kv_blocks_used == 0 and stats.num_running == stats.num_waiting == 0
    assert stats.total_generated_tokens == 32 * 8


def test_chunked_prefill_matches(llm, prompts, solo):
    engine = new_engine(llm, max_num_batched_tokens=9)  # a 71-token prompt runs in 8 chunks
    picked = [2, 5, 9, 11, 16, 27]
    assert max(len(prompts[i]) for i in picked) > 60
    assert run(engine, [prompts[i] for i in picked], [params_for(i) for i in picked]) == [solo[i] for i in picked]


def test_short_requests_arriving_during_a_long_prefill_move_and_match(llm, prompts, solo):
    """The scheduler cuts a running prefill to a quarter of the budget while others wait: lossless, and a short
    request gets its first token long before the long prompt has been read."""
    long_ids = (llm.tokenizer.encode(TEXT) * 3)[:300]
    long_solo = run(new_engine(llm, enable_prefix_caching=False), [long_ids], [GREEDY])[0]
    engine = new_engine(llm, max_num_batched_tokens=64, enable_prefix_caching=False)
    engine.add_request("long", long_ids, GREEDY)
    engine.step()
    picked = [2, 5, 9]
    for i in picked:
        engine.add_request(f"r{i}", prompts[i], params_for(i))
    done, first_token_step, step = {}, {}, 1
    while engine.has_unfinished_requests():
        step += 1
        for out in engine.step():
            first_token_step.setdefault(out.request_id, step) if out.token_ids else None
            if out.finished:
                done[out.request_id] = out.token_ids
    assert done["long"] == long_solo
    assert [done[f"r{i}"] for i in picked] == [solo[i] for i in picked]
    assert max(first_token_step[f"r{i}"] for i in picked) < first_token_step["long"]


def test_constrained_and_free_requests_in_one_batch_get_their_solo_tokens(llm, prompts):
    """Structured-output masks are applied row by row: each request's tokens equal its run alone."""
    number = {"type": "integer", "minimum": 0, "maximum": 99}
    schema = {"type": "object", "properties": {"n": number}, "required": ["n"], "additionalProperties": False}
    params = [
        SamplingParams(max_tokens=16, temperature=0, json_schema=schema),
        GREEDY,
        SamplingParams(max_tokens=16, temperature=0.8, seed=4, regex=r"[a-z]{1,6} [0-9]{1,3}"),
        SamplingParams(max_tokens=8, temperature=0.8, seed=5, ignore_eos=True),
        SamplingParams(max_tokens=6, temperature=0, grammar='start: "yes" | "no"'),
    ]
    picked = [prompts[i] for i in (3, 7, 11, 19, 23)]
    alone = [run(new_engine(llm), [ids], [p])[0] for ids, p in zip(picked, params, strict=True)]
    together = run(new_engine(llm), picked, params)
    assert together == alone
    text = [llm.tokenizer.decode(ids) for ids in together]
    assert isinstance(json.loads(text[0])["n"], int)
    assert re.fullmatch(r"[a-z]{1,6} [0-9]{1,3}", text[2]) and text[4] in ("yes", "no")


def test_prefix_cache_hits_match(llm):
    ids = llm.tokenizer.encode(TEXT)
    shared = [ids[:length] for length in (45, 30, 38, 21, 45)]  # the last one is a repeat of the first
    alone = [run(new_engine(llm, enable_prefix_caching=False), [p])[0] for p in shared]
    engine = new_engine(llm, block_size=4)
    assert [run(engine, [p])[0] for p in shared] == alone
    stats = engine.stats()
    assert stats.prefix_cache_hits == 28 + 36 + 20 + 44, stats  # whole blocks, never a prompt's last token
    assert stats.kv_blocks_used == 0 and stats.kv_blocks_cached > 0


def test_preempted_and_resumed_requests_match(llm, prompts, solo):
    picked = [1, 3, 5, 8, 12, 14]
    # Every prompt fits at admission, but not the tokens they then generate.
    blocks = sum(-(-len(prompts[i]) // 4) for i in picked) + 1
    engine = new_engine(llm, block_size=4, num_kv_blocks=blocks)
    assert run(engine, [prompts[i] for i in picked], [params_for(i) for i in picked]) == [solo[i] for i in picked]
    assert engine.stats().num_preemptions > 0
    assert engine.stats().kv_blocks_used == 0


def test_abort_frees_blocks_and_reports_once(llm, prompts):
    engine = new_engine(llm, enable_prefix_caching=False)
    for i in range(3):
        engine.add_request(f"a{i}", prompts[i + 10], SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))
    engine.step()
    engine.step()
    used = engine.stats().kv_blocks_used
    engine.abort_request("a1")
    engine.abort_request("a1")  # twice, and unknown ids, are no-ops
    engine.abort_request("nope")
    assert engine.stats().kv_blocks_used < used
    aborted = [o for o in engine.step() if o.finish_reason == "abort"]
    assert [o.request_id for o in aborted] == ["a1"] and len(aborted[0].token_ids) == 2
    assert all(o.finish_reason is None for o in engine.step())
    engine.abort_request("a0")
    engine.abort_request("a2")
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.stats().kv_blocks_used == 0 and engine.stats().num_running == 0


def test_deltas_add_up_to_the_output_and_logprobs(llm):
    engine = new_engine(llm)
    engine.add_request("x", llm.tokenizer.encode("1, 2, 3,"), SamplingParams(max_tokens=6, temperature=0, logprobs=3))
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    final = outputs[-1]
    assert "".join(o.new_text for o in outputs) == final.text == " 4, 5,"
    assert [t for o in outputs for t in o.new_token_ids] == final.token_ids
    assert len(final.logprobs) == len(final.token_ids)
    for entry, token in zip(final.logprobs, final.token_ids, strict=True):
        assert entry.token_id == token and len(entry.top) == 3
        assert next(iter(entry.top)) == token  # greedy picks the most likely token
        assert entry.logprob == pytest.approx(entry.top[token]) and entry.logprob <= 0
    assert final.new_logprobs == final.logprobs[-1:]


def test_requests_are_validated_when_added(llm):
    engine = new_engine(llm, num_kv_blocks=4, block_size=4)
    engine.add_request("same", [1, 2, 3], GREEDY)
    with pytest.raises(InvalidRequestError, match="already running"):
        engine.add_request("same", [1, 2, 3], GREEDY)
    with pytest.raises(InvalidRequestError, match="empty"):
        engine.add_request("empty", [], GREEDY)
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        engine.add_request("vocab", [1, 10**9], GREEDY)
    with pytest.raises(PromptTooLongError, match="KV cache holds 16 tokens.*--kv-cache-memory"):
        engine.add_request("long", list(range(16)), GREEDY)
    engine.add_request("capped", list(range(1, 14)), SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id == "capped" and out.finished:
                assert (len(out.token_ids), out.finish_reason) == (3, "length")  # the cache caps generation


def test_int8_paged_cache_keeps_greedy_tokens(llm, prompts, solo):
    engine = LLMEngine(llm.model, llm.tokenizer, EngineConfig(), kv_cache="int8")
    picked = [0, 3, 7]
    got = run(engine, [prompts[i] for i in picked], [GREEDY] * 3)
    agree = sum(a == b for i, out in zip(picked, got, strict=True) for a, b in zip(out, solo[i], strict=True))
    assert agree >= 0.8 * 3 * 8, (got, [solo[i] for i in picked])
