"""Turn one row of logits into the next token, per request: penalties, then a chain of small filters."""

from __future__ import annotations

import torch

from leanlm.sampling_params import SamplingParams


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style: divide positive logits of seen tokens by the penalty, multiply negative ones."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    picked = logits[seen]
    logits = logits.clone()
    logits[seen] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    threshold = torch.topk(logits, k).values[-1]
    return logits.masked_fill(logits < threshold, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches p (always at least one)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True)
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= p  # mass before this token already reaches p
    drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop tokens less likely than min_p times the most likely one."""
    if min_p <= 0:
        return logits
    probs = logits.softmax(-1)
    return logits.masked_fill(probs < min_p * probs.max(), float("-inf"))


class Sampler:
    """Holds one torch.Generator per seeded request so that a seed reproduces the same tokens."""

    def __init__(self, params: SamplingParams, device: torch.device | str = "cpu"):
        self.params = params
        self.generator = None
        if params.seed is not None:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(params.seed)

    def __call__(self, logits: torch.Tensor, seen: torch.Tensor) -> int:
        """logits: (V,) float32; seen: token ids of the prompt and output so far (for the penalty)."""
        return self.sample(self.penalize(logits, seen))

    def penalize(self, logits: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
        return apply_repetition_penalty(logits, seen, self.params.repetition_penalty)

    def sample(self, logits: torch.Tensor) -> int:
        """logits: (V,) after the penalty."""
        p = self.params
        if p.greedy:
            return int(logits.argmax())
        logits = logits / p.temperature
        logits = min_p_filter(top_p_filter(top_k_filter(logits, p.top_k), p.top_p), p.min_p)
        return int(torch.multinomial(logits.softmax(-1), 1, generator=self.generator))


def token_logprobs(logits: torch.Tensor, token_id: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """Log-probability of token_id and the `top` most likely (id, log-probability) pairs under logits (V,)."""
    logprobs = logits.float().log_softmax(-1)
    best = torch.topk(logprobs, top) if top > 0 else None
    pairs = list(zip(best.indices.tolist(), best.values.tolist(), strict=True)) if best is not None else []
    return float(logprobs[token_id]), pairs
