"""`leanlm prune`: remove weights, heads, channels or layers, measure what it cost, and write a loadable artifact."""

from __future__ import annotations

import argparse
import sys

from leanlm.cli.options import add_model_options
from leanlm.compress.prune.config import HEAD_UNITS, LAYER_SCORES, METHODS, SCOPES


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "prune",
        help="prune weights (magnitude, Wanda, SparseGPT, N:M) or structure (heads, MLP channels, layers)",
        description="Prune the decoder projections or remove whole heads/channels/layers, measure perplexity/KL and "
        "speed against the original, and write config.json, tokenizer, model.safetensors and compression.json. "
        "The result loads with --model and can be quantized with `leanlm quantize`.",
    )
    p.add_argument(
        "--method",
        required=True,
        choices=METHODS,
        help="magnitude/wanda/sparsegpt: zero single weights (--sparsity or --pattern); structured: remove heads "
        "and MLP channels (--drop-heads, --drop-mlp); layers: remove whole decoder layers (--drop)",
    )
    p.add_argument("--output", "-o", required=True, help="folder to write (replaced atomically if it exists)")
    p.add_argument("--sparsity", type=float, default=0.0, help="fraction of weights to zero, e.g. 0.5")
    p.add_argument("--pattern", help="N:M semi-structured sparsity: keep N of every M weights, e.g. 2:4 or 4:8")
    p.add_argument(
        "--scope",
        default="auto",
        choices=SCOPES,
        help="where the sparsity holds: per output row, per matrix, or one global threshold (magnitude only); "
        "auto = row for wanda, layer otherwise",
    )
    p.add_argument("--drop-heads", type=float, default=0.0, help="structured: fraction of attention heads to remove")
    p.add_argument(
        "--head-unit",
        default="query",
        choices=HEAD_UNITS,
        help="structured: remove equal numbers of query heads per KV group (query) or whole KV groups (kv)",
    )
    p.add_argument("--drop-mlp", type=float, default=0.0, help="structured: fraction of MLP channels to remove")
    p.add_argument("--drop", type=int, default=0, help="layers: how many decoder layers to remove")
    p.add_argument(
        "--layer-score",
        default="cosine",
        choices=LAYER_SCORES,
        help="layers: cosine = by how little a layer changes its input (default, one pass); kl = greedy, by "
        "next-token KL when removed (slower)",
    )
    p.add_argument(
        "--no-repair",
        action="store_true",
        help="structured/layers: skip the least-squares refit of o_proj/down_proj towards the original's outputs",
    )
    p.add_argument("--calibration-samples", type=int, default=32, help="c4 sequences (default 32)")
    p.add_argument("--calibration-length", type=int, default=256, help="tokens per sequence (default 256)")
    p.add_argument("--damp", type=float, default=0.01, help="SparseGPT: dampening fraction (default 0.01)")
    p.add_argument(
        "--repair-ridge",
        type=float,
        default=1.0,
        help="repair: ridge strength relative to the mean input energy (default 1.0; weaker overfits c4)",
    )
    p.add_argument(
        "--eval-tokens",
        type=int,
        default=2048,
        help="wiki tokens for the quality check recorded in compression.json (0 = skip it and the speed check)",
    )
    add_model_options(p)


def run(args: argparse.Namespace) -> int:
    from leanlm.compress.prune.artifact import save_pruned
    from leanlm.compress.prune.config import UNSTRUCTURED, PruneConfig
    from leanlm.compress.prune.prune import prune
    from leanlm.compress.storage import adopt_storage_dtype
    from leanlm.engine.llm import LLM, resolve_dtype

    config = PruneConfig(
        method=args.method,
        sparsity=args.sparsity,
        pattern=args.pattern,
        scope=args.scope,
        drop_heads=args.drop_heads,
        head_unit=args.head_unit,
        drop_mlp=args.drop_mlp,
        drop_layers=args.drop,
        layer_score=args.layer_score,
        repair=not args.no_repair,
        calibration_samples=args.calibration_samples,
        calibration_length=args.calibration_length,
        damp=args.damp,
        repair_ridge=args.repair_ridge,
    )
    runtime_dtype = resolve_dtype(args.dtype)
    # Prune float32 copies of the original weights (a quantized GGUF is dequantized); the artifact keeps runtime_dtype.
    llm = LLM(args.model, dtype="float32", device="cpu", threads=args.threads, dequantize=True)
    report = prune(llm, config)
    adopt_storage_dtype(llm, runtime_dtype)
    manifest = {
        "method": config.method,
        "config": config.to_dict(),
        "source": str(llm.model_path),
        "dtype": str(runtime_dtype).removeprefix("torch."),
        "report": report,
    }
    if config.calibrated:
        manifest["calibration"] = {
            "corpus": "c4.utf8 (exllamav2==0.3.2)",
            "samples": config.calibration_samples,
            "tokens_per_sample": config.calibration_length,
        }
    measure = (lambda folder: _measure(folder, args, runtime_dtype)) if args.eval_tokens else None
    folder = save_pruned(llm, args.output, manifest, sparse=config.method in UNSTRUCTURED, measure=measure)
    _print_summary(config, report, folder)
    return 0


def _measure(folder, args, dtype) -> dict:
    """Speed (quick, single run) and quality of the written folder against the original, both dense at `dtype`;
    benchmarks/bench_prune.py gives the careful medians."""
    from leanlm.cli.quantize import _measure_speed
    from leanlm.engine.llm import LLM
    from leanlm.evaluate import evaluate
    from leanlm.evaluate.corpus import evaluation_text

    pruned = LLM(folder, dtype=dtype, device="cpu", threads=args.threads)
    original = LLM(args.model, dtype=dtype, device="cpu", threads=args.threads, dequantize=True)
    speed = {"pruned": _measure_speed(pruned), "original": _measure_speed(original)}
    speed["decode_speedup"] = round(speed["pruned"]["decode_tok_s"] / speed["original"]["decode_tok_s"], 3)
    print("leanlm: measuring quality against the original...", file=sys.stderr)
    quality = evaluate(
        pruned, evaluation_text(), corpus="wiki", max_tokens=args.eval_tokens, baseline=original, progress=True
    )
    return {"speed": speed, "quality": quality.to_dict()}


def _print_summary(config, report: dict, folder) -> None:
    import json

    from leanlm.formats.sparse_folder import MANIFEST

    manifest = json.loads((folder / MANIFEST).read_text())
    params = report["parameters"]["after"]
    print(
        f"{config.method}: {params['total'] / 1e6:.1f} M parameters ({params['nonzero'] / 1e6:.1f} M nonzero), "
        f"{report['seconds']} s -> {folder}"
    )
    if "quality" in manifest:
        q, s = manifest["quality"], manifest["speed"]
        print(
            f"quality on {q['num_tokens']} wiki tokens: perplexity {q['perplexity']:.3f} (original "
            f"{q['baseline_perplexity']:.3f}, x{q['ppl_ratio']:.4f}), KL {q['kl_mean']:.4f}, top-1 "
            f"{100 * q['top1_agreement']:.1f}%; decode {s['pruned']['decode_tok_s']} tok/s vs "
            f"{s['original']['decode_tok_s']} (x{s['decode_speedup']}, quick single run)"
        )
