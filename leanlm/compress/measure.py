"""Quick measurements recorded in a compressed artifact's manifest: decode/prefill speed (one run) and quality
(perplexity, KL and top-1 on wiki text) against the original model. benchmarks/bench_quant.py and bench_prune.py
give the careful medians.

Level 4 (measurement), like evaluate/: the compression transforms themselves (level 3) never import this.
"""

from __future__ import annotations

import sys

import torch

from leanlm.sampling_params import SamplingParams

SPEED_PROMPT_TOKENS, SPEED_GENERATED_TOKENS = 64, 32


def measure_speed(llm) -> dict:
    """Prefill and decode tokens/s of one greedy generation (64-token prompt, 32 new tokens) after a warm-up."""
    prompt = llm.tokenizer.encode("The history of computing is a story of ideas. " * 16)[:SPEED_PROMPT_TOKENS]
    params = SamplingParams(max_tokens=SPEED_GENERATED_TOKENS, temperature=0, ignore_eos=True)
    llm.generate([prompt[:8]], SamplingParams(max_tokens=2, temperature=0))  # warm-up
    metrics = llm.generate([prompt], params)[0].metrics
    return {
        "prompt_tokens": SPEED_PROMPT_TOKENS,
        "generated_tokens": SPEED_GENERATED_TOKENS,
        "prefill_tok_s": round(metrics.prefill_tokens_per_s, 1),
        "decode_tok_s": round(metrics.decode_tokens_per_s, 1),
        "threads": llm.threads or torch.get_num_threads(),
    }


def measure_quality(llm, original, max_tokens: int, progress: bool = True) -> dict:
    """Perplexity, KL and top-1 of `llm` against `original` on the first `max_tokens` tokens of the wiki corpus."""
    from leanlm.evaluate import evaluate
    from leanlm.evaluate.corpus import evaluation_text

    if progress:
        print("leanlm: measuring quality against the original...", file=sys.stderr)
    result = evaluate(
        llm,
        evaluation_text(quiet=not progress),
        corpus="wiki",
        max_tokens=max_tokens,
        baseline=original,
        progress=progress,
    )
    return result.to_dict()
