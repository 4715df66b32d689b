"""The batched sampler (sampling/batch.py) against the one-request reference (sampling/sampler.py): the same kept
tokens per filter, the same greedy tokens and logprobs, a token that does not depend on the rest of the batch,
and draws that follow the probabilities."""

import pytest
import torch

from leanlm.sampling import batch
from leanlm.sampling.batch import SamplingState, sample_batch
from leanlm.sampling.sampler import (
    Sampler,
    apply_repetition_penalty,
    min_p_filter,
    token_logprobs,
    top_k_filter,
    top_p_filter,
)
from leanlm.sampling_params import SamplingParams

VOCAB = 1000


def random_logits(rows: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return scale * torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed))


def dropped(logits: torch.Tensor) -> list[list[bool]]:
    return torch.isinf(logits).tolist()


def test_top_k_matches_reference_per_row():
    logits = random_logits(5)
    ks = [0, 1, 7, 40, VOCAB]
    batched = logits.clone()
    batch.top_k_rows(batched, ks)
    assert dropped(batched) == [dropped(top_k_filter(logits[r], k)) for r, k in enumerate(ks)]


@pytest.mark.parametrize("scale", [0.05, 1.0, 6.0])  # 0.05: nearly flat, the cut lies beyond the candidates
def test_top_p_matches_reference_per_row(scale):
    logits = random_logits(5, seed=1, scale=scale)
    ps = [1.0, 0.1, 0.5, 0.9, 0.99]
    batched = logits.clone()
    batch.top_p_rows(batched, ps, candidates=16)
    assert dropped(batched) == [dropped(top_p_filter(logits[r], p)) for r, p in enumerate(ps)]


def test_top_p_after_top_k_needs_no_fallback(monkeypatch):
    logits = random_logits(3, seed=2, scale=0.05)
    batch.top_k_rows(logits, [10, 10, 10])
    calls = []
    original = batch._top_p_drop
    monkeypatch.setattr(batch, "_top_p_drop", lambda *a: calls.append(a[2]) or original(*a))
    batch.top_p_rows(logits, [0.99] * 3, candidates=16)
    assert calls == [16]  # the 10 finite tokens hold all the mass: no row looked at the whole vocabulary


def test_min_p_matches_reference_per_row():
    logits = random_logits(4, seed=3)
    min_ps = [0.0, 0.01, 0.1, 0.5]
    batched = logits.clone()
    batch.min_p_rows(batched, min_ps)
    assert dropped(batched) == [dropped(min_p_filter(logits[r], m)) for r, m in enumerate(min_ps)]


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
    assert batch.inverse_cdf_draw(probs, [None]) == [1]


def test_reference_sampler_still_agrees_on_filters_that_leave_one_token():
    logits = random_logits(1, seed=6)[0]
    params = SamplingParams(temperature=1.0, top_k=1, seed=3)
    assert sample_batch(logits[None], [SamplingState(params, [])])[0][0] == Sampler(params)(logits, torch.tensor([]))
