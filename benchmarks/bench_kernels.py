"""Kernels benchmark (issue 5): leanlm against llama.cpp on the same weights at Q4_0, Q4_1, Q8_0 and 16 bits.

Default model, 2 threads, batch 1, a 120-token prompt, 128 generated tokens (EOS ignored); each engine runs in
a fresh process, interleaved, median of --repetitions runs. The shipped Q4_1 file is re-encoded once as Q4_0,
Q8_0 and F16 (leanlm's GGUF exporter, codes exact), and both engines read the same four files. leanlm runs its
own kernels (int8 activations, the default); `--modes` adds the exact-activation kernels and torch's kernels
(the fallback) on the Q4_1 file, the before/after of this issue. Ratios are against llama.cpp at the same
precision. Writes JSON with every sample.

    python benchmarks/bench_kernels.py [--repetitions 3] [--modes] [--json out/bench_kernels.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from leanlm.bench.report import format_table, print_sample
from leanlm.bench.runner import BenchSpec, EngineSpec, run_benchmark, save_json
from leanlm.cli.bench import gguf_for_llama_cpp
from leanlm.formats.assets import default_model_path

PRECISIONS = ("Q4_0", "Q4_1", "Q8_0", "F16")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--modes", action="store_true", help="also the exact and torch kernel modes on Q4_1")
    parser.add_argument("--json", default="out/bench_kernels.json")
    args = parser.parse_args()
    source = default_model_path()
    files = {p: gguf_for_llama_cpp(str(source), "source" if p == "Q4_1" else p) for p in PRECISIONS}
    engines = []
    for precision, path in files.items():
        # 16-bit weights run dense in bfloat16 (leanlm's fastest dense CPU path); the rest at their own precision.
        engines.append(EngineSpec("leanlm", "bfloat16" if precision == "F16" else "auto", str(path), label=precision))
        if precision == "Q4_1" and args.modes:
            for mode in ("exact", "torch"):
                engines.append(EngineSpec("leanlm", "auto", str(path), (("kernels", mode),), label=f"Q4_1 {mode}"))
        if importlib.util.find_spec("llama_cpp") is not None:
            engines.append(EngineSpec("llama.cpp", "auto", str(path), label=precision))
    spec = BenchSpec(model=str(source), threads=args.threads, repetitions=args.repetitions, engines=engines)

    report = run_benchmark(spec, print_sample)
    add_same_precision_ratios(report)
    print(format_table(report))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        save_json(report, args.json)
    return 0


def add_same_precision_ratios(report: dict) -> None:
    """Each leanlm row against llama.cpp reading the same file (the first word of the label)."""
    peers = {row["precision"]: row for row in report["rows"] if row["engine"] == "llama.cpp"}
    for row in report["rows"]:
        peer = peers.get(row["precision"].split()[0])
        if row["engine"] != "leanlm" or peer is None:
            continue
        row["vs"] = {
            "engine": f"llama.cpp {peer['precision']}",
            **{m: row[f"{m}_tok_s"]["median"] / peer[f"{m}_tok_s"]["median"] for m in ("prefill", "decode")},
            "load": row["load_s"]["median"] / peer["load_s"]["median"],
        }


if __name__ == "__main__":
    sys.exit(main())
