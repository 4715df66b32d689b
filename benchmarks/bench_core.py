"""Core benchmark (issue 2): leanlm float32 and bfloat16 against transformers float32 on the default model.

2 threads, batch 1, a 120-token prompt, 128 generated tokens (EOS ignored), each engine in a fresh process,
interleaved, median of --repetitions runs. Prints the table and the ratios; writes JSON (and a plot).

    python benchmarks/bench_core.py [--repetitions 3] [--json out/bench_core.json] [--plot out/bench_core.png]
"""

from __future__ import annotations

import argparse
import sys

from leanlm.bench.report import format_table, save_plot
from leanlm.bench.runner import BenchSpec, EngineSpec, add_ratios, run_benchmark, save_json
from leanlm.formats.assets import default_model_path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct")
    parser.add_argument("--json", default="out/bench_core.json")
    parser.add_argument("--plot", default=None)
    args = parser.parse_args()
    model = args.model or str(default_model_path())
    spec = BenchSpec(
        model=model,
        threads=args.threads,
        repetitions=args.repetitions,
        engines=[
            EngineSpec("leanlm", "bfloat16"),
            EngineSpec("leanlm", "float32"),
            EngineSpec("transformers", "float32"),
        ],
    )

    def progress(repetition, engine, sample):
        print(
            f"  run {repetition + 1}: {engine.engine} {sample['precision']} "
            f"decode {sample['runs'][0]['decode_tok_s']:.1f} tok/s",
            file=sys.stderr,
            flush=True,
        )

    report = run_benchmark(spec, progress)
    add_ratios(report, ("transformers", "float32"))
    print(format_table(report))
    if args.json:
        from pathlib import Path

        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        save_json(report, args.json)
    if args.plot:
        save_plot(report, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
