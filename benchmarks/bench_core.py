"""Core benchmark: leanlm (default: the shipped Q4_1 weights at their own precision; dense bfloat16; float32)
against transformers float32 on the same weights, and llama.cpp when installed.

Default model, 2 threads, batch 1, a 120-token prompt, 128 generated tokens (EOS ignored); each engine runs
in a fresh process, interleaved A/B/C, median of --repetitions runs. llama.cpp (llama-cpp-python, optional)
runs the same weights re-encoded as F16 and Q8_0, and the file as shipped (Q4_1). Prints the table with
ratios against transformers float32; writes JSON with every sample, and a plot.

    python benchmarks/bench_core.py [--repetitions 3] [--json out/bench_core.json] [--plot out/bench_core.png]
    python benchmarks/bench_core.py --before ../leanlm-old    # the same engine from another checkout, same run
"""

from __future__ import annotations

import argparse
import importlib.util
import sys

from leanlm.bench.report import format_table, print_sample, save_plot
from leanlm.bench.runner import BenchSpec, EngineSpec, add_ratios, run_benchmark, save_json
from leanlm.cli.bench import gguf_for_llama_cpp
from leanlm.formats.assets import default_model_path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct")
    parser.add_argument("--json", default="out/bench_core.json")
    parser.add_argument("--plot", default="out/bench_core.png")
    parser.add_argument(
        "--before", metavar="CHECKOUT", help="also run the default engine from this leanlm checkout (a before/after)"
    )
    args = parser.parse_args()
    model = args.model or str(default_model_path())
    engines = [
        EngineSpec("leanlm", "auto", label="default (Q4_1 native)"),
        *([EngineSpec("leanlm", "auto", label="default, before", source=args.before)] if args.before else []),
        EngineSpec("leanlm", "bfloat16", options=(("dequantize", True),), label="bfloat16"),
        EngineSpec("leanlm", "float32", label="float32"),
        EngineSpec("transformers", "float32"),
    ]
    if importlib.util.find_spec("llama_cpp") is not None:
        files = {t: gguf_for_llama_cpp(model, t) for t in ("F16", "Q8_0", "source")}
        engines += [EngineSpec("llama.cpp", "auto", str(path)) for path in files.values()]
    spec = BenchSpec(model=model, threads=args.threads, repetitions=args.repetitions, engines=engines)

    report = run_benchmark(spec, print_sample)
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
