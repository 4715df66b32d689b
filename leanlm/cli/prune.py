"""`leanlm prune`: remove weights, heads, channels or layers, measure what it cost, and write a loadable artifact."""

from __future__ import annotations

import argparse

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
    from leanlm.compress.pipelines import prune_to_folder
    from leanlm.compress.prune.config import PruneConfig

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
    manifest = prune_to_folder(
        args.model, config, args.output, dtype=args.dtype, threads=args.threads, eval_tokens=args.eval_tokens
    )
    report = manifest["report"]
    params = report["parameters"]["after"]
    print(
        f"{config.method}: {params['total'] / 1e6:.1f} M parameters ({params['nonzero'] / 1e6:.1f} M nonzero), "
        f"{report['seconds']} s -> {args.output}"
    )
    if "quality" in manifest:
        q, s = manifest["quality"], manifest["speed"]
        print(
            f"quality on {q['num_tokens']} wiki tokens: perplexity {q['perplexity']:.3f} (original "
            f"{q['baseline_perplexity']:.3f}, x{q['ppl_ratio']:.4f}), KL {q['kl_mean']:.4f}, top-1 "
            f"{100 * q['top1_agreement']:.1f}%; decode {s['pruned']['decode_tok_s']} tok/s vs "
            f"{s['original']['decode_tok_s']} (x{s['decode_speedup']}, quick single run)"
        )
    return 0
