"""Sample the next token of every request of a step at once.

sampler.py is the reference, one request at a time: about eight full-vocabulary ops per request and step, a
full sort among them (top-p), which made sampling cost more than the forward pass at 16 requests. Here the
penalty, temperature and softmax are one op each over all rows; top-k, top-p and min-p work among each row's
most likely candidates only (one top-k per step); each row draws a single number from its own generator
(inverse CDF). Every op works row by row, with sizes that depend only on the row itself, so a request's token
does not depend on what else shares its batch: a seed reproduces the same tokens in any batch, and greedy rows
are plain argmaxes of their (penalized) logits.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from math import inf

import torch

from leanlm.sampling.grammar import apply_masks
from leanlm.sampling.state import SamplingState
from leanlm.sampling_params import SamplingParams

# The filters first look for a row's kept tokens among its this many most likely ones; a row whose kept set goes
# further (a flat distribution under top-p, top_k above this) looks again among more.
CANDIDATES = 256
CANDIDATES_GROWTH = 8  # ... then among 8x as many, until the whole vocabulary


RowSample = tuple[int, float | None, list[tuple[int, float]] | None]  # token, its logprob, top (id, logprob)


def sample_batch(
    logits: torch.Tensor, states: Sequence[SamplingState], masks: tuple[list[int], torch.Tensor] | None = None
) -> list[RowSample]:
    """logits: (R, V) float32, one row per state. Returns one (token, logprob, top) per row; logprob and top are
    None unless the row's params ask for logprobs. Appends each token to its state (the penalty's seen set, the
    grammar). masks: (rows, allowed (n, V) bool) of the structured-output rows; their other tokens are excluded."""
    if all(state.plain_greedy for state in states):  # one argmax for the whole batch
        return [(token, None, None) for token in logits.argmax(-1).tolist()]
    logits = penalize_rows(apply_masks(logits, masks), states)
    tokens = [0] * len(states)
    greedy = [i for i, state in enumerate(states) if state.params.greedy]
    drawn = [i for i, state in enumerate(states) if not state.params.greedy]
    if greedy:
        for i, token in zip(greedy, _rows(logits, greedy).argmax(-1).tolist(), strict=True):
            tokens[i] = token
    if drawn:
        params, generators = [states[i].params for i in drawn], [states[i].generator for i in drawn]
        picked = draw_rows(_rows(logits, drawn), params, generators)
        for i, token in zip(drawn, picked, strict=True):
            tokens[i] = token
    for state, token in zip(states, tokens, strict=True):
        state.append(token)
    results: list[RowSample] = [(token, None, None) for token in tokens]
    wanted = [i for i, state in enumerate(states) if state.params.logprobs is not None]
    if wanted:
        tops = [states[i].params.logprobs for i in wanted]
        entries = rows_logprobs(_rows(logits, wanted), [tokens[i] for i in wanted], tops)
        for i, entry in zip(wanted, entries, strict=True):
            results[i] = entry
    return results


# ---- the steps ----------------------------------------------------------------------------------------------------


def penalize_rows(logits: torch.Tensor, states: Sequence[SamplingState]) -> torch.Tensor:
    """CTRL repetition penalty on the rows that have one (as sampler.apply_repetition_penalty), touching only the
    seen tokens' entries; the input is left untouched: a new tensor comes back when any row is penalized."""
    rows = [i for i, state in enumerate(states) if state.penalized]
    if not rows:
        return logits
    seen = [states[i].seen.ids for i in rows]
    counts = torch.tensor([ids.numel() for ids in seen], device=logits.device)
    offsets = torch.repeat_interleave(_index(rows, logits) * logits.shape[-1], counts)
    index = torch.cat(seen) + offsets  # positions in the flattened (R * V) logits
    penalty = torch.repeat_interleave(
        _column([states[i].params.repetition_penalty for i in rows], logits)[:, 0], counts
    )
    out = logits.clone(memory_format=torch.contiguous_format)
    flat = out.view(-1)
    picked = flat[index]
    flat[index] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return out


def draw_rows(
    logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None]
) -> list[int]:
    """Temperature, then top-k, top-p and min-p (the reference's order), then one draw per row from its generator."""
    probs = (logits / _column([p.temperature for p in params], logits)).softmax(-1)
    tokens = [0] * len(params)
    for rows, ids, weights in candidate_groups(probs, params):
        positions = inverse_cdf_draw(weights, [generators[r] for r in rows])
        chosen = positions if ids is None else ids.gather(1, positions[:, None])[:, 0]
        for r, token in zip(rows, chosen.tolist(), strict=True):
            tokens[r] = token
    return tokens


