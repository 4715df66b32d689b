"""`leanlm optimize`'s front against llama.cpp's own quantizer on the same weights.

llama.cpp's Q4_0, Q4_K_M and Q6_K files are made by `llama_model_quantize` (llama-cpp-python) from the F16
export of the source. Each file and each artifact on leanlm's front (from `leanlm optimize`'s work folder; the
front over KL, decode speed and size on disk, so that a small point is not lost to a faster, larger one) is
scored on the held-out half of the wiki text (the search never saw it): KL against the source dequantized to
bfloat16, top-1 agreement, size on disk; and timed (decode tok/s, batch 1, a fresh process per run, all engines
interleaved, median): llama.cpp's files by llama.cpp, leanlm's artifacts by leanlm. Quality and speed are cached
in the work folder per configuration, so a rerun after the front grew measures only the new points.

    python benchmarks/bench_optimize_vs_llama_cpp.py --work runs/smollm2-kl005.work [--eval-tokens 1024]
        [--repetitions 2] [--json out/vs_llama_cpp.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from leanlm.bench.llama_cpp_files import quantize_with_llama_cpp
from leanlm.bench.machine import describe
from leanlm.bench.report import print_sample
from leanlm.bench.runner import BenchSpec, EngineSpec, run_sample
from leanlm.bench.worker import load_average
from leanlm.cli.bench import gguf_for_llama_cpp
from leanlm.engine.llm import LLM
from leanlm.evaluate import evaluate
from leanlm.evaluate.corpus import corpus_text
from leanlm.formats.assets import leanlm_home
from leanlm.optimize.formats import Candidate
from leanlm.optimize.measure import EVAL_CONTEXT, EVAL_STRIDE, folder_bytes, split_text

LLAMA_CPP_TYPES = ("Q4_0", "Q4_K_M", "Q6_K")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True, help="`leanlm optimize`'s work folder")
    parser.add_argument("--eval-tokens", type=int, default=1024)
    parser.add_argument("--repetitions", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    parser.add_argument(
        "--quality-only", action="store_true", help="score quality (cached in the work folder), no timing"
    )
    args = parser.parse_args()

    work = Path(args.work)
    model = Path(json.loads((work / "settings.json").read_text())["model"])
    entries = [json.loads(line) for line in (work / "measurements.jsonl").read_text().splitlines() if line.strip()]
    latest = {e["key"]: e for e in entries}
    front = front_with_size([e for e in latest.values() if e.get("decode_tok_s") is not None])
    f16 = gguf_for_llama_cpp(str(model), "F16")
    files = {
        t: quantize_with_llama_cpp(f16, t, leanlm_home() / "exports" / f"{model.stem}.{t}.llama-quantize.gguf")
        for t in LLAMA_CPP_TYPES
    }
    configs = {f"llama.cpp {t}": ("llama.cpp", path, "auto", False, "auto") for t, path in files.items()}
    for e in front:
        c = Candidate(**e["candidate"])
        label = f"leanlm {c.format}" + ("" if c.kernels == "auto" else f" ({c.kernels} kernels)")
        configs[label] = ("leanlm", Path(e["artifact"]), c.spec.dtype, c.spec.method == "dense", c.kernels)

    _, held_out = split_text(corpus_text("wiki", quiet=True))
    baseline = LLM(model, dtype="bfloat16", device="cpu", dequantize=True, threads=args.threads)
    cache_path = work / f"vs_llama_cpp.quality.{args.eval_tokens}.json"  # a rerun scores only what is new
    rows = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    for label, (engine, path, _, dequantize, kernels) in configs.items():
        if label in rows:
            continue
        print(f"quality of {label}...", file=sys.stderr, flush=True)
        # leanlm reads llama.cpp's files dequantized whole: the quality is the file's own (llama.cpp's activation
        # rounding would only add to it); leanlm's artifacts run as they ship, in their kernel mode
        llm = LLM(
            path,
            dtype="bfloat16",
            device="cpu",
            dequantize=engine == "llama.cpp" or dequantize,
            kernels=kernels,
            threads=args.threads,
        )
        q = evaluate(
            llm,
            held_out,
            corpus="wiki (held-out half)",
            context=EVAL_CONTEXT,
            stride=EVAL_STRIDE,
            max_tokens=args.eval_tokens,
            baseline=baseline,
        )
        rows[label] = {"kl_mean": q.kl_mean, "top1_agreement": q.top1_agreement, "disk_mib": folder_bytes(path) / 2**20}
        cache_path.write_text(json.dumps(rows, indent=2))
        del llm
    del baseline
    rows = {label: rows[label] for label in configs}
    for e in front:  # a dense candidate loads the source file: its size is the search's (its weights in bfloat16)
        c = Candidate(**e["candidate"])
        label = f"leanlm {c.format}" + ("" if c.kernels == "auto" else f" ({c.kernels} kernels)")
        rows[label]["disk_mib"] = e["disk_bytes"] / 2**20
    if args.quality_only:
        print(json.dumps(rows, indent=2))
        return
    engines = {
        label: EngineSpec(engine, dtype, str(path), leanlm_options(engine, dequantize, kernels), label=label)
        for label, (engine, path, dtype, dequantize, kernels) in configs.items()
    }
    spec = BenchSpec(str(model), list(engines.values()), args.threads, "cpu", 64, 32)
    load_before = load_average()
    speed_path = work / "vs_llama_cpp.speed.json"  # timed configurations are kept: a rerun times only new ones
    speeds = json.loads(speed_path.read_text()) if speed_path.is_file() else {}
    todo = {label: engine for label, engine in engines.items() if label not in speeds}
    samples = {label: [] for label in todo}
    for repetition in range(args.repetitions):
        for label, engine in todo.items():
            sample = run_sample(spec, engine)
            samples[label].append(sample)
            print_sample(repetition, engine, sample)
    for label, runs in samples.items():
        speeds[label] = statistics.median(s["runs"][0]["decode_tok_s"] for s in runs)
        speed_path.write_text(json.dumps(speeds, indent=2))
    for label in rows:
        rows[label]["decode_tok_s"] = speeds[label]
    machine = {**describe(args.threads), "load_average": [load_before, load_average()]}
    print(
        f"\n{model.name}; {machine['cpu']}, {args.threads} threads, load average {machine['load_average']}; KL on "
        f"{args.eval_tokens} held-out wiki tokens; decode: batch 1, 64-token prompt, 32 new tokens, median of "
        f"{args.repetitions} fresh-process runs, interleaved\n"
    )
    print("| configuration | on disk | KL (held-out) | top-1 | decode tok/s |")
    print("|---|---|---|---|---|")
    for label, r in rows.items():
        print(
            f"| {label} | {r['disk_mib']:.1f} MiB | {r['kl_mean']:.4f} | {100 * r['top1_agreement']:.1f}% | "
            f"{r['decode_tok_s']:.1f} |"
        )
    print()
    ours = {k: r for k, r in rows.items() if k.startswith("leanlm")}
    for label, r in rows.items():
        if not label.startswith("llama.cpp"):
            continue
        beaten = [
            k
            for k, o in ours.items()
            if o["kl_mean"] <= r["kl_mean"]
            and o["disk_mib"] <= r["disk_mib"]
            and o["decode_tok_s"] >= r["decode_tok_s"]
        ]
        print(f"- {label}: matched or beaten on KL, size on disk and decode speed at once by {beaten or 'none'}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))


def leanlm_options(engine: str, dequantize: bool, kernels: str) -> tuple:
    options = (("dequantize", True),) if dequantize else ()
    return options + ((("kernels", kernels),) if engine == "leanlm" and kernels != "auto" else ())


def front_with_size(entries: list[dict]) -> list[dict]:
    """The timed entries no other is at least as good as on KL, decode speed and size on disk (better on one)."""

    def dominates(a: dict, b: dict) -> bool:
        no_worse = (
            a["kl_mean"] <= b["kl_mean"]
            and a["decode_tok_s"] >= b["decode_tok_s"]
            and a["disk_bytes"] <= b["disk_bytes"]
        )
        return no_worse and (
            a["kl_mean"] < b["kl_mean"] or a["decode_tok_s"] > b["decode_tok_s"] or a["disk_bytes"] < b["disk_bytes"]
        )

    return [e for e in entries if not any(dominates(o, e) for o in entries if o is not e)]


if __name__ == "__main__":
    main()
