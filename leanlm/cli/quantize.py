"""`leanlm quantize`: compress a model's weights, measure what it cost, and write a loadable artifact."""

from __future__ import annotations

import argparse

from leanlm.cli.options import add_model_options
from leanlm.compress.config import METHODS


def add_parser(subparsers) -> None:
    q = subparsers.add_parser(
        "quantize",
        help="quantize weights (int8, int4, GPTQ, AWQ) and save a folder that leanlm loads",
        description="Quantize every projection and the LM head, measure perplexity/KL against the original on "
        "the evaluation corpus, and write config.json, tokenizer, model.safetensors and quantization.json.",
    )
    q.add_argument(
        "--method",
        required=True,
        choices=METHODS,
        help="int8: per-channel symmetric; int4: group-wise round-to-nearest; gptq/awq: calibrated on c4 text",
    )
    q.add_argument("--output", "-o", required=True, help="folder to write (replaced atomically if it exists)")
    q.add_argument("--bits", type=int, default=0, help="bits per weight (default: 8 for int8, 4 otherwise)")
    q.add_argument(
        "--group-size",
        type=int,
        default=0,
        help="weights per scale/offset (default: per channel for int8, 128 otherwise; -1 = per channel)",
    )
    q.add_argument("--no-lm-head", action="store_true", help="keep the LM head in the model's dtype")
    q.add_argument(
        "--embedding-bits",
        type=int,
        default=8,
        help="the token embedding in the artifact: 8 = int8 rows in groups of 32 (default), 0 = the model's dtype",
    )
    q.add_argument("--calibration-samples", type=int, default=32, help="GPTQ/AWQ: c4 sequences (default 32)")
    q.add_argument("--calibration-length", type=int, default=256, help="GPTQ/AWQ: tokens per sequence (default 256)")
    q.add_argument(
        "--no-act-order",
        action="store_true",
        help="GPTQ: keep the stored column order (default: decreasing Hessian diagonal, which measured better)",
    )
    q.add_argument("--damp", type=float, default=0.01, help="GPTQ: dampening fraction (default 0.01)")
    mixed = q.add_argument_group("mixed precision per layer (int4, gptq, awq)")
    mixed.add_argument(
        "--mixed",
        help="raise the layers whose quantization moves the logits most (KL measured one layer at a time on c4 text) "
        "to --mixed-bits, keeping the artifact at most this much larger than the uniform one, e.g. 10%%",
    )
    mixed.add_argument("--mixed-bits", type=int, default=8, help="bits of the raised layers (default 8)")
    mixed.add_argument(
        "--mixed-per", choices=["layer", "tensor"], default="layer", help="what gets its own bits (default: layer)"
    )
    mixed.add_argument(
        "--sensitivity",
        help="reuse a KL report written by `leanlm sensitivity --json` (same group size, widths covering --bits and "
        "--mixed-bits) instead of probing again",
    )
    mixed.add_argument(
        "--sensitivity-samples", type=int, default=4, help="c4 sequences of 128 tokens for the probe (default 4)"
    )
    q.add_argument(
        "--export-gguf",
        help="also write a GGUF file for llama.cpp (int8 -> Q8_0, 4 bits or fewer -> Q4_1); needs a GGUF source",
    )
    q.add_argument(
        "--gguf-kquants",
        action="store_true",
        help="with --export-gguf: a Q4_K_M-style file, 4-bit layers as Q4_K and 8-bit ones (int8, --mixed) as Q6_K "
        "where rows are multiples of 256 (re-rounded onto the K-quant grid); Q4_1/Q8_0 elsewhere",
    )
    q.add_argument(
        "--eval-tokens",
        type=int,
        default=2048,
        help="wiki tokens for the quality check recorded in quantization.json (0 = skip)",
    )
    q.add_argument(
        "--eval-pairs",
        type=int,
        default=300,
        help="encoders: wiki queries for the retrieval check against float32 recorded in quantization.json "
        "(0 = skip; default %(default)s)",
    )
    add_model_options(q)


