"""How far prompt lookup can go on a task: replays the model's own greedy output (bench_speculative.py's prompts)
through lookup drafting rules and counts verify steps, drafted and accepted tokens, without timing anything. With a
verify row costing r of a one-row step (benchmarks/spec_costs.py measures it), a step of 1 + k rows costs 1 + r*k,
and the speedup over plain decoding is output tokens / total step cost.

Rules: `latest 2-4 k5` (the previous drafter: longest of the 4..2-grams, its latest occurrence, 5 tokens),
`n+2, n 2-8` (the current one: n-grams up to 8, n + 2 tokens after an n-token match, at most 10), and `oracle`: an
upper bound for any rule over 2-gram matches, which knows the output and drafts, among all occurrences of the last
two tokens, the one whose continuation is right for longest, exactly as far as it is right (no rejected rows).

    python benchmarks/spec_lookup_bound.py [--model default] [--row-cost 0.18] [--max-tokens 128]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from leanlm import LLM, SamplingParams

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_speculative import TASKS  # noqa: E402  (the same prompts)


def latest_match(context: list[int], smallest: int, largest: int) -> tuple[int, int | None]:
    """(n, where its continuation starts) for the longest n-gram ending the context that occurred before."""
    for n in range(largest, smallest - 1, -1):
        tail = context[-n:]
        for start in range(len(context) - n - 1, -1, -1):
            if len(context) > n and context[start : start + n] == tail:
                return n, start + n
    return 0, None


def rule(smallest: int, largest: int, length: Callable[[int], int]) -> Callable[[list[int], list[int]], list[int]]:
    def draft(context: list[int], _future: list[int]) -> list[int]:
        n, start = latest_match(context, smallest, largest)
        return [] if start is None else context[start : start + length(n)]

    return draft


def oracle(context: list[int], future: list[int]) -> list[int]:
    best: list[int] = []
    for start in range(len(context) - 2):
        if context[start : start + 2] == context[-2:]:
            run = 0
            while start + 2 + run < len(context) and run < len(future) and context[start + 2 + run] == future[run]:
                run += 1
            best = max(best, future[:run], key=len)
    return best


def replay(prompt: list[int], output: list[int], draft, row_cost: float) -> tuple[float, int, int, int]:
    done, steps, cost, drafted, accepted = 1, 0, 0.0, 0, 0  # the prefill gave the first token
    while done < len(output):
        proposal = draft(prompt + output[:done], output[done:])[: len(output) - done - 1]
        kept = 0
        while kept < len(proposal) and proposal[kept] == output[done + kept]:
            kept += 1
        done, steps, cost = done + kept + 1, steps + 1, cost + 1 + row_cost * len(proposal)
        drafted, accepted = drafted + len(proposal), accepted + kept
    return (len(output) - 1) / cost, steps, drafted, accepted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--row-cost", type=float, default=0.18, help="an extra verify row, as a share of a step")
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()
    llm = LLM(None if args.model == "default" else args.model, threads=2)
    rules = {
        "latest 2-4 k5": rule(2, 4, lambda n: 5),
        "n+2, n 2-8": rule(2, 8, lambda n: min(n + 2, 10)),
        "oracle (2-gram)": oracle,
    }
    print(f"# {args.model}: greedy outputs of {args.max_tokens} tokens at most; row cost r = {args.row_cost}")
    print("\n| task | rule | steps | drafted | accepted | speedup at r |")
    print("|---|---|---:|---:|---:|---:|")
    for task, text in TASKS.items():
        prompt = llm.apply_chat_template([{"role": "user", "content": text}])
        output = llm.generate([prompt], SamplingParams(max_tokens=args.max_tokens, temperature=0))[0].token_ids
        for name, draft in rules.items():
            speedup, steps, drafted, accepted = replay(prompt, output, draft, args.row_cost)
            print(f"| {task} | {name} | {steps} | {drafted} | {accepted} | {speedup:.2f}x |")


if __name__ == "__main__":
    main()
