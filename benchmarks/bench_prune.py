"""Pruning benchmark: every method and level on the default model, against the original in the same run, 2 threads.

For magnitude, Wanda and SparseGPT at 25% / 50% / 2:4, attention heads and MLP channels at 25%, and 2 / 4 / 6
layers dropped (structured ones with and without least-squares repair): perplexity on wiki.utf8, KL and top-1
agreement against the original (the GGUF dequantized to float32), parameter count, size on disk, and prefill /
decode tok/s with leanlm.bench (fresh process per run, interleaved, median). Speeds compare dense bfloat16 for the
original and every variant. Sparse artifacts load as dense matrices (torch has no fast CPU sparse matmul; the
kernel table below measures CSR against dense), so all of them run the one dense shape of the original: their
speed is measured once, on "wanda 50%". Repair changes weights, not shapes, so it shares its variant's speed too.

    python benchmarks/bench_prune.py [--repetitions 3] [--eval-tokens 4096] [--out out/prune]

Writes out/bench_prune.json, out/bench_prune.md (the tables) and out/bench_prune.png (decode tok/s vs perplexity).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

from leanlm.bench.runner import BenchSpec, EngineSpec, run_benchmark, save_json
from leanlm.formats.assets import default_model_path

ORIGINAL = "original"
VARIANTS = {  # label -> `leanlm prune` arguments
    "magnitude 25%": ["--method", "magnitude", "--sparsity", "0.25"],
    "magnitude 50%": ["--method", "magnitude", "--sparsity", "0.5"],
    "magnitude 2:4": ["--method", "magnitude", "--pattern", "2:4"],
    "wanda 25%": ["--method", "wanda", "--sparsity", "0.25"],
    "wanda 50%": ["--method", "wanda", "--sparsity", "0.5"],
    "wanda 2:4": ["--method", "wanda", "--pattern", "2:4"],
    "sparsegpt 25%": ["--method", "sparsegpt", "--sparsity", "0.25"],
    "sparsegpt 50%": ["--method", "sparsegpt", "--sparsity", "0.5"],
    "sparsegpt 2:4": ["--method", "sparsegpt", "--pattern", "2:4"],
    "heads 25%": ["--method", "structured", "--drop-heads", "0.25", "--no-repair"],
    "heads 25% + repair": ["--method", "structured", "--drop-heads", "0.25"],
    "MLP 25%": ["--method", "structured", "--drop-mlp", "0.25", "--no-repair"],
    "MLP 25% + repair": ["--method", "structured", "--drop-mlp", "0.25"],
    "2 layers": ["--method", "layers", "--drop", "2", "--no-repair"],
    "2 layers + repair": ["--method", "layers", "--drop", "2"],
    "4 layers": ["--method", "layers", "--drop", "4", "--no-repair"],
    "4 layers + repair": ["--method", "layers", "--drop", "4"],
    "6 layers": ["--method", "layers", "--drop", "6", "--no-repair"],
    "6 layers + repair": ["--method", "layers", "--drop", "6"],
    "heads 25% + MLP 25% + repair": ["--method", "structured", "--drop-heads", "0.25", "--drop-mlp", "0.25"],
}


def speed_source(label: str) -> str:
    """The variant whose measured speed a variant shares: same shapes, same dense kernel."""
    if label == ORIGINAL:
        return ORIGINAL
    if VARIANTS[label][1] in ("magnitude", "wanda", "sparsegpt"):
        return "wanda 50%"
    unrepaired = label.removesuffix(" + repair")
    return unrepaired if unrepaired in VARIANTS else label


def folder_bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def build_artifacts(model: str, out: Path, samples: int) -> dict[str, Path]:
    artifacts = {}
    for label, arguments in VARIANTS.items():
        target = out / label.replace(" ", "-").replace("%", "pct").replace(":", "of").replace("+-", "")
        if not (target / "compression.json").is_file():
            print(f"pruning: {label}", file=sys.stderr, flush=True)
            command = [sys.executable, "-m", "leanlm.cli.main", "prune", "--model", model, "-o", str(target)]
            command += ["--eval-tokens", "0", "--threads", "2", "--calibration-samples", str(samples), *arguments]
            subprocess.run(command, check=True)
        artifacts[label] = target
    return artifacts


def quality(model: str, paths: dict[str, Path | None], tokens: int) -> dict[str, dict]:
    """Perplexity, KL and top-1 against the float32 original on the same tokens; parameter counts."""
    from leanlm.compress.prune.prune import parameter_counts
    from leanlm.engine.llm import LLM
    from leanlm.evaluate import evaluate
    from leanlm.evaluate.corpus import evaluation_text

    text = evaluation_text()
    original = LLM(model, dtype="float32", dequantize=True, threads=2)
    results = {}
    for label, path in paths.items():
        print(f"evaluating: {label}", file=sys.stderr, flush=True)
        llm = LLM(path or model, dtype="bfloat16", dequantize=True, threads=2)
        results[label] = evaluate(llm, text, corpus="wiki", max_tokens=tokens, baseline=original).to_dict()
        results[label]["parameters"] = parameter_counts(llm.model)
        del llm
    return results


def kernel_table(threads: int = 2) -> list[dict]:
    """Batch-1 and batch-120 time of the default model's projection shapes at 50% sparsity: dense bfloat16 and
    float32 F.linear against torch's CSR sparse matmul (float32; torch's CPU CSR kernels have no bfloat16 path)."""
    torch.set_num_threads(threads)
    rows = []
    for name, (out_features, in_features) in {
        "qkv_proj 960x576": (960, 576),
        "gate_up_proj 3072x576": (3072, 576),
        "down_proj 576x1536": (576, 1536),
    }.items():
        weight = torch.randn(out_features, in_features)
        weight[torch.rand_like(weight) < 0.5] = 0
        csr = weight.to_sparse_csr()
        for batch in (1, 120):
            x = torch.randn(batch, in_features)
            linear = torch.nn.functional.linear
            timings = {
                "dense bfloat16": _time(linear, x.bfloat16(), weight.bfloat16()),
                "dense float32": _time(linear, x, weight),
                "CSR float32": _time(torch.sparse.mm, csr, x.T.contiguous()),  # (N, K) @ (K, B)
            }
            rows.append({"matrix": name, "batch": batch, "us": {k: round(v * 1e6, 1) for k, v in timings.items()}})
    return rows


def _time(fn, *args, repeats: int = 50) -> float:
    """Median seconds per call over 5 rounds."""
    with torch.inference_mode():
        for _ in range(10):
            fn(*args)
        samples = []
        for _ in range(5):
            started = time.perf_counter()
            for _ in range(repeats):
                fn(*args)
            samples.append((time.perf_counter() - started) / repeats)
    return sorted(samples)[len(samples) // 2]


def rows_of(report: dict) -> list[dict]:
    speeds = {r["precision"]: r for r in report["rows"]}
    base_speed = speeds[ORIGINAL]
    base_quality = report["quality"][ORIGINAL]
    rows = []
    for label, q in report["quality"].items():
        speed = speeds[speed_source(label)]
        rows.append(
            {
                "variant": label,
                "parameters_m": q["parameters"]["total"] / 1e6,
                "nonzero_m": q["parameters"]["nonzero"] / 1e6,
                "disk_mib": report["disk_bytes"][label] / 2**20 if report["disk_bytes"].get(label) else None,
                "decode_tok_s": speed["decode_tok_s"]["median"],
                "decode_ratio": speed["decode_tok_s"]["median"] / base_speed["decode_tok_s"]["median"],
                "prefill_tok_s": speed["prefill_tok_s"]["median"],
                "speed_from": speed_source(label),
                "perplexity": q["perplexity"],
                "ppl_increase": q["perplexity"] / base_quality["perplexity"] - 1,
                "kl": q["kl_mean"],
                "top1": q["top1_agreement"],
            }
        )
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| variant | params M (nonzero) | disk MiB | decode tok/s | vs original | prefill tok/s | perplexity | "
        "ppl change | KL vs original | top-1 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        disk = f"{r['disk_mib']:.0f}" if r["disk_mib"] else "(the GGUF)"
        shared = "" if r["speed_from"] == r["variant"] else f" ({r['speed_from']})"
        lines.append(
            f"| {r['variant']} | {r['parameters_m']:.1f} ({r['nonzero_m']:.1f}) | {disk} | {r['decode_tok_s']:.1f}"
            f"{shared} | {r['decode_ratio']:.2f}x | {r['prefill_tok_s']:.0f} | {r['perplexity']:.2f} | "
            f"{100 * r['ppl_increase']:+.1f}% | {r['kl']:.4f} | {100 * r['top1']:.1f}% |"
        )
    return "\n".join(lines)


def kernel_markdown(kernels: list[dict]) -> str:
    names = list(kernels[0]["us"])
    lines = ["| matrix (50% zeros) | batch | " + " | ".join(f"{n} us" for n in names) + " |"]
    lines.append("|---|---|" + "---|" * len(names))
    for k in kernels:
        lines.append(f"| {k['matrix']} | {k['batch']} | " + " | ".join(f"{k['us'][n]:.0f}" for n in names) + " |")
    return "\n".join(lines)


def target_verdict(rows: list[dict]) -> str:
    structured = [r for r in rows if r["variant"] != ORIGINAL and r["speed_from"] != "wanda 50%"]
    meeting = [r for r in structured if r["decode_ratio"] >= 1.3 and r["ppl_increase"] <= 0.10]
    if meeting:
        return "Meets the target (decode >= 1.3x, perplexity +10% at most): " + ", ".join(
            f"{r['variant']} ({r['decode_ratio']:.2f}x, {100 * r['ppl_increase']:+.1f}%)" for r in meeting
        )
    fastest_ok = max(
        (r for r in structured if r["ppl_increase"] <= 0.10), key=lambda r: r["decode_ratio"], default=None
    )
    best_fast = min((r for r in structured if r["decode_ratio"] >= 1.3), key=lambda r: r["ppl_increase"], default=None)
    parts = ["No structured setting meets the target (decode >= 1.3x with perplexity +10% at most)."]
    if fastest_ok:
        parts.append(
            f"Fastest within +10%: {fastest_ok['variant']} ({fastest_ok['decode_ratio']:.2f}x, "
            f"{100 * fastest_ok['ppl_increase']:+.1f}%)."
        )
    if best_fast:
        parts.append(
            f"Best at >= 1.3x: {best_fast['variant']} ({best_fast['decode_ratio']:.2f}x, "
            f"{100 * best_fast['ppl_increase']:+.1f}%)."
        )
    return " ".join(parts)


def save_plot(rows: list[dict], path: Path, dtype: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in rows:
        kind = "original" if r["variant"] == ORIGINAL else "sparse" if r["speed_from"] == "wanda 50%" else "structured"
        color = {"original": "black", "sparse": "tab:orange", "structured": "tab:blue"}[kind]
        ax.scatter(r["perplexity"], r["decode_tok_s"], color=color, s=25)
        ax.annotate(
            r["variant"], (r["perplexity"], r["decode_tok_s"]), fontsize=7, xytext=(3, 3), textcoords="offset points"
        )
    frontier, best = [], -1.0
    for r in sorted(rows, key=lambda r: r["perplexity"]):  # Pareto: no other point is both faster and better
        if r["decode_tok_s"] > best:
            frontier.append(r)
            best = r["decode_tok_s"]
    ax.plot([r["perplexity"] for r in frontier], [r["decode_tok_s"] for r in frontier], "--", color="gray", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("perplexity on wiki.utf8 (log scale, lower is better)")
    ax.set_ylabel(f"decode tok/s, dense {dtype}, batch 1 (higher is better)")
    ax.set_title("Pruning SmolLM2-135M-Instruct: speed vs quality (dashed: Pareto front)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--calibration-samples", type=int, default=16, help="c4 sequences of 256 tokens")
    parser.add_argument(
        "--speed-dtype",
        default="bfloat16",
        choices=["bfloat16", "float32"],
        help="dense dtype of the speed runs, the same for the original and every variant",
    )
    parser.add_argument("--out", default="out/prune", help="folder for the artifacts")
    parser.add_argument("--report", default="out/bench_prune", help="path stem of the .json/.md/.png outputs")
    args = parser.parse_args()
    model = str(default_model_path())
    artifacts = build_artifacts(model, Path(args.out), args.calibration_samples)

    measured = {ORIGINAL: None} | {label: path for label, path in artifacts.items() if speed_source(label) == label}
    engines = [
        EngineSpec("leanlm", args.speed_dtype, None if path is None else str(path), (("dequantize", True),), label)
        for label, path in measured.items()
    ]
    spec = BenchSpec(model=model, threads=2, repetitions=args.repetitions, engines=engines)
    report = run_benchmark(
        spec,
        lambda r, e, s: print(
            f"  run {r + 1}: {e.label} {s['runs'][0]['decode_tok_s']:.1f} tok/s", file=sys.stderr, flush=True
        ),
    )
    report["quality"] = quality(model, {ORIGINAL: None, **artifacts}, args.eval_tokens)
    report["disk_bytes"] = {label: folder_bytes(path) for label, path in artifacts.items()}
    report["kernels"] = kernel_table()
    report["table"] = rows_of(report)
    report["verdict"] = target_verdict(report["table"])
    report["speed_dtype"] = args.speed_dtype
    stem = Path(args.report)
    stem.parent.mkdir(parents=True, exist_ok=True)
    save_json(report, stem.with_suffix(".json"))
    text = "\n\n".join([markdown(report["table"]), report["verdict"], kernel_markdown(report["kernels"])])
    stem.with_suffix(".md").write_text(text + "\n")
    save_plot(report["table"], stem.with_suffix(".png"), args.speed_dtype)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
