"""Every weight format against llama.cpp on the same files (issues 12 and 13): Qwen2.5-Coder-1.5B and Gemma 3 270M
(Q4_K_M GGUFs fetched from PyPI wheels), SmolLM2-135M re-encoded as F16, BF16, Q4_K_M and Q6_K, and the default
model (SmolLM2 Q4_1) as published, in one run.

2 threads, batch 1, a 120-token prompt, 128 generated tokens (EOS ignored); each engine runs in a fresh process,
interleaved, median of --repetitions runs; one benchmark (and one bandwidth probe) per model. leanlm runs K-quant and
Q5 blocks natively on its kernels; F16/BF16 files load as dense bfloat16 weights. Writes JSON with every sample.

A model is a known model name, a path, or NAME:TYPE for the known model re-encoded: F16 by leanlm's exporter, other
types (BF16, Q4_K_M, Q6_K, ...) by llama.cpp's own quantizer from that F16 (leanlm/bench/llama_cpp_files.py), the
files cached under $LEANLM_HOME/exports.

    python benchmarks/bench_families.py [--models gemma3-270m,smollm2-135m:Q6_K] [--repetitions 3]
    python benchmarks/bench_families.py --models smollm2-135m,out/smol-26L    # a leanlm artifact beside its source
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from leanlm.bench.report import format_table, print_sample
from leanlm.bench.runner import BenchSpec, EngineSpec, run_benchmark, save_json
from leanlm.formats.assets import fetch_known_model, leanlm_home

DEFAULT_MODELS = (
    "qwen2.5-coder-1.5b,gemma3-270m,smollm2-135m:F16,smollm2-135m:BF16,smollm2-135m:Q4_K_M,smollm2-135m:Q6_K,"
    "smollm2-135m"
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=DEFAULT_MODELS)
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default="out/bench_families.json")
    args = parser.parse_args()
    reports = {}
    for name in args.models.split(","):
        folder = Path(name).is_dir()  # a leanlm artifact (quantized or pruned folder): llama.cpp cannot read it
        path = name if folder else str(model_file(name, args.threads))
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


def model_file(name: str, threads: int) -> Path:
    """A known model's file, or with ':TYPE' that model re-encoded (F16 by leanlm, the rest by llama.cpp)."""
    from leanlm.bench.llama_cpp_files import quantize_with_llama_cpp
    from leanlm.formats.gguf_export import export_gguf

    if Path(name).is_file():
        return Path(name)
    known, _, type_name = name.partition(":")
    source = fetch_known_model(known)
    if not type_name:
        return source
    exports = leanlm_home() / "exports"
    f16 = exports / f"{source.stem}.F16.gguf"
    if not f16.is_file():
        exports.mkdir(parents=True, exist_ok=True)
        export_gguf(source, f16, "F16")
    if type_name == "F16":
        return f16
    return quantize_with_llama_cpp(f16, type_name, exports / f"{source.stem}.llama-{type_name}.gguf", threads)


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
