"""Where a decode token's time goes: matrix products, attention, other torch ops, and Python/dispatch.

Generates --tokens tokens (greedy, batch 1, after a 120-token prompt) through `LLM.generate` for each kernel
mode, first unprofiled (the wall time per token, median of --repetitions), then under torch.profiler to split
it: each op's self CPU time goes to a category by name, decode steps only (a profiled call with N decode steps
minus one with none); what the ops do not account for is Python and dispatch (the engine's scheduling,
sampling and detokenizing included). The profiler adds a little to each op, so "other ops" is an upper bound.
With leanlm's kernels all decoder layers run as one C++ call (DecoderStack), whose matrix products and
attention are scoped for the profiler; the rest of its time (norms, RoPE, SiLU, residuals) counts as other ops.

    python benchmarks/profile_decode.py [--model gemma3-270m] [--modes torch,auto] [--tokens 64] [--json out/x.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from torch.profiler import ProfilerActivity, profile

from leanlm import LLM, SamplingParams
from leanlm.formats.assets import default_model_path

CATEGORIES = {
    "matrix products": (
        "q4_linear",
        "q8_linear",
        "half_linear",
        "int4pack",
        "int8pack",
        "aten::mm",
        "aten::addmm",
        "aten::linear",
    ),
    "attention": ("scaled_dot_product", "attention", "aten::bmm", "aten::baddbmm", "aten::_softmax"),
}


def category(op_name: str) -> str:
    for name, markers in CATEGORIES.items():
        if any(marker in op_name for marker in markers):
            return name
    return "other ops"


def profile_mode(mode: str, tokens: int, repetitions: int, threads: int, model: str | None = None) -> dict:
    llm = LLM(model or default_model_path(), kernels=mode, threads=threads)
    kernels = sorted({m.kernel for m in llm.model.modules() if hasattr(m, "kernel")})
    prompt = llm.tokenizer.encode("The history of the city begins " * 24)[:120]
    params = SamplingParams(max_tokens=tokens + 1, temperature=0, ignore_eos=True)

    def decode_ms_per_token() -> float:
        out = llm.generate([prompt], params)[0]
        return 1000 * out.metrics.decode_time_s / tokens

    decode_ms_per_token()  # warm-up: first-call allocations, kernel build
    wall = statistics.median(decode_ms_per_token() for _ in range(repetitions))

    def op_times(new_tokens: int) -> tuple[dict[str, float], int]:
        """Self CPU ms per category for one profiled call, and the number of ops it ran."""
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            llm.generate([prompt], SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True))
        per_category = dict.fromkeys([*CATEGORIES, "other ops"], 0.0)
        for event in prof.key_averages():
            per_category[category(event.key)] += event.self_cpu_time_total / 1000
        return per_category, sum(e.count for e in prof.key_averages())

    # The decode steps alone: a call with `tokens` decode steps minus one with none (prefill + first token).
    full, full_ops = op_times(tokens + 1)
    prefill, prefill_ops = op_times(1)
    split = {name: (full[name] - prefill[name]) / tokens for name in full}
    split["python and dispatch"] = max(wall - sum(split.values()), 0.0)
    return {
        "mode": mode,
        "kernels": kernels,
        "precision": llm.precision,
        "ms_per_token": wall,
        "tok_s": 1000 / wall,
        "split_ms": split,
        "ops_per_token": (full_ops - prefill_ops) / tokens,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default="torch,auto", help="kernel modes: torch (before), auto, exact")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", help="a path or known name (default: the default model)")
    parser.add_argument("--json", default="out/profile_decode.json")
    args = parser.parse_args()
    results = [profile_mode(m, args.tokens, args.repetitions, args.threads, args.model) for m in args.modes.split(",")]
    names = list(results[0]["split_ms"])
    print(f"{results[0]['precision']}: decode, batch 1, {args.threads} threads, {args.tokens} tokens after 120")
    print(f"{'mode':<7}{'kernels':<24}{'ms/token':>9}{'tok/s':>8}{'ops/token':>10}  " + "  ".join(names))
    for r in results:
        parts = "  ".join(f"{r['split_ms'][n]:>{len(n)}.2f}" for n in names)
        print(
            f"{r['mode']:<7}{','.join(r['kernels']):<24}{r['ms_per_token']:>9.2f}{r['tok_s']:>8.1f}"
            f"{r['ops_per_token']:>10.0f}  {parts}"
        )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
