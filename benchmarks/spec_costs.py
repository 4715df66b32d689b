"""What bounds speculative decoding on this machine: the cost of a verify step by its number of rows, and for the
layer-skip self-draft (first N layers and the head), its cost per drafted token and how often its greedy token
equals the full model's, then the speedup those give.

Acceptance is measured teacher-forced: one forward pass over prompt + the model's own greedy output for a
bench_speculative.py task, full model vs its first N layers; the share of output positions where both argmaxes
agree is the chance that a drafted token is accepted (the first one of a draft; later ones also need the ones
before). With acceptance a, draft cost d and row cost r (both per token, as a share of one plain decode step), a
draft of k tokens gives (1 - a^(k+1)) / (1 - a) tokens for 1 + k * (d + r) steps' time; the table gives the best k.

    python benchmarks/spec_costs.py [--model qwen2.5-coder-1.5b] [--layers 4,7,10,14,21] [--task story]
        [--max-tokens 128] [--repetitions 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from leanlm import LLM, SamplingParams
from leanlm.bench.machine import describe
from leanlm.engine.paged_attention import SequenceSlice, build_paged_attention
from leanlm.engine.speculative.factory import first_layers_cache
from leanlm.engine.speculative.model_drafter import first_layers
from leanlm.kernels.threads import scoped_threads

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_speculative import TASKS  # noqa: E402  (the same prompts)

ROWS = (1, 2, 3, 4, 6, 8, 11)
CONTEXT = 300  # tokens already in the cache when the timed steps run


def best_speedup(acceptance: float, draft: float, row: float, most: int = 10) -> tuple[float, int]:
    """(speedup, k) of the best draft length under the formula of the module docstring; (1.0, 0): do not draft."""
    best = (1.0, 0)
    for k in range(1, most + 1):
        tokens = sum(acceptance**i for i in range(k + 1))
        best = max(best, (tokens / (1 + k * (draft + row)), k))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-1.5b")
    parser.add_argument("--layers", default="4,7,10,14,21")
    parser.add_argument("--task", default="story", choices=list(TASKS))
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    print(f"# {describe(args.threads).get('cpu')} | {args.threads} threads | {args.model} | task {args.task}")
    llm = LLM(None if args.model == "default" else args.model, threads=args.threads)
    model, engine = llm.model, llm.engine
    layers = [int(n) for n in args.layers.split(",")]
    views = {n: first_layers(model, n) for n in layers}
    prompt = llm.apply_chat_template([{"role": "user", "content": TASKS[args.task]}])
    output = llm.generate([prompt], SamplingParams(max_tokens=args.max_tokens, temperature=0))[0].token_ids

    with torch.inference_mode(), scoped_threads(args.threads):
        ids = torch.tensor([prompt + output])
        positions = torch.arange(ids.shape[1])[None]
        span = slice(len(prompt) - 1, ids.shape[1] - 1)  # the rows that predict each output token
        full = model(ids, positions)[0, span].argmax(-1)
        agreement = {}
        for n in layers:
            agreement[n] = float((views[n](ids, positions)[0, span].argmax(-1) == full).float().mean())
            print(f"self:{n}: greedy agreement with the full model {agreement[n]:.1%}", flush=True)

        engine.add_request("timing", list(range(1000, 1000 + CONTEXT)), SamplingParams(max_tokens=1000))
        while engine.scheduler.running == [] or engine.scheduler.running[0].num_computed_tokens < CONTEXT:
            engine.step()
        request = engine.scheduler.running[0]
        table = engine.block_manager.tables["timing"]
        engine.block_manager.allocate("timing", request.num_tokens + max(ROWS))
        start = request.num_computed_tokens

        caches = {id(model): engine.cache} | {id(views[n]): first_layers_cache(engine.cache, n) for n in layers}

        def forward(net, rows: int) -> None:  # a decode step of `rows` rows after the context (cache rewritten)
            sequence = SequenceSlice(start, rows, table.ids, table.contiguous)
            attend = build_paged_attention(caches[id(net)], net.attention, [sequence], engine.device)
            net(
                torch.tensor([list(range(5, 5 + rows))]),
                torch.tensor([list(range(start, start + rows))]),
                attend=attend,
                last_only=rows == 1,
                logits_indices=None if rows == 1 else torch.arange(rows),
            )

        cases = [("full", model, rows) for rows in ROWS] + [(f"self:{n}", views[n], 1) for n in layers]
        times: dict[tuple[str, int], list[float]] = {(name, rows): [] for name, _, rows in cases}
        for _, net, rows in cases:
            forward(net, rows)  # warm-up
        for _ in range(args.repetitions):  # interleaved: load drift hits every case
            for name, net, rows in cases:
                started = time.perf_counter()
                forward(net, rows)
                times[(name, rows)].append(time.perf_counter() - started)
    step = statistics.median(times[("full", 1)])
    print(f"\nplain decode step (1 row, {CONTEXT} tokens of context): {1000 * step:.1f} ms,", end=" ")
    print(f"median of {args.repetitions}")
    print("\n| rows of the step | ms (median) | x one row | extra per row |")
    print("|---:|---:|---:|---:|")
    for rows in ROWS:
        seconds = statistics.median(times[("full", rows)])
        extra = (seconds / step - 1) / (rows - 1) if rows > 1 else 0.0
        print(f"| {rows} | {1000 * seconds:.1f} | {seconds / step:.2f} | {extra:.3f} |")
    row = (statistics.median(times[("full", 6)]) / step - 1) / 5  # per extra row, from a 6-row step
    print(f"\nverify row cost r = {row:.3f} of a step (from the 6-row step)")
    print("\n| draft | cost per token d | greedy agreement a | best k | expected speedup |")
    print("|---|---:|---:|---:|---:|")
    for n in layers:
        draft = statistics.median(times[(f"self:{n}", 1)]) / step
        speedup, k = best_speedup(agreement[n], draft, row)
        print(f"| self:{n} of {len(model.layers)} | {draft:.2f} | {agreement[n]:.1%} | {k} | {speedup:.2f}x |")
    needed = next((a / 100 for a in range(0, 101) if best_speedup(a / 100, 0.0, row)[0] >= 1.3), None)
    print(f"\nacceptance a free draft (d = 0) needs for 1.3x at r = {row:.3f}: {needed}")


if __name__ == "__main__":
    main()