def run(args: argparse.Namespace) -> int:
    from leanlm.compress.config import QuantConfig
    from leanlm.compress.pipelines import quantize_to_folder
    from leanlm.embed.loading import encoder_role
    from leanlm.optimize.search import parse_percent

    if encoder_role(args.model) is not None:
        return _quantize_encoder(args)

    config = QuantConfig(
        method=args.method,
        bits=args.bits,
        group_size=args.group_size,
        include_lm_head=not args.no_lm_head,
        calibration_samples=args.calibration_samples,
        calibration_length=args.calibration_length,
        act_order=not args.no_act_order,
        damp=args.damp,
        mixed=0.0 if args.mixed is None else parse_percent(args.mixed),
        mixed_bits=args.mixed_bits,
        mixed_granularity=args.mixed_per,
        sensitivity_samples=args.sensitivity_samples,
        embedding_bits=args.embedding_bits,
    )
    manifest = quantize_to_folder(
        args.model,
        config,
        args.output,
        dtype=args.dtype,
        threads=args.threads,
        eval_tokens=args.eval_tokens,
        export_gguf=args.export_gguf,
        sensitivity=args.sensitivity,
        gguf_kquants=args.gguf_kquants,
    )
    if args.export_gguf:
        print(f"wrote {args.export_gguf}")
    report = manifest["report"]
    mib = report["quantized_bytes"] / 2**20
    print(
        f"{config.method} {config.bits}-bit g{config.group_size}: {report['quantized_layers']} layers, "
        f"{report['dense_bytes'] / 2**20:.0f} MiB -> {mib:.0f} MiB in {report['seconds']} s -> {args.output}"
    )
    if "mixed" in manifest:
        from leanlm.compress.mixed import sensitivity_table

        m = manifest["mixed"]
        raised = sum(row["bits"] != config.bits for row in m["groups"])
        print(sensitivity_table(m))
        print(
            f"mixed: {raised} of {len(m['groups'])} groups at {config.mixed_bits} bits, "
            f"{m['allocated_bytes'] / 2**20:.1f} MiB of quantized weights (uniform {m['uniform_bytes'] / 2**20:.1f}, "
            f"budget {m['budget_bytes'] / 2**20:.1f})"
        )
    if "quality" in manifest:
        q = manifest["quality"]
        print(
            f"quality on {q['num_tokens']} wiki tokens: perplexity {q['perplexity']:.3f} "
            f"(original {q['baseline_perplexity']:.3f}, x{q['ppl_ratio']:.4f}), KL {q['kl_mean']:.4f}, "
            f"top-1 {100 * q['top1_agreement']:.1f}%"
        )
    return 0


def _quantize_encoder(args: argparse.Namespace) -> int:
    """An embedding model or cross-encoder: int8 (W8A8) or int4 (groups of 32), with its retrieval quality."""
    from leanlm.compress.encoders import quantize_encoder_to_folder
    from leanlm.errors import InvalidRequestError

    if args.bits or args.group_size or args.export_gguf:
        raise InvalidRequestError(
            "Encoders quantize with fixed settings (int8: per-row weights, per-token activations; int4: groups of "
            "32): leave out --bits, --group-size and --export-gguf."
        )
    manifest = quantize_encoder_to_folder(
        args.model, args.method, args.output, threads=args.threads, eval_pairs=args.eval_pairs
    )
    report = manifest["report"]
    print(
        f"{args.method} encoder: {report['quantized_layers']} layers, {report['dense_bytes'] / 2**20:.1f} MiB -> "
        f"{report['quantized_bytes'] / 2**20:.1f} MiB in {report['seconds']} s -> {args.output}"
    )
    if "quality" in manifest and "cosine_mean" in manifest["quality"]:
        q = manifest["quality"]
        print(
            f"quality on {q['pairs']} wiki queries: recall@1 {q['recall@1']:.4f} (float32 {q['float32_recall@1']:.4f}, "
            f"x{q['recall@1_ratio']:.4f}), nDCG@10 {q['ndcg@10']:.4f} (x{q['ndcg@10_ratio']:.4f}), top-1 agreement "
            f"{100 * q['top1_agreement']:.1f}%, cosine to float32 mean {q['cosine_mean']:.5f} min {q['cosine_min']:.5f}"
        )
    elif "quality" in manifest:
        q = manifest["quality"]
        print(f"quality on {q['pairs']} wiki queries: top-1 agreement with float32 {100 * q['top1_agreement']:.1f}%")
    return 0
