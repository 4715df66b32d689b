"""Sample the next token of every request of a step at once.

sampler.py is the reference, one request at a time: about eight full-vocabulary ops per request and step, a
full sort among them (top-p), which made sampling cost more than the forward pass at 16 requests. Here each
filter is one op over the rows that use it, top-p sorts only the most likely candidates, and each row draws a
single number from its own generator (inverse CDF). Every op works row by row, so a request's token does not
depend on what else shares its batch: a seed reproduces the same tokens in any batch, and greedy rows are
plain argmaxes of their (penalized) logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from leanlm.sampling_params import SamplingParams

# Top-p first looks for its cut among this many most likely tokens; a row whose candidates hold less than
# top_p of the probability (a very flat distribution) falls back to all of its tokens.
TOP_P_CANDIDATES = 256

NEG_INF = float("-inf")

RowSample = tuple[int, float | None, list[tuple[int, float]] | None]  # token, its logprob, top (id, logprob)


class SamplingState:
    """What one request keeps between steps: its params, its seeded generator, the tokens it has seen."""

    def __init__(self, params: SamplingParams, prompt_token_ids: Sequence[int], device: torch.device | str = "cpu"):
        self.params = params
        self.device = torch.device(device)
        self.generator = None
        if params.seed is not None and not params.greedy:
            self.generator = torch.Generator(device=self.device)
            self.generator.manual_seed(params.seed)
        self.penalized = params.repetition_penalty != 1.0
        # The penalty depends only on which tokens were seen: a (V,) mask, updated in O(1) per token.
        self._seen_ids = list(prompt_token_ids) if self.penalized else None
        self._seen: torch.Tensor | None = None
        self.plain_greedy = params.greedy and not self.penalized and params.logprobs is None

    def seen_mask(self, vocab_size: int) -> torch.Tensor:
        if self._seen is None:
            self._seen = torch.zeros(vocab_size, dtype=torch.bool, device=self.device)
            if self._seen_ids:
                self._seen[torch.tensor(self._seen_ids, dtype=torch.long, device=self.device)] = True
            self._seen_ids = None
        return self._seen

    def append(self, token_id: int) -> None:
        if self._seen is not None:
            self._seen[token_id] = True
        elif self._seen_ids is not None:
            self._seen_ids.append(token_id)


def sample_batch(logits: torch.Tensor, states: Sequence[SamplingState]) -> list[RowSample]:
    """logits: (R, V) float32, one row per state. Returns one (token, logprob, top) per row; logprob and top are
    None unless the row's params ask for logprobs. Appends each token to its state (the penalty's seen set)."""
    if all(state.plain_greedy for state in states):  # one argmax for the whole batch
        return [(token, None, None) for token in logits.argmax(-1).tolist()]
    logits = penalize_rows(logits, states)
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
        for i, entry in zip(wanted, _logprobs(_rows(logits, wanted), [tokens[i] for i in wanted], tops), strict=True):
            results[i] = entry
    return results


# ---- the filters: each works in place on the rows that use it -------------------------------------------------


def penalize_rows(logits: torch.Tensor, states: Sequence[SamplingState]) -> torch.Tensor:
    """CTRL repetition penalty on the rows that have one (as sampler.apply_repetition_penalty); the input is
    left untouched: a new tensor comes back when any row is penalized."""
    rows = [i for i, state in enumerate(states) if state.penalized]
    if not rows:
        return logits
    vocab = logits.shape[-1]
    seen = torch.stack([states[i].seen_mask(vocab) for i in rows])
    penalty = _column([states[i].params.repetition_penalty for i in rows], logits)
    sub = logits[_index(rows, logits)]
    sub = torch.where(seen, torch.where(sub > 0, sub / penalty, sub * penalty), sub)
    out = logits.clone()
    out[_index(rows, logits)] = sub
    return out


def top_k_rows(logits: torch.Tensor, ks: Sequence[int]) -> None:
    """Keep each row's k most likely tokens (k = 0: all), in place."""
    vocab = logits.shape[-1]
    rows = [i for i, k in enumerate(ks) if 0 < k < vocab]
    if not rows:
        return
    sub = _rows(logits, rows)
    k = torch.tensor([ks[i] for i in rows], dtype=torch.long, device=logits.device)
    kth = sub.topk(int(k.max())).values.gather(1, (k - 1)[:, None])  # each row's k-th largest value
    _assign(logits, rows, sub.masked_fill(sub < kth, NEG_INF))


