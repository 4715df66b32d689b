"""Measure a model's quality: sliding-window perplexity, bits per byte, and divergence from a baseline model.

`evaluate(llm, text)` is what `leanlm eval` runs; perplexity.py and compare.py hold the pieces, corpus.py the texts.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

from leanlm.errors import InvalidRequestError

if TYPE_CHECKING:
    from leanlm.engine.llm import LLM
    from leanlm.evaluate.compare import Comparison

# 4096 tokens with 1024-token windows every 512 take ~10 s for the 135M default model in bfloat16 on 2 cores.
DEFAULT_CONTEXT = 1024
DEFAULT_STRIDE = 512
DEFAULT_MAX_TOKENS = 4096

__all__ = ["EvalResult", "evaluate", "DEFAULT_CONTEXT", "DEFAULT_STRIDE", "DEFAULT_MAX_TOKENS"]


@dataclass(frozen=True)
class EvalResult:
    model: str
    dtype: str
    corpus: str  # a corpus name (wiki, c4, ...) or "text-file"
    corpus_path: str | None
    num_tokens: int  # tokens scored (all but the first of the evaluated text)
    num_bytes: int  # UTF-8 bytes of the scored text
    context: int
    stride: int
    nll_mean: float  # nats per token
    perplexity: float
    bits_per_byte: float
    elapsed_s: float
    # With a baseline (None otherwise): KL(baseline || candidate) in nats per token, over the same positions.
    baseline: str | None = None
    baseline_dtype: str | None = None
    baseline_perplexity: float | None = None
    ppl_ratio: float | None = None  # candidate perplexity / baseline perplexity
    kl_mean: float | None = None
    kl_max: float | None = None
    top1_agreement: float | None = None  # fraction in [0, 1]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate(
    llm: LLM,
    text: str,
    *,
    corpus: str,
    corpus_path: str | None = None,
    context: int = DEFAULT_CONTEXT,
    stride: int = DEFAULT_STRIDE,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    baseline: LLM | None = None,
    progress: bool = False,
) -> EvalResult:
    """Perplexity of `llm` on the first `max_tokens` tokens of `text` (0 = all), and, with a baseline, how far its
    next-token distributions are from the baseline's. `llm` and `baseline` need .model, .tokenizer, .config, .dtype
    and .model_path, as `LLM` has."""
    # Imported here: the CLI reads this package's constants and corpus names without paying for torch.
    from leanlm.evaluate.compare import check_same_tokenizer, compare
    from leanlm.evaluate.perplexity import check_window_options, perplexity, tokenize_for_eval

    check_window_options(context, stride, llm.config.context_length)
    if baseline is not None:
        check_window_options(context, stride, baseline.config.context_length)
        check_same_tokenizer(llm.tokenizer, baseline.tokenizer)
    tokens = tokenize_for_eval(llm.tokenizer, text, max_tokens)
    if baseline is not None and tokenize_for_eval(baseline.tokenizer, text, max_tokens).ids != tokens.ids:
        raise InvalidRequestError(
            "The candidate's and the baseline's tokenizers split the text differently (same vocabulary, other "
            "rules or BOS settings). Compare models that share one tokenizer."
        )
    started = time.perf_counter()
    comparison: Comparison | None = None
    if baseline is None:
        stats = perplexity(llm.model, tokens.ids, context, stride, progress)
    else:
        comparison = compare(llm.model, baseline.model, tokens.ids, context, stride, progress)
        stats = comparison.candidate
    result = EvalResult(
        model=llm.model_path.name,
        dtype=_dtype_name(llm.dtype),
        corpus=corpus,
        corpus_path=corpus_path,
        num_tokens=stats.num_tokens,
        num_bytes=tokens.num_bytes,
        context=context,
        stride=stride,
        nll_mean=stats.nll_mean,
        perplexity=stats.perplexity,
        bits_per_byte=stats.bits_per_byte(tokens.num_bytes),
        elapsed_s=time.perf_counter() - started,
    )
    if comparison is None:
        return result
    return _with_baseline(result, baseline, comparison)


def _with_baseline(result: EvalResult, baseline: LLM, comparison: Comparison) -> EvalResult:
    return replace(
        result,
        baseline=baseline.model_path.name,
        baseline_dtype=_dtype_name(baseline.dtype),
        baseline_perplexity=comparison.baseline.perplexity,
        ppl_ratio=comparison.ppl_ratio,
        kl_mean=comparison.kl_mean,
        kl_max=comparison.kl_max,
        top1_agreement=comparison.top1_agreement,
    )


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")
