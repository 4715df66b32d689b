"""Fair scheduling: how long a short request waits for its first token while a long prompt is being prefilled.

A --long-tokens prompt starts alone; after its first step, a short request (a few tokens, greedy) arrives.
Reports the short request's time to first token and the long prompt's total prefill time, medians of
--repetitions runs (each on a fresh engine, so nothing comes from the prefix cache).

    python benchmarks/bench_long_prefill.py [--long-tokens 8000] [--repetitions 3] [--model M]
"""

from __future__ import annotations

import argparse
import statistics
import time

from leanlm import LLM, SamplingParams
from leanlm.bench.machine import describe
from leanlm.engine.engine import LLMEngine
from leanlm.formats.assets import default_model_path

TEXT = "The history of the city is long, and its streets remember every market, war and festival. "


def once(llm: LLM, long_tokens: int) -> tuple[float, float]:
    engine = LLMEngine(llm.model, llm.tokenizer, llm.engine.config)
    ids = llm.tokenizer.encode(TEXT * (long_tokens // 15 + 1))[:long_tokens]
    engine.add_request("long", ids, SamplingParams(max_tokens=1, temperature=0))
    started = time.perf_counter()
    engine.step()
    engine.add_request("short", llm.tokenizer.encode("Hello, how are"), SamplingParams(max_tokens=2, temperature=0))
    arrived = time.perf_counter()
    short_ttft = long_done = None
    while engine.has_unfinished_requests():
        for output in engine.step():
            now = time.perf_counter()
            if output.request_id == "short" and output.token_ids and short_ttft is None:
                short_ttft = now - arrived
            if output.request_id == "long" and output.token_ids and long_done is None:
                long_done = now - started
    return short_ttft, long_done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--long-tokens", type=int, default=8000)
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--model")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    llm = LLM(args.model or default_model_path(quiet=True), threads=args.threads)
    runs = [once(llm, args.long_tokens) for _ in range(args.repetitions)]
    machine = describe(args.threads)
    short, long = [r[0] for r in runs], [r[1] for r in runs]
    print(
        f"{machine['cpu']}, {machine['cores']} cores, {args.threads} threads; budget "
        f"{llm.engine.config.max_num_batched_tokens} tokens per step; {args.long_tokens}-token prompt"
    )
    print(f"short request's first token: {statistics.median(short):.2f} s [{min(short):.2f}-{max(short):.2f}]")
    print(f"long prompt's prefill:       {statistics.median(long):.2f} s [{min(long):.2f}-{max(long):.2f}]")


if __name__ == "__main__":
    main()
