"""A candidate model against a baseline on the same tokens: KL(baseline || candidate), top-1 agreement, perplexities.

KL measures how far the candidate's next-token distributions moved from the baseline's at every position; it sees
changes that perplexity, an average over the one true token, can hide.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from leanlm.errors import InvalidRequestError
from leanlm.evaluate.perplexity import LogitsFn, NLLAccumulator, NLLStats, sliding_log_probs

if TYPE_CHECKING:
    from leanlm.formats.tokenizer import Tokenizer


@dataclass(frozen=True)
class Comparison:
    candidate: NLLStats
    baseline: NLLStats
    kl_mean: float  # nats per token
    kl_max: float
    top1_agreement: float  # fraction of scored positions where both models rank the same token first

    @property
    def ppl_ratio(self) -> float:
        return self.candidate.perplexity / self.baseline.perplexity


class DivergenceAccumulator:
    def __init__(self) -> None:
        self.kl_sum = 0.0
        self.kl_max = 0.0
        self.agree = 0
        self.count = 0

    def add(self, baseline_log_probs: torch.Tensor, candidate_log_probs: torch.Tensor) -> None:
        """Both (n, V) over the same positions."""
        kl = token_kl(baseline_log_probs, candidate_log_probs)
        self.kl_sum += kl.double().sum().item()
        self.kl_max = max(self.kl_max, kl.max().item())
        self.agree += (baseline_log_probs.argmax(-1) == candidate_log_probs.argmax(-1)).sum().item()
        self.count += kl.numel()


def token_kl(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row of (n, V) log-probabilities, in nats."""
    p = p_log.exp()
    terms = torch.where(p > 0, p * (p_log - q_log), 0.0)  # 0 * log 0 = 0, not nan
    # KL >= 0; rounding of nearly equal distributions can give -1e-9, which would read as nonsense.
    return terms.sum(-1).clamp_min(0.0)


def compare(
    candidate: LogitsFn,
    baseline: LogitsFn,
    ids: Sequence[int],
    context: int,
    stride: int,
    progress: bool = False,
    desc: str = "eval vs baseline",
) -> Comparison:
    cand_nll, base_nll, divergence = NLLAccumulator(), NLLAccumulator(), DivergenceAccumulator()
    for _, targets, (cand, base) in sliding_log_probs([candidate, baseline], ids, context, stride, progress, desc):
        if cand.shape[-1] != base.shape[-1]:
            raise InvalidRequestError(
                f"The candidate has {cand.shape[-1]} output logits and the baseline {base.shape[-1]}: they do not "
                "share a vocabulary. Compare models with the same tokenizer."
            )
        cand_nll.add(cand, targets)
        base_nll.add(base, targets)
        divergence.add(base, cand)
    return Comparison(
        candidate=cand_nll.stats(),
        baseline=base_nll.stats(),
        kl_mean=divergence.kl_sum / divergence.count,
        kl_max=divergence.kl_max,
        top1_agreement=divergence.agree / divergence.count,
    )


def check_same_tokenizer(candidate: Tokenizer, baseline: Tokenizer) -> None:
    """KL and top-1 agreement compare distributions token by token: both models must mean the same by each id."""
    cand_vocab = candidate.backend.get_vocab(with_added_tokens=True)
    base_vocab = baseline.backend.get_vocab(with_added_tokens=True)
    if cand_vocab == base_vocab:
        return
    if len(cand_vocab) != len(base_vocab):
        detail = f"{len(cand_vocab)} tokens vs {len(base_vocab)}"
    else:
        token = next(t for t in sorted(cand_vocab) if base_vocab.get(t) != cand_vocab[t])
        detail = (
            f"token {token!r} is id {cand_vocab[token]} in the candidate and {base_vocab.get(token)} in the baseline"
        )
    raise InvalidRequestError(
        f"The candidate and the baseline have different vocabularies ({detail}). KL divergence and top-1 agreement "
        "need the same tokenizer: use a baseline from the same model family (e.g. the unquantized original)."
    )
