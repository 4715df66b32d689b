"""The batched sampler (sampling/batch.py) against the one-request reference (sampling/sampler.py): the same kept
tokens per filter, the same greedy tokens and logprobs, a token that does not depend on the rest of the batch,
and draws that follow the probabilities."""

import pytest
import torch

from leanlm.sampling import batch
from leanlm.sampling.batch import sample_batch
from leanlm.sampling.sampler import (
    Sampler,
    apply_repetition_penalty,
    min_p_filter,
    token_logprobs,
    top_k_filter,
    top_p_filter,
)
from leanlm.sampling.state import SamplingState, SeenTokens
from leanlm.sampling_params import SamplingParams

VOCAB = 1000


def random_logits(rows: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return scale * torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed))


def dropped(logits: torch.Tensor) -> list[list[bool]]:
    return torch.isinf(logits).tolist()


def reference_kept(logits: torch.Tensor, params: SamplingParams) -> list[int]:
    """The tokens sampler.py's chain of filters leaves finite."""
    kept = top_k_filter(logits / params.temperature, params.top_k)
    kept = min_p_filter(top_p_filter(kept, params.top_p), params.min_p)
    return torch.isfinite(kept).nonzero().flatten().tolist()


def batched_kept(logits: torch.Tensor, params: list[SamplingParams]) -> list[list[int]]:
    temperatures = torch.tensor([p.temperature for p in params])[:, None]
    kept: list[list[int]] = [[] for _ in params]
    for rows, ids, weights in batch.candidate_groups((logits / temperatures).softmax(-1), params):
        for j, r in enumerate(rows):
            positive = (weights[j] > 0).nonzero().flatten()
            kept[r] = sorted((positive if ids is None else ids[j][positive]).tolist())
    return kept


FILTERS = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7, top_k=1),
    SamplingParams(temperature=1.0, top_k=7),
    SamplingParams(temperature=1.0, top_k=40, top_p=0.8),
    SamplingParams(temperature=1.3, top_k=300),  # more than the candidates: looks further
    SamplingParams(temperature=1.3, top_k=300, top_p=0.9),
    SamplingParams(temperature=1.0, top_p=0.1),
    SamplingParams(temperature=1.0, top_p=0.5),
    SamplingParams(temperature=0.5, top_p=0.99),
    SamplingParams(temperature=1.0, min_p=0.05),
    SamplingParams(temperature=1.0, min_p=0.5),
    SamplingParams(temperature=1.0, top_k=50, top_p=0.9, min_p=0.1),
]


@pytest.mark.parametrize("scale", [0.05, 1.0, 6.0])  # 0.05: nearly flat, the kept sets go beyond the candidates
def test_kept_tokens_match_the_reference_filters(monkeypatch, scale):
    monkeypatch.setattr(batch, "CANDIDATES", 16)
    logits = random_logits(len(FILTERS), seed=1, scale=scale)
    expected = [reference_kept(row, p) for row, p in zip(logits, FILTERS, strict=True)]
    assert batched_kept(logits, FILTERS) == expected


def test_only_rows_that_need_it_look_beyond_the_candidates(monkeypatch):
    monkeypatch.setattr(batch, "CANDIDATES", 16)
    seen = []
    original = batch._filter_candidates
    monkeypatch.setattr(
        batch, "_filter_candidates", lambda probs, p, n: seen.append((len(p), n)) or original(probs, p, n)
    )
    logits = torch.cat([random_logits(2, seed=7, scale=8.0), random_logits(2, seed=8, scale=0.05)])
    batched_kept(logits, [SamplingParams(temperature=1.0, top_p=0.9)] * 4)
    assert seen == [(4, 16), (2, 128), (2, 1000)]  # the two flat rows grow their candidates to the whole vocabulary


def test_repetition_penalty_matches_reference_and_leaves_input_untouched():
    logits = random_logits(3, seed=4)
    before = logits.clone()
    prompts = [[1, 2, 3, 2], [5], [7, 8]]
    params = [SamplingParams(repetition_penalty=1.3), SamplingParams(), SamplingParams(repetition_penalty=0.7)]
    states = [SamplingState(p, ids) for p, ids in zip(params, prompts, strict=True)]
    states[0].append(9)  # an output token counts as seen too
    out = batch.penalize_rows(logits, states)
    assert torch.equal(logits, before)
    expected = [
        apply_repetition_penalty(logits[0], torch.tensor([1, 2, 3, 2, 9]), 1.3),
        logits[1],
        apply_repetition_penalty(logits[2], torch.tensor([7, 8]), 0.7),
    ]
    assert torch.equal(out, torch.stack(expected))


