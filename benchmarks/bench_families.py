"""Model families against llama.cpp (issue 12): Gemma 3 270M and Qwen2.5-Coder-1.5B, both Q4_K_M GGUFs fetched
from PyPI wheels, plus the default model for reference; the same files in the same run.

2 threads, batch 1, a 120-token prompt, 128 generated tokens (EOS ignored); each engine runs in a fresh process,
interleaved, median of --repetitions runs; one benchmark (and one bandwidth probe) per model. leanlm runs K-quant
files dequantized to bfloat16 (it has no K-quant kernels yet), so its roofline figure is against 16-bit weights.
Writes JSON with every sample.

    python benchmarks/bench_families.py [--models gemma3-270m,qwen2.5-coder-1.5b] [--repetitions 3]
    python benchmarks/bench_families.py --models smollm2-135m,out/smol-26L    # a leanlm artifact beside its source
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from leanlm.bench.report import format_table, print_sample
from leanlm.bench.runner import BenchSpec, EngineSpec, run_benchmark, save_json
from leanlm.formats.assets import fetch_known_model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smollm2-135m,gemma3-270m,qwen2.5-coder-1.5b")
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default="out/bench_families.json")
    args = parser.parse_args()
    reports = {}
    for name in args.models.split(","):
        folder = Path(name).is_dir()  # a leanlm artifact (quantized or pruned folder): llama.cpp cannot read it
        path = name if folder else str(fetch_known_model(name))
        engines = [EngineSpec("leanlm", "auto", path, label=Path(name).name)]
        if importlib.util.find_spec("llama_cpp") is not None and not folder:
            engines.append(EngineSpec("llama.cpp", "auto", path, label=name))
        spec = BenchSpec(model=path, threads=args.threads, repetitions=args.repetitions, engines=engines)

        report = run_benchmark(spec, print_sample)
        add_ratios(report)
        print(format_table(report), flush=True)
        reports[name] = report
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        save_json(reports, args.json)
    return 0


def add_ratios(report: dict) -> None:
    """leanlm against llama.cpp on the same file."""
    peer = next((row for row in report["rows"] if row["engine"] == "llama.cpp"), None)
    for row in report["rows"]:
        if row["engine"] == "leanlm" and peer is not None:
            row["vs"] = {
                "engine": "llama.cpp",
                **{m: row[f"{m}_tok_s"]["median"] / peer[f"{m}_tok_s"]["median"] for m in ("prefill", "decode")},
                "load": row["load_s"]["median"] / peer["load_s"]["median"],
            }


if __name__ == "__main__":
    sys.exit(main())