def top_p_rows(logits: torch.Tensor, ps: Sequence[float], candidates: int = TOP_P_CANDIDATES) -> None:
    """Keep each row's smallest set of most likely tokens whose probability reaches p (p >= 1: all), in place."""
    vocab = logits.shape[-1]
    rows = [i for i, p in enumerate(ps) if p < 1.0]
    if not rows:
        return
    sub = _rows(logits, rows)
    p = _column([ps[i] for i in rows], logits)
    drop, covered = _top_p_drop(sub, p, min(candidates, vocab))
    for r in (~covered).nonzero().flatten().tolist():  # the cut lies beyond the candidates: look at every token
        drop[r] = _top_p_drop(sub[r : r + 1], p[r : r + 1], vocab)[0][0]
    _assign(logits, rows, sub.masked_fill(drop, NEG_INF))


def min_p_rows(logits: torch.Tensor, min_ps: Sequence[float]) -> None:
    """Drop tokens less likely than min_p times the row's most likely one (min_p = 0: none), in place."""
    rows = [i for i, m in enumerate(min_ps) if m > 0]
    if not rows:
        return
    sub = _rows(logits, rows)
    probs = sub.softmax(-1)
    floor = _column([min_ps[i] for i in rows], logits) * probs.amax(-1, keepdim=True)
    _assign(logits, rows, sub.masked_fill(probs < floor, NEG_INF))


def draw_rows(
    logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None]
) -> list[int]:
    """Temperature, top-k, top-p and min-p (in the reference's order), then one draw per row from its generator."""
    logits = logits / _column([p.temperature for p in params], logits)
    top_k_rows(logits, [p.top_k for p in params])
    top_p_rows(logits, [p.top_p for p in params])
    min_p_rows(logits, [p.min_p for p in params])
    return inverse_cdf_draw(logits.softmax(-1), generators)


def inverse_cdf_draw(probs: torch.Tensor, generators: Sequence[torch.Generator | None]) -> list[int]:
    """One token per row with the row's probabilities, from a single uniform number of the row's generator
    (torch.multinomial would draw one exponential per vocabulary entry)."""
    uniform = torch.cat(
        [torch.rand(1, generator=g, dtype=torch.float64, device=probs.device) for g in generators]
    )  # (R,) in [0, 1)
    cdf = probs.double().cumsum(-1)
    picks = torch.searchsorted(cdf, uniform[:, None] * cdf[:, -1:], right=True)[:, 0]
    # u * total may round up to the total: never go past the last token that has any probability.
    last = probs.shape[-1] - 1 - (probs.flip(-1) > 0).to(torch.uint8).argmax(-1)
    return torch.minimum(picks, last).tolist()


# ---- helpers ----------------------------------------------------------------------------------------------------


def _top_p_drop(sub: torch.Tensor, p: torch.Tensor, candidates: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens top-p drops, found among the `candidates` most likely ones, and whether that sufficed per row."""
    probs = sub.softmax(-1)
    top = probs.topk(candidates)  # sorted, most likely first
    mass = top.values.cumsum(-1)
    keep = (mass - top.values) < p  # the mass before this token does not reach p yet
    drop = torch.ones_like(sub, dtype=torch.bool).scatter_(1, top.indices, ~keep)
    covered = (mass[:, -1] >= p[:, 0]) | (top.values[:, -1] == 0)
    if candidates == sub.shape[-1]:
        covered[:] = True
    return drop, covered


def _logprobs(logits: torch.Tensor, tokens: list[int], tops: list[int]) -> list[RowSample]:
    """As sampler.token_logprobs, for all rows at once."""
    logprobs = logits.float().log_softmax(-1)
    chosen = logprobs.gather(1, torch.tensor(tokens, device=logits.device)[:, None])[:, 0].tolist()
    best_values, best_ids = [], []
    if (most := max(tops)) > 0:
        best = torch.topk(logprobs, most)
        best_values, best_ids = best.values.tolist(), best.indices.tolist()
    return [
        (token, value, list(zip(best_ids[r][:top], best_values[r][:top], strict=True)) if top else [])
        for r, (token, value, top) in enumerate(zip(tokens, chosen, tops, strict=True))
    ]


def _rows(tensor: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """tensor[rows]: the tensor itself when rows are all of them, in order."""
    if len(rows) == tensor.shape[0]:
        return tensor
    return tensor[_index(rows, tensor)]


def _assign(tensor: torch.Tensor, rows: list[int], values: torch.Tensor) -> None:
    if len(rows) == tensor.shape[0]:
        tensor.copy_(values)
    else:
        tensor[_index(rows, tensor)] = values


def _index(rows: list[int], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long, device=like.device)


def _column(values: list[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device)[:, None]
