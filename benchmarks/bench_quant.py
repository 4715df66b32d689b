"""Quantization benchmark: every precision leanlm offers, side by side, on the default model, 2 threads.

For float32, bfloat16, the shipped Q4_1 file at its own precision, int8 and int4 (round-to-nearest, GPTQ,
AWQ at group 128, RTN at group 32/64) and an int8 KV cache: size on disk, prefill and decode tok/s
(fresh process per run, interleaved, median), % of the roofline bound, perplexity on wiki.utf8, and KL /
top-1 agreement against the original (the GGUF dequantized to float32). llama.cpp (when installed) runs
the same weights re-encoded as F16, Q8_0, Q4_0 and the shipped Q4_1; leanlm's quality on those files is
measured too, since it reads the same blocks without loss.

    python benchmarks/bench_quant.py [--repetitions 3] [--eval-tokens 4096] [--json out/bench_quant.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
from pathlib import Path

from leanlm.bench.report import format_table
from leanlm.bench.runner import BenchSpec, EngineSpec, run_benchmark, save_json
from leanlm.cli.bench import gguf_for_llama_cpp
from leanlm.formats.assets import default_model_path

QUANTIZED = {  # label -> `leanlm quantize` arguments
    "int8 RTN": ["--method", "int8"],
    "int4 RTN g128": ["--method", "int4", "--group-size", "128"],
    "int4 GPTQ g128": ["--method", "gptq", "--group-size", "128"],
    "int4 AWQ g128": ["--method", "awq", "--group-size", "128"],
    "int4 RTN g64": ["--method", "int4", "--group-size", "64"],
    "int4 RTN g32": ["--method", "int4", "--group-size", "32"],
    "3-bit RTN g128": ["--method", "int4", "--bits", "3", "--group-size", "128"],
    "3-bit GPTQ g128": ["--method", "gptq", "--bits", "3", "--group-size", "128"],
}


def folder_bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def build_artifacts(model: str, out: Path) -> dict[str, Path]:
    artifacts = {}
    for label, arguments in QUANTIZED.items():
        target = out / label.replace(" ", "-")
        if not (target / "quantization.json").is_file():
            print(f"quantizing: {label}", file=sys.stderr, flush=True)
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "leanlm.cli.main",
                    "quantize",
                    "--model",
                    model,
                    "-o",
                    str(target),
                    "--eval-tokens",
                    "0",
                    "--threads",
                    "2",
                    *arguments,
                ],
                check=True,
            )
        artifacts[label] = target
    return artifacts


def quality(model: str, variants: dict[str, EngineSpec], tokens: int) -> dict[str, dict]:
    """Perplexity, KL and top-1 against the float32 original, same tokens for every variant."""
    from leanlm.engine.llm import LLM
    from leanlm.evaluate import evaluate
    from leanlm.evaluate.corpus import evaluation_text

    text = evaluation_text()
    original = LLM(model, dtype="float32", dequantize=True, threads=2)
    results = {}
    for label, spec in variants.items():
        print(f"evaluating: {label}", file=sys.stderr, flush=True)
        llm = LLM(spec.model or model, dtype=spec.dtype, threads=2, **dict(spec.options))
        results[label] = evaluate(llm, text, corpus="wiki", max_tokens=tokens, baseline=original).to_dict()
        del llm
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--out", default="out/quant", help="folder for the artifacts")
    parser.add_argument("--json", default="out/bench_quant.json")
    args = parser.parse_args()
    model = str(default_model_path())
    out = Path(args.out)
    artifacts = build_artifacts(model, out)

    variants = {
        "float32": EngineSpec("leanlm", "float32", options=(("dequantize", True),), label="float32"),
        "bfloat16": EngineSpec("leanlm", "bfloat16", options=(("dequantize", True),), label="bfloat16"),
        "Q4_1 file (native)": EngineSpec("leanlm", "bfloat16", label="Q4_1 file (native)"),
        "bfloat16 + int8 KV": EngineSpec(
            "leanlm", "bfloat16", options=(("dequantize", True), ("kv_cache", "int8")), label="bfloat16 + int8 KV"
        ),
    }
    variants |= {label: EngineSpec("leanlm", "bfloat16", str(path), label=label) for label, path in artifacts.items()}
    gguf_files = {}
    if importlib.util.find_spec("llama_cpp") is not None:
        gguf_files = {t: gguf_for_llama_cpp(model, t) for t in ("F16", "Q8_0", "Q4_0")} | {"Q4_1": Path(model)}
        for type_name, path in gguf_files.items():
            if type_name != "Q4_1":
                variants[f"{type_name} file (native)"] = EngineSpec(
                    "leanlm", "bfloat16", str(path), label=f"{type_name} file (native)"
                )
    peers = [EngineSpec("llama.cpp", "auto", str(path), label=t) for t, path in gguf_files.items()]

    spec = BenchSpec(model=model, threads=2, repetitions=args.repetitions, engines=[*variants.values(), *peers])
    report = run_benchmark(
        spec,
        lambda r, e, s: print(
            f"  run {r + 1}: {e.engine} {e.label} {s['runs'][0]['decode_tok_s']:.1f} tok/s", file=sys.stderr
        ),
    )
    sizes = {label: folder_bytes(Path(s.model)) if s.model else None for label, s in variants.items()}
    sizes |= {f"llama.cpp {t}": folder_bytes(p) for t, p in gguf_files.items()}
    report["quality"] = quality(model, variants, args.eval_tokens)
    report["disk_bytes"] = sizes
    print(format_table(report))
    print()
    print(quality_table(report))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    save_json(report, args.json)
    return 0


def quality_table(report: dict) -> str:
    lines = [
        "| variant | disk MiB | decode tok/s | prefill tok/s | roofline | perplexity | KL vs original | top-1 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    rows = {(r["engine"], r["precision"]): r for r in report["rows"]}
    for label, q in report["quality"].items():
        row = rows[("leanlm", label)]
        size = report["disk_bytes"].get(label)
        lines.append(f"| {label} | {size / 2**20:.0f} |" if size else f"| {label} | (from the GGUF) |")
        lines[-1] += (
            f" {row['decode_tok_s']['median']:.1f} | {row['prefill_tok_s']['median']:.0f} | "
            f"{row['roofline_pct']:.0f}% | {q['perplexity']:.3f} | {q['kl_mean']:.4f} | "
            f"{100 * q['top1_agreement']:.1f}% |"
        )
    for (engine, precision), row in rows.items():
        if engine == "llama.cpp":
            size = report["disk_bytes"][f"llama.cpp {precision}"]
            lines.append(
                f"| llama.cpp {precision} | {size / 2**20:.0f} | {row['decode_tok_s']['median']:.1f} | "
                f"{row['prefill_tok_s']['median']:.0f} | {row['roofline_pct']:.0f}% | | | |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
