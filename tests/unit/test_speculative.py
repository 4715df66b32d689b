"""Speculative decoding on tiny random models: lossless greedy outputs with every drafter, alone and in batches;
rejection sampling keeps the target distribution (chi-square); KV rollback keeps the cache and the prefix-cache
names consistent over random accept/reject sequences; the tuner switches speculation off when it does not pay."""

from __future__ import annotations

import random

import pytest
import torch

from leanlm.cache.block_manager import chain_hash
from leanlm.cache.kv_cache import KVCache
from leanlm.config import EngineConfig, ModelConfig
from leanlm.engine.engine import LLMEngine
from leanlm.engine.speculative.ngram import NgramDrafter
from leanlm.engine.speculative.speculator import Speculator
from leanlm.engine.speculative.tuner import LAST_PROBE, DraftTuner
from leanlm.errors import InvalidRequestError
from leanlm.models.llama import LlamaForCausalLM
from leanlm.sampling.speculative import accept_greedy, accept_sampled, target_probabilities
from leanlm.sampling_params import SamplingParams

VOCAB = 64
GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)


class ByteTokenizer:
    """Token i is one letter: enough for the engine's detokenizer and stop strings."""

    eos_token_ids = frozenset({VOCAB - 1})

    @property
    def backend(self):
        return self

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("0") + i % 75) for i in ids)

    def encode(self, text):
        return [ord(c) % VOCAB for c in text]


def tiny_model(num_layers: int = 4, seed: int = 0) -> LlamaForCausalLM:
    config = ModelConfig("llama", VOCAB, 64, 128, num_layers, 4, 2, 16, 512)
    model = LlamaForCausalLM(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 2.0, generator=g)
            elif "embed" in name:
                param.normal_(0, 1.0, generator=g)
            else:  # 3x nn.Linear's range: peaked distributions, so greedy argmaxes are far from ties
                bound = 3 * param.shape[1] ** -0.5
                param.uniform_(-bound, bound, generator=g)
    return model


@pytest.fixture(scope="module")
def model():
    return tiny_model()


PROMPTS = [[(5 * i + j) % 50 for j in range(12)] * 3 for i in range(4)]  # repetitive: prompt lookup finds drafts


def engine_for(model, speculative=None, adaptive=False, draft_model=None, **config):
    config = EngineConfig(
        **{"num_kv_blocks": 128, "block_size": 4} | config,
        speculative=speculative,
        speculative_adaptive=adaptive,
    )
    return LLMEngine(model, ByteTokenizer(), config, draft_model=draft_model)


def run(engine, prompts, params=GREEDY):
    for i, ids in enumerate(prompts):
        engine.add_request(f"r{i}", ids, params if isinstance(params, SamplingParams) else params[i])
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return [done[f"r{i}"] for i in range(len(prompts))]


@pytest.fixture(scope="module")
def plain(model):
    return [out.token_ids for out in run(engine_for(model), PROMPTS)]


@pytest.mark.parametrize(
    ("method", "adaptive"),
    [("ngram", False), ("ngram", True), ("self:2", False), ("draft:other", False), ("draft:same", True)],
)
def test_greedy_tokens_equal_plain_decoding_alone_and_batched(model, plain, method, adaptive):
    draft = {"draft:other": tiny_model(2, seed=1), "draft:same": model}.get(method)
    batched = engine_for(model, method, adaptive, draft)
    assert [out.token_ids for out in run(batched, PROMPTS)] == plain
    stats = batched.stats()
    assert stats.kv_blocks_used == 0 and stats.num_running == 0
    if not adaptive:
        assert stats.speculative.num_draft_tokens > 0
    if method == "draft:same":  # the target drafting for itself: every draft is accepted
        assert stats.speculative.num_accepted_tokens == stats.speculative.num_draft_tokens > 0
    alone = engine_for(model, method, adaptive, draft)
    assert run(alone, PROMPTS[:1])[0].token_ids == plain[0]


def test_limits_hold_in_the_middle_of_accepted_drafts(model):
    """max_tokens, a stop token and a stop string that fall among accepted drafts end the request right there."""
    reference = run(engine_for(model), PROMPTS[:1])[0]
    text, tokens = reference.text, reference.token_ids
    cases = [
        SamplingParams(max_tokens=7, temperature=0, ignore_eos=True),
        SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop_token_ids=(tokens[9],)),
        SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=(text[10:12],)),
    ]
    for params in cases:
        expected = run(engine_for(model), PROMPTS[:1], params)[0]
        got = run(engine_for(model, "draft:same", draft_model=model), PROMPTS[:1], params)[0]
        assert (got.token_ids, got.text, got.finish_reason) == (
            expected.token_ids,
            expected.text,
            expected.finish_reason,
        )
        assert got.metrics.num_accepted_tokens > 0


