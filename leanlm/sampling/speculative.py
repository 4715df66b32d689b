"""Verify a request's draft tokens against the target model's logits at the draft positions.

Greedy: accept drafts while each equals the argmax of the row before it, then take that row's argmax: the tokens
are exactly those plain greedy decoding gives. Sampling: speculative (rejection) sampling (Leviathan et al. 2023,
Chen et al. 2023): draft d_i, drawn from the draft distribution q_i, is kept with probability min(1, p_i(d)/q_i(d));
at the first rejection the token is drawn from max(p_i - q_i, 0), renormalized, and when every draft is kept a bonus
token comes from the last row. Each emitted token then follows the target distribution p exactly. A drafter without
a distribution (prompt lookup, a greedy draft model) proposes a point mass: q_i = one-hot(d_i).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from leanlm.sampling.batch import candidate_groups, inverse_cdf_draw
from leanlm.sampling_params import SamplingParams


def speculable(params: SamplingParams) -> bool:
    """Whether a request's tokens can be verified several at a time. A repetition penalty or a grammar changes
    each row's distribution with the tokens before it, and logprobs are reported per sampled token: such requests
    decode one token per step."""
    return params.repetition_penalty == 1.0 and not params.constrained and params.logprobs is None


def accept_greedy(drafts: Sequence[int], argmaxes: Sequence[int]) -> list[int]:
    """argmaxes: the target's greedy token after the newest token and after each draft (len(drafts) + 1).
    Returns the accepted drafts and the target's token after them."""
    n = 0
    while n < len(drafts) and drafts[n] == argmaxes[n]:
        n += 1
    return list(drafts[:n]) + [argmaxes[n]]


def target_probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """(R, V) rows of the distribution sampling/batch.py draws from: temperature, then top-k, top-p and min-p."""
    probs = (logits / params.temperature).softmax(-1)
    out = torch.zeros_like(probs)
    for rows, ids, weights in candidate_groups(probs, [params] * probs.shape[0]):
        index = torch.tensor(rows, dtype=torch.long, device=probs.device)
        if ids is None:
            out[index] = weights
        else:
            out[index] = out[index].scatter(1, ids, weights)
    return out / out.sum(-1, keepdim=True)


def accept_sampled(
    drafts: Sequence[int],
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None,
    draft_probs: torch.Tensor | None = None,
) -> list[int]:
    """Rejection sampling. logits: (len(drafts) + 1, V) target rows; draft_probs: (len(drafts), V) the draft's
    distributions, or None for point masses. Returns the accepted drafts and one token drawn after them."""
    p = target_probabilities(logits, params).double()
    k = len(drafts)
    uniform = torch.rand(k, generator=generator, dtype=torch.float64, device=p.device).tolist() if k else []
    for i, token in enumerate(drafts):
        q = None if draft_probs is None else draft_probs[i].double()
        q_token = 1.0 if q is None else float(q[token])
        if q_token > 0 and uniform[i] * q_token < float(p[i, token]):  # u < p/q, without dividing
            continue
        if q is None:
            residual = p[i].clone()
            residual[token] = 0.0
        else:
            residual = (p[i] - q).clamp_(min=0.0)
        if float(residual.sum()) <= 0:  # p == q: the draft could not have been rejected; keep p
            residual = p[i]
        return list(drafts[:i]) + [_draw(residual, generator)]
    return list(drafts) + [_draw(p[k], generator)]


def _draw(weights: torch.Tensor, generator: torch.Generator | None) -> int:
    return int(inverse_cdf_draw(weights[None], [generator])[0])