def test_greedy_rows_and_logprobs_match_the_reference():
    logits = random_logits(4, seed=5)
    params = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=0, logprobs=3),
        SamplingParams(temperature=0, repetition_penalty=1.2, logprobs=0),
        SamplingParams(temperature=0.7, seed=1, logprobs=2),
    ]
    prompts = [[1], [2], [int(logits[2].argmax()), 4], [3]]
    rows = sample_batch(logits, [SamplingState(p, ids) for p, ids in zip(params, prompts, strict=True)])
    penalized_2 = apply_repetition_penalty(logits[2], torch.tensor(prompts[2]), 1.2)
    assert rows[0] == (int(logits[0].argmax()), None, None)
    assert rows[1] == (int(logits[1].argmax()), *token_logprobs(logits[1], int(logits[1].argmax()), 3))
    assert rows[2] == (int(penalized_2.argmax()), *token_logprobs(penalized_2, int(penalized_2.argmax()), 0))
    token = rows[3][0]
    assert rows[3] == (token, *token_logprobs(logits[3], token, 2))


MIXED = [
    SamplingParams(temperature=0),
    SamplingParams(temperature=1.0, min_p=0.2, seed=15),
    SamplingParams(temperature=1.5, top_k=300, top_p=0.95, seed=16),
    SamplingParams(temperature=0.8, seed=11),
    SamplingParams(temperature=1.0, top_k=20, top_p=0.9, seed=12),
    SamplingParams(temperature=0, repetition_penalty=1.3),
    SamplingParams(temperature=1.2, min_p=0.05, repetition_penalty=1.1, seed=13, logprobs=2),
    SamplingParams(temperature=0.6, top_p=0.5, seed=14),
]


def run_steps(logits_per_step: list[torch.Tensor], params: list[SamplingParams]) -> list[list]:
    """Sample every step with states that persist across steps, as the engine does."""
    states = [SamplingState(p, [1, 2, 3]) for p in params]
    return [sample_batch(logits, states) for logits in logits_per_step]


def test_a_rows_token_does_not_depend_on_its_batch():
    steps = [random_logits(len(MIXED), seed=20 + s) for s in range(6)]
    together = run_steps(steps, MIXED)
    for r, params in enumerate(MIXED):
        alone = run_steps([logits[r : r + 1] for logits in steps], [params])
        assert [step[r] for step in together] == [step[0] for step in alone], params


def test_seeded_draws_repeat_and_follow_the_probabilities():
    probs = torch.tensor([0.5, 0.3, 0.2, 0.0])
    logits = probs.log().expand(4000, 4).contiguous()
    params = [SamplingParams(temperature=1.0, seed=s) for s in range(4000)]
    first = sample_batch(logits, [SamplingState(p, []) for p in params])
    again = sample_batch(logits, [SamplingState(p, []) for p in params])
    assert first == again
    counts = torch.bincount(torch.tensor([row[0] for row in first]), minlength=4) / 4000
    assert counts[3] == 0  # never a token without probability
    assert torch.allclose(counts[:3], probs[:3], atol=0.03)


def test_draw_never_passes_the_last_possible_token(monkeypatch):
    probs = torch.tensor([[0.25, 0.75, 0.0, 0.0]])
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.tensor([1.0], dtype=torch.float64))  # u * total == total
    assert batch.inverse_cdf_draw(probs, [None]).tolist() == [1]


def test_reference_sampler_still_agrees_on_filters_that_leave_one_token():
    logits = random_logits(1, seed=6)[0]
    params = SamplingParams(temperature=1.0, top_k=1, seed=3)
    assert sample_batch(logits[None], [SamplingState(params, [])])[0][0] == Sampler(params)(logits, torch.tensor([]))


def test_filtered_draws_follow_the_renormalized_probabilities():
    logits = torch.tensor([0.5, 0.3, 0.2, 0.0]).log().expand(4000, 4).contiguous()
    params = [SamplingParams(temperature=1.0, top_k=2, seed=s) for s in range(4000)]
    counts = torch.bincount(
        torch.tensor([row[0] for row in sample_batch(logits, [SamplingState(p, []) for p in params])]), minlength=4
    )
    assert counts[2:].tolist() == [0, 0]
    assert abs(counts[0] / 4000 - 0.625) < 0.03


def test_seen_tokens_keep_distinct_ids_and_grow_in_place():
    seen = SeenTokens([5, 3, 5, 9], torch.device("cpu"))
    assert seen.ids.tolist() == [5, 3, 9]
    for token in [3, *range(100, 200)]:  # past the first buffer: it doubles
        seen.add(token)
    assert seen.ids.tolist() == [5, 3, 9, *range(100, 200)]