def test_speculating_and_plain_requests_share_steps(model, plain):
    """Sampled requests with a repetition penalty cannot speculate; they batch with greedy ones that do."""
    penalized = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, repetition_penalty=1.3)
    params = [GREEDY, penalized, GREEDY, penalized]
    expected = [out.token_ids for out in run(engine_for(model), PROMPTS, params)]
    engine = engine_for(model, "draft:same", draft_model=model)
    outs = run(engine, PROMPTS, params)
    assert [out.token_ids for out in outs] == expected
    assert outs[0].metrics.num_draft_tokens > 0 and outs[1].metrics.num_draft_tokens == 0


def test_sampled_requests_with_a_seed_are_reproducible(model):
    params = SamplingParams(max_tokens=24, temperature=0.8, seed=3, ignore_eos=True)
    first = run(engine_for(model, "ngram"), PROMPTS, params)
    second = run(engine_for(model, "ngram"), PROMPTS[:2], params)
    assert [o.token_ids for o in first[:2]] == [o.token_ids for o in second]


# ---- verification ----------------------------------------------------------------------------------------------


def test_greedy_acceptance_stops_at_the_first_disagreement():
    assert accept_greedy([4, 5, 6], [4, 5, 9, 1]) == [4, 5, 9]
    assert accept_greedy([4, 5, 6], [4, 5, 6, 1]) == [4, 5, 6, 1]
    assert accept_greedy([4], [2, 8]) == [2]


CHI2_CRITICAL_5_DOF_0_001 = 20.515  # chi-square quantile: P(X > 20.515) = 0.001 for 5 degrees of freedom


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    keep = expected > 0
    assert counts[~keep].sum() == 0  # nothing drawn where the target has no mass
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


@pytest.mark.parametrize(
    ("params", "with_draft_distribution"),
    [(SamplingParams(temperature=0.7, top_k=4, top_p=0.9), False), (SamplingParams(temperature=1.0), True)],
)
def test_rejection_sampling_keeps_the_target_distribution(params, with_draft_distribution):
    """Every emitted position follows the target: the first token (draft accepted or replaced) and the second
    (the next draft's, or the bonus after an accepted one). Chi-square at significance 0.001, fixed seed."""
    vocab, draws = 6, 2000
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, vocab, generator=g) * 1.5
    q = torch.softmax(torch.randn(2, vocab, generator=g), -1)  # a draft distribution unlike the target
    target = target_probabilities(logits, params)
    first, second = torch.zeros(vocab), torch.zeros(vocab)
    gen = torch.Generator().manual_seed(1)
    for _ in range(draws):
        if with_draft_distribution:
            drafts = [int(torch.multinomial(q[i], 1, generator=gen)) for i in range(2)]
            out = accept_sampled(drafts, logits, params, gen, q)
        else:
            drafts = [int(torch.argmax(q[0])), int(torch.argmax(q[1]))]  # a fixed guess: a point mass
            out = accept_sampled(drafts, logits, params, gen)
        first[out[0]] += 1
        if out[0] == drafts[0]:  # the second position is conditioned on the first draft being kept
            second[out[1]] += 1
    dof_critical = CHI2_CRITICAL_5_DOF_0_001  # 6 categories; fewer with top-k, which only lowers the statistic's dof
    assert chi_square(first, target[0]) < dof_critical
    assert chi_square(second, target[1]) < dof_critical


def test_target_probabilities_match_the_batch_samplers_filters():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    probs = target_probabilities(logits, SamplingParams(temperature=1.0, top_k=2))[0]
    expected = torch.softmax(torch.tensor([3.0, 2.0]), -1)
    torch.testing.assert_close(probs[:2], expected)
    assert probs[2:].sum() == 0


# ---- KV rollback -----------------------------------------------------------------------------------------------


class CorruptingDrafter:
    """Proposes the target's true continuation with a random token replaced at a random place (or none)."""

    name = "test"

    def __init__(self, truth: list[int], prompt_len: int, rng: random.Random):
        self.truth, self.prompt_len, self.rng = truth, prompt_len, rng

    def propose(self, requests, lengths):
        drafts = {}
        for request, length in zip(requests, lengths, strict=True):
            at = len(request.output_token_ids)
            k = self.rng.randint(0, length)
            draft = list(self.truth[at : at + k])
            if draft and self.rng.random() < 0.6:
                draft[self.rng.randrange(len(draft))] = self.rng.randrange(VOCAB)
            drafts[request.request_id] = draft
        return drafts

    def remove(self, request_id):
        pass