def candidate_groups(
    probs: torch.Tensor, params: Sequence[SamplingParams]
) -> Iterator[tuple[list[int], torch.Tensor | None, torch.Tensor]]:
    """The tokens each row may draw, as (rows, ids (n, C), weights (n, C)): a kept token's probability, 0 for a
    dropped one; ids None means the whole vocabulary in order (rows without top-k, top-p or min-p).

    Every filter keeps a prefix of the tokens sorted by probability, so a row's kept set is found among its C most
    likely tokens as soon as the C-th is dropped: C starts at CANDIDATES and grows only for the rows that
    need it. The filters never touch the whole vocabulary."""
    vocab = probs.shape[-1]
    plain = [i for i, p in enumerate(params) if not _filtered(p, vocab)]
    if plain:
        yield plain, None, _rows(probs, plain)
    left = [i for i, p in enumerate(params) if _filtered(p, vocab)]
    count = min(CANDIDATES, vocab)
    while left:
        ids, weights, covered = _filter_candidates(_rows(probs, left), [params[i] for i in left], count)
        done = covered.nonzero().flatten()
        if done.numel():
            yield [left[j] for j in done.tolist()], ids[done], weights[done]
        left = [left[j] for j in (~covered).nonzero().flatten().tolist()]
        count = min(count * CANDIDATES_GROWTH, vocab)


def inverse_cdf_draw(weights: torch.Tensor, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """One column per row, with probability proportional to its weight, from a single uniform number of the row's
    generator (torch.multinomial would draw one exponential per vocabulary entry)."""
    uniform = torch.cat(
        [torch.rand(1, generator=g, dtype=torch.float64, device=weights.device) for g in generators]
    )  # (n,) in [0, 1)
    cdf = weights.cumsum(-1)  # float32 sums accumulate in float64 on CPU: each entry is off by one rounding at most
    target = (uniform[:, None] * cdf[:, -1:].double()).to(cdf.dtype)
    picks = torch.searchsorted(cdf, target, right=True)[:, 0].clamp_(max=weights.shape[-1] - 1)
    # u * total may round up to the total: such a row takes its last column that has any weight.
    missed = (weights.gather(1, picks[:, None])[:, 0] == 0).nonzero().flatten()
    if missed.numel():
        last = weights.shape[-1] - 1 - (weights[missed].flip(-1) > 0).to(torch.uint8).argmax(-1)
        picks[missed] = last
    return picks


# ---- helpers ----------------------------------------------------------------------------------------------------


def _filtered(params: SamplingParams, vocab: int) -> bool:
    return 0 < params.top_k < vocab or params.top_p < 1.0 or params.min_p > 0


def _filter_candidates(
    probs: torch.Tensor, params: Sequence[SamplingParams], count: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k, top-p and min-p among each row's `count` most likely tokens: (ids, weights, covered), where covered
    says that the row's kept set ends within them."""
    vocab = probs.shape[-1]
    top = probs.topk(count)  # sorted, most likely first
    ids, q = top.indices, top.values
    position = torch.arange(count, device=probs.device)
    ks = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    k = torch.tensor(ks, device=probs.device)[:, None]
    keep = position < k
    if any(p.top_p < 1.0 for p in params):
        # As the reference: top-p measures mass within what top-k kept (renormalized), min-p after top-p.
        kept_q = q * keep
        mass = kept_q.cumsum(-1)
        limited = k[:, 0] <= count
        total = torch.where(limited, mass[:, -1], torch.ones_like(mass[:, -1]))[:, None]
        top_p = _column([p.top_p if p.top_p < 1.0 else float("inf") for p in params], q)  # inf: no cut at all
        keep &= (mass - kept_q) < top_p * total
    if any(p.min_p > 0 for p in params):
        keep &= q >= _column([p.min_p for p in params], q) * q[:, :1]
    if count == vocab:
        covered = torch.ones(len(params), dtype=torch.bool, device=probs.device)
    else:  # top-k's own cut needs all k tokens in view (its renormalization too)
        covered = (k[:, 0] <= count) | ~keep[:, -1]
        covered &= (k[:, 0] <= count) | (k[:, 0] == vocab)
    return ids, q * keep, covered


def rows_logprobs(logits: torch.Tensor, tokens: list[int], tops: list[int]) -> list[RowSample]:
    """As sampler.token_logprobs, for all rows at once: row r's log-probability of tokens[r], and its tops[r] most
    likely tokens."""
    logprobs = logits.float().log_softmax(-1)
    chosen = logprobs.gather(1, torch.tensor(tokens, device=logits.device)[:, None])[:, 0].tolist()
    best_values, best_ids = [], []
    if (most := max(tops)) > 0:
        best = torch.topk(logprobs, most)
        best_values, best_ids = best.values.tolist(), best.indices.tolist()
    # Tokens a grammar excludes have log-probability -inf: they are no alternative (and not valid JSON either).
    return [
        (token, value, [(i, v) for i, v in zip(best_ids[r][:top], best_values[r][:top], strict=True) if v > -inf])
        if top
        else (token, value, [])
        for r, (token, value, top) in enumerate(zip(tokens, chosen, tops, strict=True))
    ]


def _rows(tensor: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """tensor[rows]: the tensor itself when rows are all of them, in order."""
    if len(rows) == tensor.shape[0]:
        return tensor
    return tensor[_index(rows, tensor)]


def _index(rows: list[int], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long, device=like.device)


def _column(values: list[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device)[:, None]
