"""Cost of constrained decoding: decode tok/s with a JSON schema against free generation, batch 1 and 16.

The schema is an array of at least 1,000 small objects, so that the grammar never completes within --max-tokens
and both runs generate exactly as many tokens (free runs ignore EOS). Each configuration runs --repetitions
times, interleaved; the medians and the slowdown in % of the free tok/s are printed as a markdown table, then
the time the step's masks take alone (computed on a worker thread while the forward pass runs).

    python benchmarks/bench_structured.py [--batches 1,16] [--max-tokens 96] [--repetitions 3] [--model M]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from leanlm import LLM, SamplingParams
from leanlm.bench.machine import describe
from leanlm.formats.assets import default_model_path
from leanlm.sampling.grammar import GrammarCompiler

SCHEMA = {
    "type": "array",
    "minItems": 1000,
    "items": {
        "type": "object",
        "properties": {"id": {"type": "integer"}, "name": {"type": "string", "maxLength": 12}},
        "required": ["id", "name"],
        "additionalProperties": False,
    },
}


def run(llm: LLM, batch: int, max_tokens: int, constrained: bool) -> float:
    prompts = [f"List {20 + i} users of the system as JSON records with an id and a name." for i in range(batch)]
    ids = [llm.tokenizer.encode_chat([{"role": "user", "content": p}]) for p in prompts]
    extra = {"json_schema": SCHEMA} if constrained else {"ignore_eos": True}
    params = [SamplingParams(max_tokens=max_tokens, temperature=0.7, seed=i, **extra) for i in range(batch)]
    started = time.perf_counter()
    outputs = llm.generate(ids, params)
    elapsed = time.perf_counter() - started
    tokens = sum(len(o.token_ids) for o in outputs)
    assert tokens == batch * max_tokens, (tokens, [o.finish_reason for o in outputs])
    return tokens / elapsed


def mask_ms(llm: LLM, batch: int, steps: int = 60) -> float:
    """Milliseconds per step to compute the masks of `batch` constrained rows (what the worker thread does while
    the forward pass runs), along trajectories drawn uniformly among the allowed tokens."""
    compiler = GrammarCompiler(llm.tokenizer, llm.config.vocab_size)
    constraints = [compiler.constraint(SamplingParams(json_schema=SCHEMA)) for _ in range(batch)]
    generator = torch.Generator().manual_seed(0)
    spent = 0.0
    for _ in range(steps):
        started = time.perf_counter()
        allowed = compiler.masks(constraints)
        spent += time.perf_counter() - started
        for row, constraint in enumerate(constraints):
            ids = allowed[row].nonzero().flatten()
            constraint.consume(int(ids[torch.randint(len(ids), (1,), generator=generator)]))
    return 1000 * spent / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--model")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    llm = LLM(args.model or default_model_path(quiet=True), threads=args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    run(llm, 2, 8, True)  # warm-up: kernels, llguidance's tokenizer view
    results: dict[tuple[int, bool], list[float]] = {}
    for _ in range(args.repetitions):
        for batch in batches:
            for constrained in (False, True):
                results.setdefault((batch, constrained), []).append(run(llm, batch, args.max_tokens, constrained))
    machine = describe(args.threads)
    print(f"{machine['cpu']}, {machine['cores']} cores, {args.threads} threads; {args.max_tokens} tokens per request")
    print("| batch | free tok/s | JSON schema tok/s | cost |\n|---|---|---|---|")
    for batch in batches:
        free = statistics.median(results[(batch, False)])
        constrained = statistics.median(results[(batch, True)])
        spans = {k: f"[{min(v):.1f}-{max(v):.1f}]" for k, v in results.items() if k[0] == batch}
        print(
            f"| {batch} | {free:.1f} {spans[(batch, False)]} | {constrained:.1f} {spans[(batch, True)]} "
            f"| {100 * (1 - constrained / free):.1f}% |"
        )
    for batch in batches:
        per_step = statistics.median(mask_ms(llm, batch) for _ in range(args.repetitions))
        print(f"masks of {batch} row(s): {per_step:.2f} ms per step")


if __name__ == "__main__":
    main()