def test_kv_rollback_keeps_cache_and_prefix_hashes_consistent(model):
    """Random accept/reject sequences (seeded loop over 4 runs): after every step, the computed positions' keys and
    values equal a plain forward pass over the same tokens, the table's chain hashes name exactly its full computed
    blocks, named blocks hold their tokens, and no block is held beyond the request's tokens."""
    prompt = PROMPTS[1][:14]
    truth = run(engine_for(model), [prompt], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))[0]
    for seed in range(4):
        rng = random.Random(seed)
        engine = engine_for(model, "ngram", block_size=4)
        engine.speculator = Speculator(CorruptingDrafter(truth.token_ids, len(prompt), rng), 6, adaptive=False)
        engine.add_request("r", prompt, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
        manager = engine.block_manager
        while engine.has_unfinished_requests():
            outs = engine.step()
            if outs and outs[0].finished:
                assert outs[0].token_ids == truth.token_ids
                break
            request = engine.scheduler.running[0]
            table, size = manager.tables["r"], manager.block_size
            tokens, computed = request.all_token_ids, request.num_computed_tokens
            assert computed == request.num_tokens - 1 or request.num_computed_tokens < len(prompt)
            assert manager.blocks_needed(computed) <= len(table.ids) <= manager.blocks_needed(request.num_tokens)
            hashes, parent = [], None
            for i in range(computed // size):
                parent = chain_hash(parent, tuple(tokens[i * size : (i + 1) * size]))
                hashes.append(parent)
            assert table.hashes == hashes
            for block_id in table.ids:
                block = manager.blocks[block_id]
                if block.hash is not None:
                    assert manager._cached.get(block.hash) == block_id
                    i = table.ids.index(block_id)
                    assert block.token_ids == tuple(tokens[i * size : (i + 1) * size])
            assert_cache_matches_plain_forward(engine, model, table, tokens[:computed])
        assert manager.num_used_blocks == 0


def assert_cache_matches_plain_forward(engine, model, table, tokens):
    config = model.config
    reference = KVCache(config.num_layers, 1, config.num_kv_heads, len(tokens), config.head_dim, torch.float32)
    with torch.inference_mode():
        model(
            torch.tensor([tokens]),
            torch.arange(len(tokens))[None],
            attend=reference.attention(0, model.attention),
        )
    size = engine.cache.block_size
    slots = torch.tensor([table.ids[p // size] * size + p % size for p in range(len(tokens))])
    keys = engine.cache.keys[:, :, slots]  # (L, H_kv, S, D)
    torch.testing.assert_close(keys, reference.keys[:, 0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(engine.cache.values[:, :, slots], reference.values[:, 0], atol=1e-4, rtol=1e-4)


# ---- scheduling and self-tuning --------------------------------------------------------------------------------


def test_drafts_that_do_not_fit_are_dropped_and_never_preempt(model):
    engine = engine_for(model, "draft:same", draft_model=model, max_num_batched_tokens=40)
    engine.add_request("r", PROMPTS[0], GREEDY)  # 36 tokens: 9 full blocks of 4
    engine.step()  # the prefill
    request = engine.scheduler.running[0]
    manager = engine.block_manager
    engine.speculator.propose(engine.scheduler.running)
    assert len(request.draft_token_ids) == 5
    taken = [manager._take_free_block() for _ in range(manager.num_free_blocks - 1)]  # one block left
    schedule = engine.scheduler.schedule()  # the newest token fits in it, its drafts do not
    assert schedule.scheduled[0].num_draft_tokens == 0 and request.draft_token_ids == []
    assert not schedule.preempted and len(taken) > 0


def test_drafts_are_cut_to_the_token_budget(model):
    engine = engine_for(model, "draft:same", draft_model=model, max_num_batched_tokens=3)
    engine.add_request("r", PROMPTS[0][:2], GREEDY)
    engine.step()
    engine.speculator.propose(engine.scheduler.running)
    schedule = engine.scheduler.schedule()
    assert schedule.scheduled[0].num_tokens == 3 and schedule.scheduled[0].num_draft_tokens == 2


def test_tuner_switches_off_without_acceptance_and_probes_rarely():
    tuner = DraftTuner(max_tokens=5)
    costs = {k: 1.0 + 0.2 * k for k in range(6)}  # a step costs more with each extra row

    def step_cost(k):
        return costs[k]

    assert tuner.choose(step_cost, 0.0) > 0  # optimistic at first
    for _ in range(5):
        tuner.record(5, 0)
    choices = [tuner.choose(step_cost, 0.0) for _ in range(2 * LAST_PROBE)]
    assert not tuner.enabled
    assert 0 < sum(1 for k in choices if k) <= 8  # probes only, backing off
    for _ in range(10):
        tuner.record(5, 5)
    assert tuner.choose(step_cost, 0.0) == 5  # repetitive text again: on, at full length


def test_self_tuning_switches_off_on_text_without_repetition(model):
    """Sampled text from a random model hardly repeats: 1-gram lookups propose tokens that are rarely accepted.
    With self-tuning, a small share of the steps verifies drafts; without it, most of them do."""
    params = SamplingParams(max_tokens=80, temperature=1.0, seed=0, ignore_eos=True)
    prompt = list(range(40))  # no repetition in the prompt either
    shares = {}
    for adaptive in (False, True):
        engine = engine_for(model, "ngram", adaptive)
        engine.speculator = Speculator(NgramDrafter(min_ngram=1), 5, adaptive=adaptive)
        out = run(engine, [prompt], params)[0]
        stats = engine.stats().speculative
        shares[adaptive] = stats.num_verify_steps / len(out.token_ids)
        assert stats.acceptance_rate < 0.3
    assert shares[False] > 0.5
    assert shares[True] < 0.2


def test_bad_speculative_settings_are_refused_with_a_message(model):
    for bad in ("magic", "self:x", "draft:", "ngram:3"):
        with pytest.raises(InvalidRequestError, match="ngram, self"):
            EngineConfig(speculative=bad)
    with pytest.raises(InvalidRequestError, match="num_speculative_tokens"):
        EngineConfig(speculative="ngram", num_speculative_tokens=0)
    with pytest.raises(InvalidRequestError, match="layers"):
        engine_for(model, "self:4")


def test_metrics_and_usage_report_acceptance(model):
    from leanlm.server.metrics import ServerMetrics

    engine = engine_for(model, "draft:same", draft_model=model)
    out = run(engine, PROMPTS[:1])[0]
    assert out.metrics.num_accepted_tokens == out.metrics.num_draft_tokens > 0
    text = ServerMetrics().render(engine.stats(), in_flight=0)
    drafted = engine.stats().speculative.num_draft_tokens
    assert f"leanlm_spec_decode_draft_tokens_total {drafted}" in text
    assert "leanlm_spec_decode_acceptance_rate 1.0" in text


# ---- prompt lookup draft lengths and costly drafters -----------------------------------------------------------


class Tokens:
    """A request as the drafter sees it."""

    def __init__(self, request_id, tokens):
        self.request_id, self.all_token_ids = request_id, tokens


def test_prompt_lookup_drafts_more_after_a_longer_match():
    """A match of n tokens drafts up to n + 2 of what followed it; the longest matching n-gram (<= 8) wins."""
    drafter = NgramDrafter()
    copied = list(range(10, 30))  # 20 tokens copied once already: the copy in progress matches 8 tokens and more
    long_match = copied + [99] + copied[:8]
    short_match = [1, 2, 3, 4, 5, 6, 7, 8, 50, 51, 9, 9, 50, 51]  # only the 2-gram (50, 51) occurred before
    drafts = drafter.propose([Tokens("a", long_match), Tokens("b", short_match)], [10, 10])
    assert drafts == {"a": copied[8:18], "b": [9, 9, 50, 51]}
    assert drafter.propose([Tokens("a", long_match)], [3]) == {"a": copied[8:11]}  # the cap still holds
    assert drafter.propose([Tokens("c", [1, 2, 3, 4])], [10]) == {}  # nothing repeats: no draft


def test_default_draft_cap_depends_on_the_method(model):
    assert engine_for(model, "ngram").speculator.max_draft_tokens == 10
    assert engine_for(model, "self:2").speculator.max_draft_tokens == 5
    assert engine_for(model, "ngram", num_speculative_tokens=3).speculator.max_draft_tokens == 3


def test_a_drafter_of_unknown_cost_starts_with_one_token_and_a_costly_one_probes_rarely():
    """A model drafter's cost per token is unknown until it ran: one token first. Switched off, a drafter costing
    half a step per token probes so rarely that probes stay within about 2% of the decoding time."""
    costs = {k: 1.0 + 0.2 * k for k in range(6)}
    assert DraftTuner(max_tokens=5).choose(costs.get, None) == 1
    assert DraftTuner(max_tokens=5).choose(costs.get, 0.0) > 1  # prompt lookup: free, full length at first
    for draft_cost, most_probes in ((0.5, 4), (0.0, 8)):
        tuner = DraftTuner(max_tokens=5)
        for _ in range(5):
            tuner.record(5, 0)
        choices = [tuner.choose(costs.get, draft_cost) for _ in range(256)]
        probes = sum(1 for k in choices if k)
        cost = probes * (0.2 + draft_cost)  # each probe: one verify row and one drafted token
        assert 0 < probes <= most_probes and cost / 256 <= 0.02 + 1e-9
